import ConsentCore
import Foundation
import Testing

/// Decoding is pure: bytes in, change set out. These tests need no database.
@Suite("Didomi decoding")
struct DidomiDecoderTests {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("../shared/spec/fixtures/didomi/webhooks").path

    func decode(_ text: String) -> ChangeSet {
        DidomiDecoder.decode(Data(text.utf8), receivedAt: Date(timeIntervalSince1970: 1_700_000_000))
    }

    func fixture(_ path: String) throws -> ChangeSet {
        decode(try String(contentsOfFile: Self.fixtures + "/" + path, encoding: .utf8))
    }

    @Test("user.updated: new_entity is the snapshot; purposes, LI, vendors and sorted preferences")
    func userUpdated() throws {
        let change = try fixture("nested/user.updated.json")
        #expect(change.action == .didomiUser)
        #expect(change.user == "6f1c2a9e-3b7d-4c11-9e0a-5d2f8b7c1a40")
        #expect(change.tenant == "acme-retail")
        #expect(change.regulation == "gdpr")
        #expect(change.userInfo?.version == 4)
        #expect(change.at == "2025-03-14T09:21:07.530Z")
        let purposes = change.items.filter { $0.kind == "purpose" }.map { "\($0.id)=\($0.status.rawValue)" }.sorted()
        #expect(purposes == ["analytics=granted", "geolocation_data=denied", "newsletter=granted", "sms_offers=denied"])
        #expect(change.items.filter { $0.kind == "vendor" }.count == 2)
        #expect(change.prefs.first { $0.pref == "topics-Xk29" }?.values == ["tech-8a1f", "travel-3c9d"])
        #expect(change.replaces == ["purpose", "vendor"])
    }

    @Test("flattened and nested forms of one event decode to the same choices")
    func flattenedMatchesNested() throws {
        let nested = try fixture("nested/event.created.json")
        let flat = try fixture("flattened/event.created.flattened.json")
        #expect(flat.action == .didomiEvent)
        #expect(flat.key == nested.key)
        #expect(Set(flat.items.map { "\($0.id)/\($0.status)" }) == Set(nested.items.filter { $0.kind == "purpose" }.map { "\($0.id)/\($0.status)" }))
        #expect(Set(flat.prefs.map { "\($0.pref)=\($0.values)" }) == Set(nested.prefs.map { "\($0.pref)=\($0.values)" }))
    }

    @Test("a flattened user.updated has no vendor lists, so it does not replace vendors")
    func flattenedIsLossy() throws {
        let change = try fixture("flattened/user.updated.flattened.json")
        #expect(change.action == .didomiUser)
        #expect(change.replaces == ["purpose"])
        #expect(change.userInfo?.version == 4)
    }

    @Test("preference values are a set: trimmed, empty ones dropped, a value named twice counts once")
    func preferenceValuesSet() {
        let user = decode(#"""
            {"type":"user.created","parameters":{"entity":{"id":"u","organization_id":"o","version":1,
             "updated_at":"2025-01-01T00:00:00Z","consents":{"purposes":[
               {"id":"a","enabled":true,"values":{"t":{"value":"b, a ,a,,b"}}}]}}}}
            """#)
        #expect(user.prefs.first?.values == ["a", "b"])
    }

    @Test("snapshot: null enabled is unset and enabled_li maps to claimed/objected; events keep only explicit choices")
    func statusMapping() {
        let user = decode(#"""
            {"type":"user.created","parameters":{"entity":{"id":"u","organization_id":"o","version":1,
             "updated_at":"2025-01-01T00:00:00Z","consents":{"purposes":[
               {"id":"a","enabled":null,"enabled_li":true},{"id":"b","enabled_li":false},{"id":"c"}]}}}}
            """#)
        let rows = Set(user.items.map { "\($0.id)/\($0.basis.rawValue)/\($0.status.rawValue)" })
        #expect(rows == ["a/consent/unset", "a/legitimate_interest/claimed", "b/consent/unset",
                         "b/legitimate_interest/objected", "c/consent/unset"])
        let event = decode(#"""
            {"type":"event.created","parameters":{"entity":{"id":"e","organization_id":"o","created_at":"2025-01-01T00:00:00Z",
             "user":{"id":"u"},"consents":{"purposes":[{"id":"a","enabled":null,"enabled_li":false},{"id":"b","enabled":true}]}}}}
            """#)
        #expect(Set(event.items.map { "\($0.id)/\($0.basis.rawValue)/\($0.status.rawValue)" })
                == ["a/legitimate_interest/objected", "b/consent/granted"])
        #expect(event.event?.status == "confirmed")
    }

    @Test("a regulation is a lower-case id; an empty one is none")
    func regulationSpelling() {
        let body = { (regulation: String) in
            #"{"type":"user.created","regulation":"cpra","parameters":{"entity":{"id":"u","organization_id":"o","version":1,"updated_at":"2025-01-01T00:00:00Z","regulation":"REG","consents":{"purposes":[]}}}}"#
                .replacingOccurrences(of: "REG", with: regulation)
        }
        #expect(decode(body("GDPR")).regulation == "gdpr")
        #expect(decode(body("")).regulation == "cpra")
        #expect(decode(body(" ")).regulation == "cpra")
    }

    @Test("regulation: entity, then envelope, then source event, then gdpr")
    func regulationPrecedence() {
        func regulation(entity: String?, envelope: String?, source: String?) -> String? {
            let e = entity.map { ",\"regulation\":\"\($0)\"" } ?? ""
            let v = envelope.map { ",\"regulation\":\"\($0)\"" } ?? ""
            let s = source.map { ",\"source\":{\"id\":\"x\",\"regulation\":\"\($0)\"}" } ?? ""
            return decode("""
                {"type":"user.updated"\(v),"parameters":{"new_entity":{"id":"u","organization_id":"o","version":1,
                 "updated_at":"2025-01-01T00:00:00Z","consents":{"purposes":[]}\(e)}\(s)}}
                """).regulation
        }
        #expect(regulation(entity: "cpra", envelope: "lgpd", source: "x") == "cpra")
        #expect(regulation(entity: nil, envelope: "lgpd", source: "x") == "lgpd")
        #expect(regulation(entity: nil, envelope: nil, source: "cpra") == "cpra")
        #expect(regulation(entity: nil, envelope: nil, source: nil) == "gdpr")
    }

    @Test("dedup keys: event.updated keys on updated_at and status, users on type, regulation and version")
    func keys() throws {
        #expect(try fixture("nested/event.updated.json").key
                == "event.updated:9b2d7c1e-5a44-4f0e-8f6b-2c1d3e4f5a60:2025-03-14T09:25:44.090Z:confirmed")
        #expect(try fixture("nested/user.created.json").key == "user.created:gdpr:v1:2025-03-15T18:03:12.220Z")
        // Without updated_at, a confirmation and a later proof update of the same event keep apart.
        func update(old: String) -> String {
            #"{"type":"event.updated","parameters":{"old_entity":{"status":"\#(old)"},"new_entity":{"id":"e","organization_id":"o","created_at":"2025-01-01T00:00:00Z","status":"confirmed","user":{"id":"u"},"consents":{}}}}"#
        }
        #expect(decode(update(old: "pending_approval")).key == "event.updated:e:-:pending_approval>confirmed")
        #expect(decode(update(old: "confirmed")).key == "event.updated:e:-:confirmed>confirmed")
        let deleted = try fixture("nested/user.deleted.json")
        #expect(deleted.action == .didomiUserDeleted)
        #expect(deleted.at == "2025-02-28T13:14:15.161Z")
    }

    @Test("errors name the field and the problem", arguments: [
        ("not json", "body is not valid JSON: unexpected character 'o' at byte 1; expected 'null'"),
        ("[]", "body must be a JSON object with 'type' and 'parameters', got array"),
        (#"{"parameters":{}}"#, "required field 'type' is missing"),
        (#"{"type":"user.created"}"#, "required field 'parameters' is missing"),
        (#"{"type":"user.created","parameters":{"entity":{"id":"u","organization_id":"o","version":"x","updated_at":"2025-01-01T00:00:00Z"}}}"#,
         "field 'parameters.entity.version' must be an integer, got string"),
        (#"{"type":"event.created","parameters":{"entity":{"id":"e","organization_id":"o","created_at":"soon","user":{"id":"u"},"consents":{}}}}"#,
         "field 'parameters.entity.created_at' is not an ISO 8601 timestamp: 'soon'"),
        (#"{"type":"event.created","parameters":{"entity":{"id":"e","organization_id":"o","created_at":"2025-01-01T00:00:00Z","consents":{}}}}"#,
         "required field 'parameters.entity.user.id' is missing"),
        (#"{"type":"user.created","parameters":{"entity":{"id":1e20,"organization_id":"o","updated_at":"2025-01-01T00:00:00Z"}}}"#,
         "field 'parameters.entity.id' must be a string, got number"),
        (#"{"type":"user.created","parameters":{"entity":{"id":"u","organization_id":-9223372036854775809,"updated_at":"2025-01-01T00:00:00Z"}}}"#,
         "field 'parameters.entity.organization_id' must be a string, got number"),
        (#"{"type":"user.created","parameters":{"entity":{"id":"u","organization_id":"o","version":"4","updated_at":"2025-01-01T00:00:00Z"}}}"#,
         "field 'parameters.entity.version' must be an integer, got string"),
        (#"{"type":"user.updated","parameters":{"new_entity":{"id":"u","organization_id":"o","version":4,"updated_at":"2025-01-01T00:00:00Z","consents":{"purposes":null}}}}"#,
         "required field 'parameters.new_entity.consents.purposes' is missing"),
        (#"{"type":"user.updated","parameters":{"new_entity":{"id":"u","organization_id":"o","version":4,"updated_at":"2025-01-01T00:00:00Z","consents":{"vendors":{}}}}}"#,
         "required field 'parameters.new_entity.consents.purposes' is missing"),
        (#"{"type":"user.created","parameters":{"entity":{"id":"u","organization_id":"o","version":1e300,"updated_at":"2025-01-01T00:00:00Z"}}}"#,
         "field 'parameters.entity.version' must be an integer, got number"),
        (#"{"type":"user.created","parameters":{"entity":{"id":"u\u0000","organization_id":"o","version":1,"updated_at":"2025-01-01T00:00:00Z","consents":{"purposes":[]}}}}"#,
         "field 'parameters.entity.id' contains a NUL character (\\u0000), which cannot be stored"),
        (#"{"type":"user.created","parameters":{"entity":{"id":"u","organization_id":"o","version":1,"updated_at":"2025-01-01T00:00:00Z","regulation":"gd\u0000pr","consents":{"purposes":[]}}}}"#,
         "field 'parameters.entity.regulation' contains a NUL character (\\u0000), which cannot be stored"),
        (#"{"type":"user.created","parameters":{"entity":{"id":"u","organization_id":"o","version":1,"updated_at":"2025-01-01T00:00:00Z","consents":{"purposes":[{"id":"p","enabled":true,"values":{"t":{"value":"a,b\u0000"}}}]}}}}"#,
         "field 'parameters.entity.consents.purposes[0].values.t.value' contains a NUL character (\\u0000), which cannot be stored"),
        (#"{"type":"event.created","parameters":{"entity":{"id":"e","organization_id":"o","created_at":"2025-01-01T00:00:00Z","user":{"id":"u"},"consents":{"purposes":[{"id":"p","enabled":true,"values":{"a\u0000":"x"}}]}}}}"#,
         "field 'parameters.entity.consents.purposes[0].values.a\\u0000' contains a NUL character (\\u0000), which cannot be stored"),
    ])
    func errors(body: String, message: String) {
        let change = decode(body)
        #expect(change.action == .reject)
        #expect(change.reason == message)
    }

    @Test("an unknown type is kept as stored, with tenant and user when readable")
    func unknownType() {
        let change = decode(#"{"type":"user.merged","parameters":{"entity":{"id":"u","organization_id":"o"}}}"#)
        #expect(change.action == .store)
        #expect(change.tenant == "o")
        #expect(change.user == "u")
        // Free text (here the type) with a NUL PostgreSQL cannot hold is read with U+FFFD in its place.
        let nul = decode(#"{"type":"user.\u0000merged","parameters":{"entity":{"id":"u","organization_id":"o"}}}"#)
        #expect(nul.action == .store && nul.type == "user.\u{FFFD}merged")
    }

    @Test("numbers too large for an identifier are errors, never a trap, also where an unknown type reads them")
    func hugeNumbers() {
        let unknown = decode(#"{"type":"user.merged","parameters":{"entity":{"id":1e20,"organization_id":9223372036854775807}}}"#)
        #expect(unknown.action == .store)
        #expect(unknown.tenant == nil && unknown.user == nil)
        // Vendor lists may carry IAB vendors as numbers; nothing else is an id when it is a number.
        let vendors = decode(#"{"type":"user.created","parameters":{"entity":{"id":"u","organization_id":"o","version":1,"updated_at":"2025-01-01T00:00:00Z","consents":{"purposes":[],"vendors":{"enabled":[755,"google"],"disabled":[1e300]}}}}}"#)
        #expect(vendors.reason == "field 'parameters.entity.consents.vendors.disabled[0]' must be a string or a whole number, got 1e+300")
        let email = DataGuardDecoder.decode(.citizenEmails, Data(#"{"applicationId":1e20,"citizenId":-1e19}"#.utf8),
                                            receivedAt: Date(timeIntervalSince1970: 1_700_000_000))
        #expect(email.action == .dataguardEmail && email.tenant == nil && email.user == nil)
    }
}
