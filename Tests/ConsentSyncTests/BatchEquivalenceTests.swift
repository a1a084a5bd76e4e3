import ConsentCore
import ConsentStore
import Foundation
import NIOCore
import PostgresNIO
import Testing

/// Batching must not change what is stored: the same deliveries, in the same order, applied one per
/// transaction and applied in batches (where distinct users' snapshots take the set-based path and
/// repeated users the one-by-one path), leave identical state, history and outcomes.
@Suite("Batch equivalence")
struct BatchEquivalenceTests {
    /// A small deterministic generator (SplitMix64), so that a failure can be replayed.
    struct Generator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        mutating func int(_ range: ClosedRange<Int>) -> Int {
            range.lowerBound + Int(next() % UInt64(range.count))
        }
        mutating func chance(_ percent: Int) -> Bool { int(0...99) < percent }
    }

    /// Deliveries over a few users: snapshots (mostly newer, some late), confirmed events, deletions,
    /// redeliveries, and a body that cannot be decoded.
    static func deliveries(seed: UInt64, count: Int, users: Int) -> [String] {
        var random = Generator(state: seed)
        var sent: [String] = []
        var clock = 0
        func time(_ seconds: Int) -> String {
            let s = max(0, seconds)
            return String(format: "2025-03-01T%02d:%02d:%02d.000Z", s / 3600, s / 60 % 60, s % 60)
        }
        func purposes(_ random: inout Generator, events: Bool = false) -> String {
            let ids = ["newsletter", "analytics", "ads", "sms"].filter { _ in random.chance(70) }
            let list = ids.map { id -> String in
                let enabled = random.chance(60) ? "true" : "false"
                let li = !events && random.chance(20) ? ", \"enabled_li\": \(random.chance(50))" : ""
                let values = !events && random.chance(30)
                    ? ", \"values\": {\"topics\": {\"value\": \"t\(random.int(1...3)),t\(random.int(4...6))\"}}" : ""
                return "{\"id\": \"\(id)\", \"enabled\": \(enabled)\(li)\(values)}"
            }
            return "[" + list.joined(separator: ", ") + "]"
        }
        for _ in 0..<count {
            clock += 1
            let user = "u-\(random.int(1...users))"
            let roll = random.int(0...99)
            let body: String
            if roll < 10, !sent.isEmpty {
                body = sent[random.int(0...(sent.count - 1))]
            } else if roll < 16 {
                body = Didomi.deleted(id: user, version: max(1, clock / 4), updatedAt: time(clock * 60 + random.int(-90...30)))
            } else if roll < 26 {
                body = Didomi.event(id: "e-\(random.next() % 1_000_000)", user: user,
                                    createdAt: time(clock * 60 + random.int(-120...60)),
                                    purposes: purposes(&random, events: true),
                                    regulation: random.chance(80) ? "gdpr" : "cpra")
            } else if roll < 28 {
                body = "{\"type\": \"user.updated\", \"parameters\": {}}"
            } else {
                let version = max(1, clock / 4 + random.int(-3...1))
                let vendors = random.chance(50)
                    ? "{\"enabled\": [\"google\"], \"disabled\": [\(random.chance(50) ? "\"meta\"" : "")]}" : nil
                body = Didomi.user(id: user, version: version, updatedAt: time(version * 240 + random.int(0...3)),
                                   purposes: purposes(&random), regulation: random.chance(80) ? nil : "cpra",
                                   vendors: vendors, ouid: "\(user)-\(version)@example.com")
            }
            sent.append(body)
        }
        return sent
    }

    static func pending(_ body: String) -> PendingDelivery {
        let receivedAt = Date(timeIntervalSince1970: 1_740_787_200)
        var change = DidomiDecoder.decode(Data(body.utf8), receivedAt: receivedAt)
        change.receivedAt = Timestamp.format(receivedAt)
        return PendingDelivery(change: change, body: ByteBuffer(string: body))
    }

    /// Everything the apply path writes, as text, without the columns that record wall-clock time.
    static let snapshotQueries = [
        "select row_to_json(t)::text from (select * from consent.current_consents order by source, tenant_id, user_id, regulation, purpose_id, lawful_basis) t",
        "select row_to_json(t)::text from (select * from consent.current_vendor_consents order by 1, 2, 3, 4, 5, 6) t",
        "select row_to_json(t)::text from (select * from consent.current_preferences order by source, tenant_id, user_id, regulation, purpose_id, preference_id) t",
        "select row_to_json(t)::text from (select * from consent.current_users order by source, tenant_id, user_id) t",
        """
        select row_to_json(t)::text from (select source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis,
               status, previous_status, valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id
          from consent.consent_history order by source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis,
               seen_at, seen_at2, seen_tie, status nulls first, delivery_id) t
        """,
        """
        select row_to_json(t)::text from (select source, tenant_id, user_id, regulation, purpose_id, preference_id,
               value_ids, previous_value_ids, changed_at, seen_tie, cause, delivery_id
          from consent.preference_history order by 1, 2, 3, 4, 5, 6, changed_at, seen_tie, delivery_id) t
        """,
        "select row_to_json(t)::text from (select tenant_id, user_id, version, updated_at, deleted_at, deleted_version, external_ref, country from consent.users order by 1, 2) t",
        "select row_to_json(t)::text from (select * from consent.user_snapshots order by 1, 2, 3, 4) t",
        "select row_to_json(t)::text from (select tenant_id, user_id, event_id, status, deleted from consent.didomi_events order by 1, 2, 3) t",
        "select row_to_json(t)::text from (select id, outcome, reason, dedup_key, user_id from consent.deliveries order by id) t",
    ]

    static func snapshot(_ client: PostgresClient) async throws -> [[String]] {
        var tables: [[String]] = []
        for sql in snapshotQueries {
            var rows: [String] = []
            for try await row in try await client.query(PostgresQuery(unsafeSQL: sql)).decode(String.self) {
                rows.append(row)
            }
            tables.append(rows)
        }
        return tables
    }

    @Test("one delivery per transaction and batches of mixed sizes leave identical state, history and outcomes",
          arguments: [UInt64(7), 1_234, 99_991])
    func batchedEqualsOneByOne(seed: UInt64) async throws {
        let bodies = Self.deliveries(seed: seed, count: 400, users: 25)
        let single = try await TestDatabase.shared.freshDatabase()
        let batched = try await TestDatabase.shared.freshDatabase()

        let (oneByOne, expected) = try await TestDatabase.withClient(url: single) { client in
            let store = ConsentStore(client: client, logger: TestDatabase.logger, timeout: .seconds(30))
            var outcomes: [DeliveryOutcome] = []
            for body in bodies { outcomes += try await store.apply([Self.pending(body)]).map(\.outcome) }
            return (outcomes, try await Self.snapshot(client))
        }
        let (inBatches, actual) = try await TestDatabase.withClient(url: batched) { client in
            let store = ConsentStore(client: client, logger: TestDatabase.logger, timeout: .seconds(30))
            var random = Generator(state: seed ^ 0xA5A5)
            var outcomes: [DeliveryOutcome] = []
            var start = 0
            while start < bodies.count {
                let end = min(bodies.count, start + random.int(1...48))
                outcomes += try await store.apply(bodies[start..<end].map(Self.pending)).map(\.outcome)
                start = end
            }
            return (outcomes, try await Self.snapshot(client))
        }

        #expect(inBatches == oneByOne)
        // The sequence exercises every outcome, so the comparison means something.
        for outcome in [DeliveryOutcome.applied, .duplicate, .stale, .failed] {
            #expect(oneByOne.contains(outcome), "no \(outcome) delivery in the sequence")
        }
        #expect(expected[0].count > 20 && expected[4].count > 100)
        for (index, sql) in Self.snapshotQueries.enumerated() where expected[index] != actual[index] {
            let firstDifference = zip(expected[index], actual[index]).first { $0 != $1 }
            Issue.record("""
                differs: \(sql.prefix(80))… (\(expected[index].count) vs \(actual[index].count) rows); first difference:
                one by one: \(firstDifference?.0 ?? "-")
                batched:    \(firstDifference?.1 ?? "-")
                """)
        }
    }
}
