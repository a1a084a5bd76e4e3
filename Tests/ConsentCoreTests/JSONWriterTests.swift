import ConsentCore
import Foundation
import Testing

/// The batch the apply path sends must mean exactly what `JSONEncoder` would have produced.
@Suite("JSON writer")
struct JSONWriterTests {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("../shared/spec/fixtures").standardizedFileURL

    static let receivedAt = Date(timeIntervalSince1970: 1_700_000_000.25)

    static func body(_ path: String) throws -> Data {
        try Data(contentsOf: fixtures.appendingPathComponent(path))
    }

    /// Realistic change sets: every webhook fixture, decoded, with the request context filled in.
    static func changes() throws -> [ChangeSet] {
        var changes: [ChangeSet] = []
        let didomi = [
            "didomi/webhooks/nested/user.created.json", "didomi/webhooks/nested/user.updated.json",
            "didomi/webhooks/nested/user.deleted.json", "didomi/webhooks/nested/event.created.json",
            "didomi/webhooks/nested/event.updated.json", "didomi/webhooks/nested/event.deleted.json",
            "didomi/webhooks/flattened/event.created.flattened.json",
            "didomi/webhooks/flattened/user.updated.flattened.json",
            "didomi/webhooks/pending-sequence/01-event.created.pending.json",
            "didomi/webhooks/pending-sequence/04-user.updated.json",
        ]
        for path in didomi {
            changes.append(DidomiDecoder.decode(try body(path), receivedAt: receivedAt))
        }
        let dataguard: [(DataGuardDecoder.Kind, String)] = [
            (.effectivePermissions, "dataguard/webhooks/effective-permissions.json"),
            (.consentReceipts, "dataguard/webhooks/consent-receipt.json"),
            (.consentReceipts, "dataguard/webhooks/double-opt-in/01-consent-receipt.pending.json"),
            (.consentReceipts, "dataguard/webhooks/double-opt-in/02-consent-receipt.granted.json"),
            (.citizenEmails, "dataguard/webhooks/citizen-email.SPECULATIVE.json"),
        ]
        for (kind, path) in dataguard {
            changes.append(DataGuardDecoder.decode(kind, try body(path), receivedAt: receivedAt))
        }
        changes.append(DidomiDecoder.decode(Data("{\"type\":".utf8), receivedAt: receivedAt))
        for index in changes.indices {
            changes[index].requestID = "req-\(index)"
            changes[index].remoteAddress = "203.0.113.\(index)"
            changes[index].principal = "oauth:client-\(index)"
            changes[index].receivedAt = Timestamp.format(receivedAt)
            changes[index].headers = ["content-type": "application/json", "user-agent": "Didomi/1.0 (\"webhooks\")",
                                      "x-odd": "tab\there\nnew line \u{1} / \\ é 😀"]
        }
        return changes
    }

    /// A change set with awkward strings and numbers in every JSON-valued member.
    static func awkward() -> ChangeSet {
        var change = ChangeSet(endpoint: "didomi", source: "didomi", action: .didomiUser)
        change.tenant = "quote\" backslash\\ slash/ controls \u{1}\u{8}\u{c}\u{1f}\u{7f}"
        change.user = "ünïcødé 日本 😀 \u{2028}\u{2029}"
        var info = ChangeSet.UserInfo()
        info.version = 1_741_946_467_530
        info.metadata = .object([
            "numbers": .array([.number(0), .number(-0.0), .number(1), .number(-1), .number(0.1), .number(1e-7),
                               .number(2.5e300), .number(-123456.789), .number(9_007_199_254_740_992),
                               .number(9_007_199_254_740_994), .number(1e22), .number(5e-324),
                               .number(1_741_946_467_530)]),
            "nested": .object(["null": .null, "t": .bool(true), "f": .bool(false), "empty": .object([:]),
                               "list": .array([])]),
            "key \"quoted\"\n": .string("v\\al\tue"),
        ])
        change.userInfo = info
        var event = ChangeSet.EventInfo(id: "e", createdAt: "2025-01-01T00:00:00Z")
        event.consents = .null
        event.proofsID = ["p1", "p\"2"]
        change.event = event
        var item = ChangeSet.Item(kind: "purpose", id: "analytics", basis: .legitimateInterest, status: .objectionUpheld,
                                  raw: nil)
        item.provenance = .object(["transaction_id": .string("t-1")])
        change.items = [item]
        change.prefs = [ChangeSet.Preference(purpose: nil, pref: "topics", values: ["b", "a"])]
        change.replaces = []
        change.email = .string("")
        return change
    }

    func viaEncoder(_ changes: [ChangeSet]) throws -> JSONValue {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.withoutEscapingSlashes]
        return try JSONDecoder().decode(JSONValue.self, from: encoder.encode(changes))
    }

    @Test("a batch of decoded fixtures means what JSONEncoder writes")
    func fixtureBatch() throws {
        let changes = try Self.changes()
        #expect(changes.count == 16)
        #expect(Set(changes.map(\.action)).count >= 6)
        let expected = try viaEncoder(changes)
        let written = Data(ChangeSet.jsonArray(changes))
        #expect(try JSONDecoder().decode(JSONValue.self, from: written) == expected)
        #expect(try JSONParser.parse(written) == expected)
        #expect(try JSONSerialization.jsonObject(with: written) is [Any])
        for change in changes {
            let one = try JSONParser.parse(ChangeSet.jsonArray([change]))
            #expect(one == (try viaEncoder([change])), "\(change.endpoint) \(change.action)")
        }
    }

    @Test("awkward strings and numbers mean what JSONEncoder writes")
    func awkwardValues() throws {
        let change = Self.awkward()
        let written = ChangeSet.jsonArray([change, ChangeSet(endpoint: "x", source: "y", action: .store)])
        let expected = try viaEncoder([change, ChangeSet(endpoint: "x", source: "y", action: .store)])
        #expect(try JSONDecoder().decode(JSONValue.self, from: Data(written)) == expected)
        #expect(try JSONParser.parse(written) == expected)
        #expect(ChangeSet.jsonArray([]) == Array("[]".utf8))
    }

    @Test("escapes and number forms")
    func text() {
        func written(_ value: JSONValue) -> String {
            var writer = JSONWriter()
            writer.value(value)
            return String(decoding: writer.bytes, as: UTF8.self)
        }
        #expect(written(.string("a\"b\\c/d\n\r\t\u{8}\u{c}\u{0}\u{1f}é😀")) == #""a\"b\\c/d\n\r\t\b\f\ufffd\u001fé😀""#)
        #expect(written(.array([.number(4), .number(-0.0), .number(-17), .number(0.5), .number(1e300), .number(.nan),
                                .number(.infinity), .number(9_007_199_254_740_992), .number(9_007_199_254_740_994),
                                .number(-9_007_199_254_740_992)]))
                == "[4,0,-17,0.5,1e+300,null,null,9007199254740992,9.007199254740994e+15,-9007199254740992]")
        #expect(written(.object(["a": .array([.null, .bool(true), .object([:]), .array([])])]))
                == #"{"a":[null,true,{},[]]}"#)
        var writer = JSONWriter()
        writer.integer(.min)
        writer.integer(.max)
        writer.integer(0)
        writer.integer(-5)
        #expect(String(decoding: writer.bytes, as: UTF8.self) == "-9223372036854775808,9223372036854775807,0,-5")
    }
}
