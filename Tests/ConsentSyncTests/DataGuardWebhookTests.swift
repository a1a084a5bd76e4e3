import Foundation
import PostgresNIO
import Testing

/// DataGuard builders for sequences the fixtures do not cover.
enum DataGuard {
    static let citizen = "c0a80121-7d3e-4b6a-9f1e-2b3c4d5e6f70"

    static func permission(
        _ option: String, state: String? = "GRANTED", justification: String = "consent", transaction: String,
        obtainedAt: String, recordedAt: String? = nil, validUntil: String? = nil
    ) -> String {
        let stateJSON = state.map { "\"\($0)\"" } ?? "null"
        let until = validUntil.map { "\"\($0)\"" } ?? "null"
        return """
            {"transactionId": "\(transaction)", "optionType": "option", "optionId": "\(option)",
             "justification": "\(justification)", "state": \(stateJSON), "channel": "web",
             "recordedAt": "\(recordedAt ?? obtainedAt)", "obtainedAt": "\(obtainedAt)", "validFrom": "\(obtainedAt)",
             "validUntil": \(until)}
            """
    }

    static func preference(_ reference: String, choices: [String], submission: String?, updatedAt: String) -> String {
        let list = choices.map { "{\"reference\": \"\($0)\", \"label\": \"\($0)\"}" }.joined(separator: ",")
        let submissionField = submission.map { "\"submissionId\": \"\($0)\", " } ?? ""
        return """
            {"preference": "\(reference)", "choices": [\(list)], "label": "L", \(submissionField)"updatedAt": "\(updatedAt)"}
            """
    }

    static func body(permissions: [String], preferences: [String] = [], sentAt: String) -> String {
        """
        {"applicationId": "app-Yq8Ld", "citizenId": "\(citizen)", "externalRef": "CUST-000123",
         "permissions": [\(permissions.joined(separator: ","))], "preferences": [\(preferences.joined(separator: ","))],
         "sentAt": "\(sentAt)"}
        """
    }
}

/// PRODUCT §2, §4 and §5 for DataGuard CPM.
@Suite("DataGuard webhooks")
struct DataGuardWebhookTests {
    let effective = "/webhooks/dataguard/effective-permissions"
    let receipts = "/webhooks/dataguard/consent-receipts"
    let emails = "/webhooks/dataguard/citizen-emails"

    func fixture(_ path: String) throws -> String {
        try String(contentsOfFile: TestDatabase.fixtures + "/dataguard/webhooks/" + path, encoding: .utf8)
    }

    @Test("effective permissions: all states and bases mapped, provenance and validity kept, regulation NULL")
    func effectivePermissions() async throws {
        try await AgentHarness.run { agent in
            let reply = try await agent.post(effective, body: try fixture("effective-permissions.json"))
            #expect(reply.status == .ok)
            #expect(reply.outcome == "applied")
            #expect(try await agent.consents(user: DataGuard.citizen, regulation: nil) == [
                "f8Hba": "granted", "k2Lmq": "denied", "grp-Post7/legitimate_interest": "claimed",
                "p9Wr3/legitimate_interest": "objected", "n3Ws8": "pending",
            ])
            let row = try await agent.scalar("""
                select external_ref || '|' || option_type || '|' || valid_until::date || '|' || in_force || '|' || cause
                  from consent.current_consents where purpose_id = 'f8Hba'
                """, as: String.self)
            #expect(row == "CUST-000123|option|2027-03-10|true|dataguard:transaction:txn-8c1f02a9")
            let delegate = try await agent.scalar("""
                select provenance->>'delegatedAuthorityName' from consent.consents where item_id = 'p9Wr3'
                """, as: String.self)
            #expect(delegate == "Authorised spouse")
            #expect(try await agent.preferences(user: DataGuard.citizen, regulation: nil) == [
                "/interests": ["interests_cinema", "interests_jazz"], "/email_frequency": ["email_frequency_weekly"],
            ])
            let version = try await agent.scalar("select coalesce(version, -1) from consent.current_users where user_id = \(DataGuard.citizen)", as: Int64.self)
            #expect(version == -1)
        }
    }

    @Test("a redelivered body with a new sentAt is a duplicate")
    func redeliveryNewSentAt() async throws {
        try await AgentHarness.run { agent in
            let body = try fixture("effective-permissions.json")
            #expect(try await agent.post(effective, body: body).outcome == "applied")
            let again = body.replacingOccurrences(of: "2025-03-14T09:58:31.004Z", with: "2025-03-14T10:58:31.004Z")
            #expect(again != body)
            #expect(try await agent.post(effective, body: again).outcome == "duplicate")
        }
    }

    @Test("a receipt after the snapshot changes only what it carries; overlapping transactions are no-ops")
    func receiptAfterSnapshot() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(effective, body: try fixture("effective-permissions.json"))
            #expect(try await agent.post(receipts, body: try fixture("consent-receipt.json")).outcome == "applied")
            let state = try await agent.consents(user: DataGuard.citizen, regulation: nil)
            #expect(state["k2Lmq"] == "granted")
            #expect(state["f8Hba"] == "granted")
            #expect(state.count == 5)
            #expect(try await agent.preferences(user: DataGuard.citizen, regulation: nil)["/email_frequency"] == ["email_frequency_monthly"])
            // A receipt repeating the snapshot's transaction (different body): a duplicate, no history.
            let history = try await agent.count("select count(*)::int from consent.consent_history")
            let repeatBody = DataGuard.body(permissions: [DataGuard.permission(
                "f8Hba", transaction: "txn-8c1f02a9", obtainedAt: "2025-03-10T14:21:59.000Z",
                recordedAt: "2025-03-10T14:22:08.511Z", validUntil: "2027-03-10T14:21:59.000Z")], sentAt: "2025-03-21T00:00:00Z")
            let repeated = try await agent.post(receipts, body: repeatBody)
            #expect(repeated.outcome == "duplicate")
            #expect(repeated.json["delivery_id"] != nil)
            #expect(try await agent.count("select count(*)::int from consent.consent_history") == history)
            // One new item beside a repeated one: applied.
            let mixed = DataGuard.body(permissions: [
                DataGuard.permission("f8Hba", transaction: "txn-8c1f02a9", obtainedAt: "2025-03-10T14:21:59.000Z",
                                     recordedAt: "2025-03-10T14:22:08.511Z", validUntil: "2027-03-10T14:21:59.000Z"),
                DataGuard.permission("zz9", transaction: "txn-new-1", obtainedAt: "2025-03-22T00:00:00Z")], sentAt: "2025-03-22T00:00:01Z")
            #expect(try await agent.post(receipts, body: mixed).outcome == "applied")
            // No items at all: nothing repeated, so not a duplicate (the citizen's record is still written).
            let empty = DataGuard.body(permissions: [], sentAt: "2025-03-23T00:00:00Z")
            #expect(try await agent.post(receipts, body: empty).outcome == "applied")
        }
    }

    @Test("double opt-in: PENDING then GRANTED, with history")
    func doubleOptIn() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(receipts, body: try fixture("double-opt-in/01-consent-receipt.pending.json"))
            #expect(try await agent.consents(user: DataGuard.citizen, regulation: nil) == ["n3Ws8": "pending"])
            try await agent.post(receipts, body: try fixture("double-opt-in/02-consent-receipt.granted.json"))
            #expect(try await agent.consents(user: DataGuard.citizen, regulation: nil) == ["n3Ws8": "granted"])
            // Delivered out of order, the PENDING receipt is stale.
            let late = try await agent.post(receipts, body: try fixture("double-opt-in/01-consent-receipt.pending.json")
                .replacingOccurrences(of: "\"channel\": \"web\"", with: "\"channel\": \"web-retry\""))
            #expect(late.outcome == "stale")
            #expect(try await agent.consents(user: DataGuard.citizen, regulation: nil) == ["n3Ws8": "granted"])
            let statuses = try await agent.db.query("""
                select status from consent.consent_history where item_id = 'n3Ws8' order by changed_at
                """).collect().map { try $0.decode(String.self) }
            #expect(statuses == ["pending", "granted"])
        }
    }

    @Test("preference receipts with equal updatedAt and no submissionId end the same in either order")
    func preferenceTieWithoutSubmission() async throws {
        let a = DataGuard.body(permissions: [], preferences: [DataGuard.preference("topics", choices: ["food"], submission: nil, updatedAt: "2025-03-02T00:00:00Z")],
                               sentAt: "2025-03-02T00:00:05Z")
        let b = DataGuard.body(permissions: [], preferences: [DataGuard.preference("topics", choices: ["travel", "books"], submission: nil, updatedAt: "2025-03-02T00:00:00Z")],
                               sentAt: "2025-03-02T00:00:06Z")
        for order in [[a, b], [b, a]] {
            try await AgentHarness.run { agent in
                for body in order {
                    let reply = try await agent.post(receipts, body: body)
                    #expect(reply.status == .ok, "\(reply.json)")
                }
                // "choices:food" sorts after "choices:books,travel".
                #expect(try await agent.preferences(user: DataGuard.citizen, regulation: nil) == ["/topics": ["food"]],
                        "order \(order == [a, b] ? "food first" : "books, travel first")")
            }
        }
    }

    @Test("an older snapshot never regresses newer state")
    func olderSnapshot() async throws {
        try await AgentHarness.run { agent in
            let newer = DataGuard.body(permissions: [DataGuard.permission("a", state: "DENIED", transaction: "t2", obtainedAt: "2025-03-02T00:00:00Z")],
                                       sentAt: "2025-03-02T00:00:05Z")
            let older = DataGuard.body(permissions: [DataGuard.permission("a", state: "GRANTED", transaction: "t1", obtainedAt: "2025-03-01T00:00:00Z")],
                                       sentAt: "2025-03-01T00:00:05Z")
            let first = try await agent.post(effective, body: newer)
            let second = try await agent.post(effective, body: older)
            #expect(first.outcome == "applied")
            #expect(second.outcome == "stale")
            let state = try await agent.consents(user: DataGuard.citizen, regulation: nil)
            #expect(state == ["a": "denied"])
        }
    }

    @Test("an item missing from a newer snapshot is removed; an older snapshot, or a late retry, removes nothing")
    func removals() async throws {
        try await AgentHarness.run { agent in
            let first = DataGuard.body(permissions: [
                DataGuard.permission("a", transaction: "t1", obtainedAt: "2025-03-01T00:00:00Z"),
                DataGuard.permission("b", transaction: "t2", obtainedAt: "2025-03-01T00:00:00Z"),
            ], sentAt: "2025-03-01T00:00:05Z")
            try await agent.post(effective, body: first)
            // A later item for b arrives by receipt...
            try await agent.post(receipts, body: DataGuard.body(permissions: [
                DataGuard.permission("b", state: "DENIED", transaction: "t4", obtainedAt: "2025-03-05T00:00:00Z")],
                sentAt: "2025-03-05T00:00:05Z"))
            // ...then a late hourly retry of an old snapshot (re-stamped sentAt) that lacks b: b stays.
            let lateRetry = DataGuard.body(permissions: [
                DataGuard.permission("a", transaction: "t1", obtainedAt: "2025-03-01T00:00:00Z")],
                sentAt: "2025-03-06T00:00:00Z")
            try await agent.post(effective, body: lateRetry)
            #expect(try await agent.consents(user: DataGuard.citizen, regulation: nil) == ["a": "granted", "b": "denied"])
            // A newer snapshot without a: a is removed, with history.
            let newer = DataGuard.body(permissions: [
                DataGuard.permission("b", state: "DENIED", transaction: "t4", obtainedAt: "2025-03-05T00:00:00Z"),
                DataGuard.permission("c", transaction: "t5", obtainedAt: "2025-03-07T00:00:00Z"),
            ], sentAt: "2025-03-07T00:00:05Z")
            #expect(try await agent.post(effective, body: newer).outcome == "applied")
            #expect(try await agent.consents(user: DataGuard.citizen, regulation: nil) == ["b": "denied", "c": "granted"])
            let removed = try await agent.count("select count(*)::int from consent.consent_history where item_id = 'a' and status is null")
            #expect(removed == 1)
            // A receipt never removes anything.
            try await agent.post(receipts, body: DataGuard.body(permissions: [
                DataGuard.permission("d", transaction: "t6", obtainedAt: "2025-03-08T00:00:00Z")], sentAt: "2025-03-08T00:00:05Z"))
            #expect(try await agent.consents(user: DataGuard.citizen, regulation: nil).count == 3)
        }
    }

    @Test("a late older receipt does not bring back what a newer snapshot no longer carries; both arrival orders agree")
    func lateReceiptAfterRemoval() async throws {
        try await AgentHarness.run { agent in
            func snapshot(_ citizen: String) -> String {
                DataGuard.body(permissions: [DataGuard.permission("a", transaction: "t-a", obtainedAt: "2025-03-10T00:00:00Z")],
                               sentAt: "2025-03-10T00:00:05Z").replacingOccurrences(of: DataGuard.citizen, with: citizen)
            }
            func receipt(_ citizen: String) -> String {
                DataGuard.body(permissions: [DataGuard.permission("m", transaction: "t-m", obtainedAt: "2025-03-01T00:00:00Z")],
                               preferences: [DataGuard.preference("contact", choices: ["email"], submission: "s-m", updatedAt: "2025-03-01T00:00:01Z")],
                               sentAt: "2025-03-01T00:00:06Z").replacingOccurrences(of: DataGuard.citizen, with: citizen)
            }
            // The receipt first: the snapshot, newer than everything stored, removes what it lacks.
            #expect(try await agent.post(receipts, body: receipt("c-first")).outcome == "applied")
            #expect(try await agent.post(effective, body: snapshot("c-first")).outcome == "applied")
            // The snapshot first: the receipt, provably older, inserts nothing.
            #expect(try await agent.post(effective, body: snapshot("c-late")).outcome == "applied")
            let late = try await agent.post(receipts, body: receipt("c-late"))
            #expect(late.outcome == "stale", "\(late.json)")
            for citizen in ["c-first", "c-late"] {
                #expect(try await agent.consents(user: citizen, regulation: nil) == ["a": "granted"], "\(citizen)")
                #expect(try await agent.count("select count(*)::int from consent.current_preferences where user_id = \(citizen)") == 0)
            }
            // A receipt carrying something newer than that snapshot is applied whole.
            let newer = DataGuard.body(permissions: [DataGuard.permission("m", transaction: "t-m2", obtainedAt: "2025-03-01T00:00:00Z"),
                                                     DataGuard.permission("n", transaction: "t-n", obtainedAt: "2025-03-12T00:00:00Z")],
                                       sentAt: "2025-03-12T00:00:05Z").replacingOccurrences(of: DataGuard.citizen, with: "c-late")
            #expect(try await agent.post(receipts, body: newer).outcome == "applied")
            #expect(try await agent.consents(user: "c-late", regulation: nil) == ["a": "granted", "m": "granted", "n": "granted"])
        }
    }

    @Test("a retry with a re-stamped sentAt does not bring back what a newer snapshot removed, in either order")
    func restampedRetryAfterRemoval() async throws {
        try await AgentHarness.run { agent in
            let itemA = DataGuard.permission("a", transaction: "t1", obtainedAt: "2025-05-01T10:00:00Z")
            let itemB = DataGuard.permission("b", transaction: "t2", obtainedAt: "2025-05-01T11:00:00Z")
            func send(_ path: String, _ citizen: String, _ items: [String], sentAt: String) async -> String? {
                let body = DataGuard.body(permissions: items, sentAt: sentAt).replacingOccurrences(of: DataGuard.citizen, with: citizen)
                do { return try await agent.post(path, body: body).outcome } catch { return "error: \(error)" }
            }
            // The older snapshot, then the newer one without a, then the retry of the older one.
            #expect(await send(effective, "c-in-order", [itemA], sentAt: "2025-05-01T10:00:01Z") == "applied")
            #expect(await send(effective, "c-in-order", [itemB], sentAt: "2025-05-01T11:00:01Z") == "applied")
            #expect(await send(effective, "c-in-order", [itemA], sentAt: "2025-05-01T12:00:00Z") == "duplicate")
            // The first attempt lost: the newer snapshot, then the retry, re-stamped later than it.
            #expect(await send(effective, "c-retried", [itemB], sentAt: "2025-05-01T11:00:01Z") == "applied")
            #expect(await send(effective, "c-retried", [itemA], sentAt: "2025-05-01T12:00:00Z") == "stale")
            // A receipt of the removed item, re-stamped, likewise.
            #expect(await send(receipts, "c-retried", [itemA], sentAt: "2025-05-01T13:00:00Z") == "stale")
            for citizen in ["c-in-order", "c-retried"] {
                let stored = try await agent.consents(user: citizen, regulation: nil)
                #expect(stored == ["b": "granted"], "\(citizen)")
            }
            // A re-grant recorded after that snapshot was sent is applied, even with an earlier obtainedAt.
            let regrant = DataGuard.permission("a", transaction: "t3", obtainedAt: "2025-05-01T09:00:00Z",
                                               recordedAt: "2025-05-01T11:30:00Z")
            #expect(await send(receipts, "c-retried", [regrant], sentAt: "2025-05-01T11:30:01Z") == "applied")
            let regranted = try await agent.consents(user: "c-retried", regulation: nil)
            #expect(regranted == ["a": "granted", "b": "granted"])
            // Only what the snapshot would have removed stays out: an item not older than its sentAt (here
            // a snapshot sent at 10:30 carrying an item of 11:00) would have stayed, so it is applied, in
            // either order.
            let skewed = DataGuard.permission("b", transaction: "s2", obtainedAt: "2025-05-01T11:00:00Z")
            let late = DataGuard.permission("c", transaction: "s3", obtainedAt: "2025-05-01T10:45:00Z")
            #expect(await send(effective, "c-skew-1", [skewed], sentAt: "2025-05-01T10:30:00Z") == "applied")
            #expect(await send(receipts, "c-skew-1", [late], sentAt: "2025-05-01T10:46:00Z") == "applied")
            #expect(await send(receipts, "c-skew-2", [late], sentAt: "2025-05-01T10:46:00Z") == "applied")
            #expect(await send(effective, "c-skew-2", [skewed], sentAt: "2025-05-01T10:30:00Z") == "applied")
            for citizen in ["c-skew-1", "c-skew-2"] {
                let kept = try await agent.consents(user: citizen, regulation: nil)
                #expect(kept == ["b": "granted", "c": "granted"], "\(citizen)")
            }
        }
    }

    @Test("a snapshot removes missing items only when it is newer than every stored item of the citizen")
    func removalNeedsNewerThanEveryItem() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(effective, body: DataGuard.body(permissions: [
                DataGuard.permission("a", transaction: "t1", obtainedAt: "2025-03-01T00:00:00Z"),
                DataGuard.permission("b", transaction: "t2", obtainedAt: "2025-03-01T00:00:00Z"),
                DataGuard.permission("c", transaction: "t3", obtainedAt: "2025-03-01T00:00:00Z"),
            ], sentAt: "2025-03-01T00:00:05Z"))
            try await agent.post(receipts, body: DataGuard.body(permissions: [
                DataGuard.permission("c", state: "DENIED", transaction: "t4", obtainedAt: "2025-03-20T00:00:00Z")],
                sentAt: "2025-03-20T00:00:05Z"))
            // Newer than b, but not than the stored c: it lacks b, yet removes nothing; its newer a applies.
            let partial = try await agent.post(effective, body: DataGuard.body(permissions: [
                DataGuard.permission("a", state: "DENIED", transaction: "t5", obtainedAt: "2025-03-05T00:00:00Z"),
                DataGuard.permission("c", transaction: "t3", obtainedAt: "2025-03-01T00:00:00Z"),
            ], sentAt: "2025-03-21T00:00:00Z"))
            #expect(partial.outcome == "applied")
            #expect(try await agent.consents(user: DataGuard.citizen, regulation: nil) == ["a": "denied", "b": "granted", "c": "denied"])
        }
    }

    @Test("an expired validUntil keeps the row with its status, in_force false; consents_as_of sees it in force before")
    func expiredValidity() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(effective, body: DataGuard.body(permissions: [
                DataGuard.permission("a", transaction: "t1", obtainedAt: "2024-01-01T00:00:00Z", validUntil: "2024-06-01T00:00:00Z")],
                sentAt: "2024-01-01T00:00:05Z"))
            let now = try await agent.scalar("select status || ':' || in_force from consent.current_consents where purpose_id = 'a'", as: String.self)
            #expect(now == "granted:false")
            let then = try await agent.scalar("""
                select status || ':' || in_force from consent.consents_as_of('2024-03-01T00:00:00Z') where purpose_id = 'a'
                """, as: String.self)
            #expect(then == "granted:true")
        }
    }

    @Test("invalid input: 400 naming the field, kept", arguments: [
        ("not json", "not valid JSON"),
        (#"{"citizenId": "c", "permissions": []}"#, "'applicationId'"),
        (#"{"applicationId": "a", "citizenId": "c"}"#, "'permissions'"),
        (#"{"applicationId": "a", "citizenId": "c", "permissions": [{"optionId": "o", "justification": "consent", "state": "GRANTED", "recordedAt": "2025-01-01T00:00:00Z"}]}"#, "'permissions[0].transactionId'"),
        (#"{"applicationId": "a", "citizenId": "c", "permissions": [{"transactionId": "t", "optionId": "o", "justification": "consent", "state": "GRANTED", "recordedAt": "last week"}]}"#, "'permissions[0].recordedAt'"),
        (#"{"applicationId": "a", "citizenId": "c", "permissions": [{"transactionId": "t", "optionId": "o", "justification": "consent", "state": 3, "recordedAt": "2025-01-01T00:00:00Z"}]}"#, "'permissions[0].state'"),
        (#"{"applicationId": "a", "citizenId": "c", "permissions": [], "preferences": [{"preference": "p", "choices": [], "updatedAt": 5}]}"#, "'preferences[0].updatedAt'"),
        // A full state without its preference list would remove every stored preference.
        (#"{"applicationId": "a", "citizenId": "c", "permissions": []}"#, "'preferences'"),
        (#"{"applicationId": "a", "citizenId": "c", "permissions": [], "preferences": null}"#, "'preferences'"),
        // A preference's choices are its whole selection: without them it would clear the stored one.
        (#"{"applicationId": "a", "citizenId": "c", "permissions": [], "preferences": [{"preference": "p", "updatedAt": "2025-01-01T00:00:00Z"}]}"#, "'preferences[0].choices' is missing"),
        (#"{"applicationId": "a", "citizenId": "c", "permissions": [], "preferences": [{"preference": "p", "choices": null, "updatedAt": "2025-01-01T00:00:00Z"}]}"#, "'preferences[0].choices' is missing"),
        (#"{"applicationId": 7, "citizenId": "c", "permissions": [], "preferences": []}"#, "'applicationId' must be a string, got number"),
        (#"{"applicationId": "a", "citizenId": "c", "permissions": [], "preferences": [{"preference": "p", "choices": [], "submissionId": "s\u0000", "updatedAt": "2025-01-01T00:00:00Z"}]}"#, "'preferences[0].submissionId' contains a NUL"),
    ])
    func invalidInput(body: String, names: String) async throws {
        try await AgentHarness.run { agent in
            let reply = try await agent.post(effective, body: body)
            #expect(reply.status == .badRequest)
            #expect(reply.message?.contains(names) == true, "\(reply.message ?? "")")
            #expect(try await agent.count("select count(*)::int from consent.deliveries where outcome = 'failed'") == 1)
            #expect(try await agent.count("select count(*)::int from consent.consents") == 0)
        }
    }

    @Test("an unknown state or justification is stored, not applied, answered 200")
    func unknownStateStored() async throws {
        try await AgentHarness.run { agent in
            let unknownState = DataGuard.body(permissions: [DataGuard.permission("a", state: "WITHDRAWN", transaction: "t1", obtainedAt: "2025-03-01T00:00:00Z")],
                                              sentAt: "2025-03-01T00:00:05Z")
            let reply = try await agent.post(effective, body: unknownState)
            #expect(reply.status == .ok)
            #expect(reply.outcome == "stored")
            let unknownBasis = DataGuard.body(permissions: [DataGuard.permission("a", justification: "soft-opt-in", transaction: "t1", obtainedAt: "2025-03-01T00:00:00Z")],
                                              sentAt: "2025-03-01T00:00:05Z")
            #expect(try await agent.post(receipts, body: unknownBasis).outcome == "stored")
            // A pair DataGuard does not define (DOMAIN §3.5) is kept too, never shown as in force.
            for (basis, state) in [("consent", "CLAIMED"), ("legitimate-interest", "GRANTED"), ("contract", "DENIED")] {
                let pair = DataGuard.body(permissions: [DataGuard.permission("a", state: state, justification: basis, transaction: "t-\(state)",
                                                                             obtainedAt: "2025-03-02T00:00:00Z")],
                                          sentAt: "2025-03-02T00:00:05Z")
                let kept = try await agent.post(receipts, body: pair)
                #expect(kept.outcome == "stored", "\(basis) \(state): \(kept.json)")
            }
            // A receipt's preference without choices (DataGuard does not document receipts) is kept too.
            let noChoices = #"{"applicationId": "a", "citizenId": "c", "permissions": [], "preferences": [{"preference": "p", "updatedAt": "2025-01-01T00:00:00Z"}]}"#
            let keptPreference = try await agent.post(receipts, body: noChoices)
            #expect(keptPreference.outcome == "stored", "\(keptPreference.json)")
            #expect(try await agent.count("select count(*)::int from consent.consents") == 0)
            #expect(try await agent.count("select count(*)::int from consent.preferences") == 0)
            #expect(try await agent.count("select count(*)::int from consent.deliveries where outcome = 'stored' and reason like 'unknown%'") == 6)
            #expect(try await agent.count("select count(*)::int from consent.deliveries where reason like '%state ''CLAIMED'' with justification ''consent''%'") == 1)
        }
    }

    @Test("no recorded state (justification and state null): no permission in a snapshot, kept from a receipt")
    func noRecordedState() async throws {
        try await AgentHarness.run { agent in
            let none = #"{"transactionId": null, "optionType": "option", "optionId": "a", "justification": null, "state": null, "recordedAt": null}"#
            let first = DataGuard.body(permissions: [DataGuard.permission("a", transaction: "t1", obtainedAt: "2025-03-01T00:00:00Z"),
                                                     DataGuard.permission("b", transaction: "t2", obtainedAt: "2025-03-01T00:00:00Z")],
                                       sentAt: "2025-03-01T00:00:05Z")
            #expect(try await agent.post(effective, body: first).outcome == "applied")
            let later = DataGuard.body(permissions: [none, DataGuard.permission("b", transaction: "t2", obtainedAt: "2025-03-01T00:00:00Z")],
                                       sentAt: "2025-03-02T00:00:00Z")
            let reply = try await agent.post(effective, body: later)
            #expect(reply.status == .ok)
            #expect(reply.outcome == "applied")
            #expect(try await agent.consents(user: DataGuard.citizen, regulation: nil) == ["b": "granted"])

            let receipt = DataGuard.body(permissions: [none], sentAt: "2025-03-03T00:00:00Z")
            let kept = try await agent.post(receipts, body: receipt)
            #expect(kept.status == .ok)
            #expect(kept.outcome == "stored")
            #expect(try await agent.count("select count(*)::int from consent.deliveries where outcome = 'stored' and reason like '%without a justification%'") == 1)
            let stateOnly = #"{"transactionId": "t9", "optionId": "a", "justification": null, "state": "GRANTED", "recordedAt": "2025-03-04T00:00:00Z"}"#
            #expect(try await agent.post(effective, body: DataGuard.body(permissions: [stateOnly], sentAt: "2025-03-04T00:00:05Z")).outcome == "stored")
            #expect(try await agent.consents(user: DataGuard.citizen, regulation: nil) == ["b": "granted"])
        }
    }

    @Test("a citizen email lands in the outbox once, answered stored")
    func citizenEmail() async throws {
        try await AgentHarness.run { agent in
            let body = try fixture("citizen-email.SPECULATIVE.json")
            let reply = try await agent.post(emails, body: body)
            #expect(reply.status == .ok)
            #expect(reply.outcome == "stored")
            #expect(try await agent.post(emails, body: body).outcome == "duplicate")
            let row = try await agent.scalar("select email_type || ':' || status from consent.citizen_emails", as: String.self)
            #expect(row == "double-opt-in:pending")
            #expect(try await agent.post(emails, body: "[1]").status == .badRequest)
            #expect(try await agent.count("select count(*)::int from consent.consents") == 0)
            // Numbers where ids belong, and a NUL PostgreSQL cannot store: clear answers, the body kept,
            // and the agent goes on serving.
            #expect(try await agent.post(emails, body: #"{"applicationId":1e20,"citizenId":-1e19}"#).outcome == "stored")
            // A NUL in free text (jsonb cannot hold it) is stored as U+FFFD; the raw body keeps it.
            let nul = try await agent.post(emails, body: #"{"applicationId":"a","note":"x\u0000y"}"#)
            #expect(nul.outcome == "stored", "\(nul.json)")
            let note = try await agent.scalar("select payload->>'note' from consent.citizen_emails where payload ? 'note'", as: String.self)
            #expect(note == "x\u{FFFD}y")
            #expect(try await agent.post(emails, body: body).outcome == "duplicate")
        }
    }
}
