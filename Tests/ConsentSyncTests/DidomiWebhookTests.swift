import ConsentCore
import ConsentServer
import ConsentStore
import Foundation
import PostgresNIO
import Testing

/// PRODUCT §2 and §4 for Didomi, through the real HTTP endpoint into a real PostgreSQL.
@Suite("Didomi webhooks")
struct DidomiWebhookTests {
    let nested = "didomi/webhooks/nested/"

    @Test("user.created stores the user, purposes (consent and LI), vendors and preferences")
    func userCreated() async throws {
        try await AgentHarness.run { agent in
            try await agent.postFixture(nested + "user.created.json")
            #expect(try await agent.consents(user: Users.bob) == ["analytics": "granted", "geolocation_data": "denied"])
            let vendors = try await agent.count("""
                select count(*)::int from consent.current_vendor_consents
                 where user_id = \(Users.bob) and ((vendor_id = 'google' and status = 'granted')
                    or (vendor_id = 'c:acme-crm-Hq3bV2' and status = 'denied'))
                """)
            #expect(vendors == 2)
            let user = try await agent.scalar("""
                select external_ref || ':' || version from consent.current_users where user_id = \(Users.bob)
                """, as: String.self)
            #expect(user == "bob@example.com:1")
        }
    }

    @Test("user.updated replaces the regulation's state; absent purposes no longer count")
    func userUpdatedReplaces() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(body: Didomi.user(version: 1, updatedAt: "2025-01-01T00:00:00Z",
                                                   purposes: #"[{"id":"a","enabled":true},{"id":"b","enabled":true,"enabled_li":false}]"#))
            try await agent.post(body: Didomi.user(version: 2, updatedAt: "2025-01-02T00:00:00Z",
                                                   purposes: #"[{"id":"a","enabled":false}]"#))
            #expect(try await agent.consents(user: "u-1") == ["a": "denied"])
            // The history records the removal, caused by the snapshot.
            let removed = try await agent.count("""
                select count(*)::int from consent.consent_history
                 where user_id = 'u-1' and item_id = 'b' and status is null and cause = 'didomi:user:u-1@v2'
                """)
            #expect(removed == 2)
        }
    }

    @Test("the fixture walk: event.created, user.updated, event.updated with a proof, event.deleted, user.deleted")
    func fixtureWalk() async throws {
        try await AgentHarness.run { agent in
            try await agent.postFixture(nested + "event.created.json")
            #expect(try await agent.consents(user: Users.alice) == ["newsletter": "granted", "sms_offers": "denied"])
            #expect(try await agent.preferences(user: Users.alice) == [
                "newsletter/topics-Xk29": ["tech-8a1f", "travel-3c9d"], "newsletter/frequency-q3P1": ["weekly-11aa"],
            ])
            try await agent.postFixture(nested + "user.updated.json")
            #expect(try await agent.consents(user: Users.alice) == [
                "newsletter": "granted", "sms_offers": "denied", "analytics": "granted", "geolocation_data": "denied",
            ])
            // A proof attached to an already-confirmed event changes no state.
            let before = try await agent.count("select count(*)::int from consent.consent_history")
            try await agent.postFixture(nested + "event.updated.json")
            #expect(try await agent.count("select count(*)::int from consent.consent_history") == before)
            let proofs = try await agent.scalar("""
                select array_to_string(proofs_id, ',') from consent.didomi_events where event_id = '9b2d7c1e-5a44-4f0e-8f6b-2c1d3e4f5a60'
                """, as: String.self)
            #expect(proofs == "prf-7e31c0d9a2")

            try await agent.postFixture(nested + "user.created.json")
            try await agent.postFixture(nested + "event.deleted.json")
            let deleted = try await agent.scalar("""
                select deleted from consent.didomi_events where event_id = '0c4f6a2b-19d3-4e7a-8b55-a3f9e1d27c18'
                """, as: Bool.self)
            #expect(deleted == true)
            #expect(try await agent.consents(user: Users.bob) == ["analytics": "granted", "geolocation_data": "denied"])

            try await agent.postFixture(nested + "user.deleted.json")
            let carol = try await agent.scalar("""
                select coalesce(external_ref, '<cleared>') || ' ' || (deleted_at is not null)
                  from consent.current_users where user_id = \(Users.carol)
                """, as: String.self)
            #expect(carol == "<cleared> true")
        }
    }

    @Test("a flattened body is un-flattened and gives the same state as the nested one")
    func flattened() async throws {
        try await AgentHarness.run { agent in
            try await agent.postFixture("didomi/webhooks/flattened/event.created.flattened.json")
            #expect(try await agent.consents(user: Users.alice) == ["newsletter": "granted", "sms_offers": "denied"])
            #expect(try await agent.preferences(user: Users.alice)["newsletter/topics-Xk29"] == ["tech-8a1f", "travel-3c9d"])
            // The nested twin of the same event is a duplicate (same event id).
            try await agent.postFixture(nested + "event.created.json", expect: "duplicate")
            try await agent.postFixture("didomi/webhooks/flattened/user.updated.flattened.json")
            #expect(try await agent.consents(user: Users.alice) == [
                "newsletter": "granted", "sms_offers": "denied", "analytics": "granted", "geolocation_data": "denied",
            ])
        }
    }

    @Test("a flattened user snapshot without vendor lists leaves the stored vendors alone")
    func flattenedKeepsVendors() async throws {
        try await AgentHarness.run { agent in
            try await agent.postFixture(nested + "user.updated.json")
            try await agent.post(body: """
                {"type": "user.updated", "parameters__entity__id": "\(Users.alice)",
                 "parameters__entity__organization_id": "acme-retail", "parameters__entity__version": 9,
                 "parameters__entity__updated_at": "2025-04-01T00:00:00Z",
                 "parameters__entity__consents__purposes__analytics__enabled": false}
                """)
            #expect(try await agent.consents(user: Users.alice) == ["analytics": "denied"])
            let vendors = try await agent.count("select count(*)::int from consent.current_vendor_consents where user_id = \(Users.alice)")
            #expect(vendors == 2)
        }
    }

    @Test("a pending event changes nothing until confirmed; the confirmation applies at its updated_at")
    func pendingThenConfirmed() async throws {
        try await AgentHarness.run { agent in
            let sequence = "didomi/webhooks/pending-sequence/"
            try await agent.postFixture(sequence + "01-event.created.pending.json")
            #expect(try await agent.consents(user: Users.dave).isEmpty)
            #expect(try await agent.count("select count(*)::int from consent.current_users where user_id = \(Users.dave)") == 0)
            try await agent.postFixture(sequence + "02-user.created.json")
            #expect(try await agent.consents(user: Users.dave).isEmpty)
            try await agent.postFixture(sequence + "03-event.updated.confirmed.json")
            #expect(try await agent.consents(user: Users.dave) == ["newsletter": "granted"])
            let changedAt = try await agent.scalar("""
                select to_char(changed_at at time zone 'UTC', 'HH24:MI:SS.MS') from consent.current_consents
                 where user_id = \(Users.dave) and purpose_id = 'newsletter'
                """, as: String.self)
            #expect(changedAt == "20:19:02.774")
            try await agent.postFixture(sequence + "04-user.updated.json")
            #expect(try await agent.consents(user: Users.dave) == ["newsletter": "granted"])
            #expect(try await agent.preferences(user: Users.dave) == ["newsletter/topics-Xk29": ["food-77e2"]])
        }
    }

    @Test("without updated_at, a proof update that arrives before the confirmation does not hide it as a duplicate")
    func confirmationAfterProofUpdate() async throws {
        func undated(_ body: String) -> String {
            body.replacingOccurrences(of: #""updated_at": "[^"]*",\s*"#, with: "", options: .regularExpression)
        }
        let proof = undated(Didomi.event("event.updated", id: "ev-p", createdAt: "2025-03-06T00:00:00Z", oldStatus: "confirmed",
                                         purposes: #"[{"id":"a","enabled":true}]"#))
        let confirmation = undated(Didomi.event("event.updated", id: "ev-p", createdAt: "2025-03-06T00:00:00Z",
                                                purposes: #"[{"id":"a","enabled":true}]"#))
        let pending = undated(Didomi.event(id: "ev-p", createdAt: "2025-03-06T00:00:00Z", status: "pending_approval",
                                           purposes: #"[{"id":"a","enabled":true}]"#))
        #expect(![pending, proof, confirmation].contains { $0.contains("updated_at") })
        try await AgentHarness.run { agent in
            try await agent.post(body: pending)
            let first = try await agent.post(body: proof)
            #expect(first.outcome == "applied" && first.json["reason"].map { "\($0)".contains("already-confirmed") } == true, "\(first.json)")
            #expect(try await agent.consents(user: "u-1").isEmpty)
            let second = try await agent.post(body: confirmation)
            #expect(second.outcome == "applied", "\(second.json)")
            #expect(try await agent.consents(user: "u-1") == ["a": "granted"])
            #expect(try await agent.post(body: confirmation).outcome == "duplicate")
        }
    }

    @Test("a pending event for an existing user leaves its state unchanged")
    func pendingExistingUser() async throws {
        try await AgentHarness.run { agent in
            try await agent.postFixture(nested + "user.updated.json")
            let before = try await agent.consents(user: Users.alice)
            try await agent.postFixture("didomi/webhooks/pending-existing-user/01-event.created.pending.json")
            #expect(try await agent.consents(user: Users.alice) == before)
            try await agent.postFixture("didomi/webhooks/pending-existing-user/02-event.updated.confirmed.json")
            #expect(try await agent.consents(user: Users.alice)["sms_offers"] == "granted")
            try await agent.postFixture("didomi/webhooks/pending-existing-user/03-user.updated.json")
            #expect(try await agent.consents(user: Users.alice)["sms_offers"] == "granted")
        }
    }

    @Test("a stale user.updated after a newer one is recorded as stale and changes nothing")
    func staleSnapshot() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(body: Didomi.user(version: 5, updatedAt: "2025-03-05T00:00:00Z",
                                                   purposes: #"[{"id":"a","enabled":true}]"#))
            let reply = try await agent.post(body: Didomi.user(version: 4, updatedAt: "2025-03-04T00:00:00Z",
                                                               purposes: #"[{"id":"a","enabled":false}]"#))
            #expect(reply.status == .ok)
            #expect(reply.outcome == "stale")
            #expect(try await agent.consents(user: "u-1") == ["a": "granted"])
            #expect(try await agent.scalar("select version from consent.current_users where user_id = 'u-1'", as: Int64.self) == 5)
            let recorded = try await agent.count("select count(*)::int from consent.deliveries where outcome = 'stale'")
            #expect(recorded == 1)
        }
    }

    @Test("users are ordered by version first: a higher version dated before the stored one replaces its state, in either order and inside one batch")
    func versionBeforeTime() async throws {
        @Sendable func v3(_ user: String) -> String {
            Didomi.user(id: user, version: 3, updatedAt: "2025-03-20T00:00:00Z", purposes: #"[{"id":"a","enabled":true},{"id":"b","enabled":true}]"#)
        }
        @Sendable func v4(_ user: String) -> String {
            Didomi.user(id: user, version: 4, updatedAt: "2025-03-14T00:00:00Z", purposes: #"[{"id":"a","enabled":false}]"#)
        }
        try await AgentHarness.run { agent in
            let first = [try await agent.post(body: v3("o-1")), try await agent.post(body: v4("o-1"))]
            #expect(first.map(\.outcome) == ["applied", "applied"])
            #expect((first[1].json["reason"] as? String)?.contains("applied as of") == true, "\(first[1].json)")
            let second = [try await agent.post(body: v4("o-2")), try await agent.post(body: v3("o-2"))]
            #expect(second.map(\.outcome) == ["applied", "stale"])
            let store = ConsentStore(client: agent.db, logger: TestDatabase.logger, timeout: .seconds(10))
            _ = try await store.apply([ApplyPathTests.pending(v3("o-3")), ApplyPathTests.pending(v4("o-3"))])
            _ = try await store.apply([ApplyPathTests.pending(v4("o-4")), ApplyPathTests.pending(v3("o-4"))])
            for user in ["o-1", "o-2", "o-3", "o-4"] {
                // v4's state: b, which it no longer lists, is gone; version 4; the history agrees.
                #expect(try await agent.consents(user: user) == ["a": "denied"], "\(user)")
                #expect(try await agent.scalar("select version from consent.current_users where user_id = \(user)", as: Int64.self) == 4)
                let asOf = try await agent.scalar("""
                    select string_agg(purpose_id || '=' || status, ',' order by purpose_id)
                      from consent.consents_as_of(now()) where user_id = \(user)
                    """, as: String.self)
                #expect(asOf == "a=denied", "\(user)")
            }
            // An event after the state it replaced still applies.
            let event = try await agent.post(body: Didomi.event(id: "ev-v", user: "o-1", createdAt: "2025-03-22T00:00:00Z",
                                                                purposes: #"[{"id":"c","enabled":true}]"#))
            #expect(event.outcome == "applied")
            #expect(try await agent.consents(user: "o-1") == ["a": "denied", "c": "granted"])

            // Versions may start again after a deletion: a late higher version dated before the deletion
            // does not revive what the deletion removed (only a snapshot newer than it does).
            try await agent.post(body: Didomi.user(id: "o-5", version: 3, updatedAt: "2025-03-03T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#))
            try await agent.post(body: Didomi.deleted(id: "o-5", version: 4, updatedAt: "2025-03-10T00:00:00Z"))
            try await agent.post(body: Didomi.user(id: "o-5", version: 1, updatedAt: "2025-03-12T00:00:00Z", purposes: #"[{"id":"b","enabled":true}]"#))
            let beforeDeletion = try await agent.post(body: Didomi.user(id: "o-5", version: 2, updatedAt: "2025-03-02T00:00:00Z",
                                                                        purposes: #"[{"id":"a","enabled":true}]"#))
            #expect(beforeDeletion.outcome == "stale", "\(beforeDeletion.json)")
            #expect(try await agent.consents(user: "o-5") == ["b": "granted"])
        }
    }

    @Test("the same delivery twice is applied once")
    func duplicate() async throws {
        try await AgentHarness.run { agent in
            let first = try await agent.postFixture(nested + "user.updated.json")
            let second = try await agent.postFixture(nested + "user.updated.json", expect: "duplicate")
            #expect(first.deliveryID != second.deliveryID)
            #expect(try await agent.count("select count(*)::int from consent.user_snapshots") == 1)
            let history = try await agent.count("select count(*)::int from consent.consent_history where delivery_id = \(second.deliveryID!)")
            #expect(history == 0)
            #expect(try await agent.count("select count(*)::int from consent.deliveries") == 2)
        }
    }

    @Test("a cpra delivery never touches gdpr state, and versions are compared per regulation")
    func regulationsAreSeparate() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(body: Didomi.user(version: 3, updatedAt: "2025-03-03T00:00:00Z",
                                                   purposes: #"[{"id":"a","enabled":true}]"#))
            let cpra = try await agent.post(body: Didomi.user(version: 2, updatedAt: "2025-03-04T00:00:00Z",
                                                              purposes: #"[{"id":"a","enabled":false}]"#, regulation: "cpra"))
            #expect(cpra.outcome == "applied")
            try await agent.post(body: Didomi.event(id: "ev-cpra", createdAt: "2025-03-05T00:00:00Z",
                                                    purposes: #"[{"id":"b","enabled":true}]"#, regulation: "cpra"))
            #expect(try await agent.consents(user: "u-1", regulation: "gdpr") == ["a": "granted"])
            #expect(try await agent.consents(user: "u-1", regulation: "cpra") == ["a": "denied", "b": "granted"])
        }
    }

    @Test("user.deleted removes state in every regulation; a late older update cannot revive; a newer one does")
    func deleteThenLateUpdate() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(body: Didomi.user(version: 3, updatedAt: "2025-03-03T00:00:00Z",
                                                   purposes: #"[{"id":"a","enabled":true}]"#))
            try await agent.post(body: Didomi.user(version: 1, updatedAt: "2025-03-03T00:00:00Z",
                                                   purposes: #"[{"id":"a","enabled":true}]"#, regulation: "cpra"))
            let delete = try await agent.post(body: Didomi.deleted(version: 4, updatedAt: "2025-03-10T00:00:00Z"))
            #expect(delete.outcome == "applied")
            #expect(try await agent.consents(user: "u-1").isEmpty)
            #expect(try await agent.consents(user: "u-1", regulation: "cpra").isEmpty)

            let late = try await agent.post(body: Didomi.user(version: 2, updatedAt: "2025-03-02T00:00:00Z",
                                                              purposes: #"[{"id":"a","enabled":true}]"#))
            #expect(late.outcome == "stale")
            let lateEvent = try await agent.post(body: Didomi.event(id: "ev-late", createdAt: "2025-03-11T00:00:00Z",
                                                                    purposes: #"[{"id":"a","enabled":true}]"#))
            #expect(lateEvent.outcome == "stale")
            #expect(try await agent.consents(user: "u-1").isEmpty)
            let ref = try await agent.scalar("select coalesce(external_ref, '-') from consent.current_users where user_id = 'u-1'", as: String.self)
            #expect(ref == "-")
            // History stays: it is the audit trail.
            #expect(try await agent.count("select count(*)::int from consent.consent_history where user_id = 'u-1'") >= 4)

            let revived = try await agent.post(body: Didomi.user(version: 1, updatedAt: "2025-03-12T00:00:00Z",
                                                                 purposes: #"[{"id":"a","enabled":false}]"#))
            #expect(revived.outcome == "applied")
            #expect(try await agent.consents(user: "u-1") == ["a": "denied"])
            #expect(try await agent.scalar("select deleted_at is null from consent.current_users where user_id = 'u-1'", as: Bool.self) == true)
        }
    }

    /// Deliveries for one user in every sampled arrival order (one user per order, several orders at
    /// once); each order must end in `expected`, and consents_as_of(now()) must agree with current state.
    /// `then` is posted after each order, in its own order.
    private func everyOrder(_ deliveries: [@Sendable (String) -> String], sample every: Int,
                            then tail: [@Sendable (String) -> String] = [],
                            expected: String, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        var orders: [[Int]] = []
        func permute(_ prefix: [Int], _ rest: [Int]) {
            if rest.isEmpty { orders.append(prefix); return }
            for (i, next) in rest.enumerated() {
                var remaining = rest; remaining.remove(at: i)
                permute(prefix + [next], remaining)
            }
        }
        permute([], Array(deliveries.indices))
        let sampled = stride(from: 0, to: orders.count, by: every).map { orders[$0] }
        try await AgentHarness.run { agent in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (n, order) in sampled.enumerated() {
                    group.addTask {
                        for delivery in order.map({ deliveries[$0] }) + tail {
                            let reply = try await agent.post(body: delivery("o-\(n)"))
                            #expect(reply.status == .ok, "\(reply.json)", sourceLocation: sourceLocation)
                        }
                    }
                    if n % 8 == 7 { try await group.next() }
                }
                try await group.waitForAll()
            }
            for (n, order) in sampled.enumerated() {
                let user = "o-\(n)"
                /// One user's rows of a view as `regulation/item/detail=value@MM-DD`, sorted.
                func rows(_ relation: String, item: String, detail: String, value: String) async throws -> String {
                    try await agent.scalar("""
                        select coalesce(string_agg(format('%s/%s/%s=%s@%s', regulation, \(unescaped: item), \(unescaped: detail),
                                                          \(unescaped: value), to_char(changed_at at time zone 'UTC', 'MM-DD')), ' '
                                                   order by regulation, \(unescaped: item), \(unescaped: detail)), '')
                          from \(unescaped: relation) where user_id = \(user)
                        """, as: String.self) ?? "?"
                }
                let consents = try await rows("consent.current_consents", item: "purpose_id", detail: "lawful_basis", value: "status")
                let vendors = try await rows("consent.current_vendor_consents", item: "'vendor:' || vendor_id", detail: "lawful_basis", value: "status")
                let preferences = try await rows("consent.current_preferences", item: "purpose_id", detail: "preference_id",
                                                 value: "array_to_string(value_ids, ',')")
                let live = try await agent.scalar("""
                    select case when deleted_at is null then 'live' else 'deleted' end from consent.current_users where user_id = \(user)
                    """, as: String.self) ?? "none"
                let state = [consents, vendors, preferences, live].filter { !$0.isEmpty }.joined(separator: " | ")
                #expect(state == expected, "order \(order)", sourceLocation: sourceLocation)
                let asOf = try await rows("consent.consents_as_of(now())", item: "purpose_id", detail: "lawful_basis", value: "status")
                #expect(asOf == consents, "consents_as_of(now()) against current_consents, order \(order)", sourceLocation: sourceLocation)
            }
        }
    }

    @Test("a deletion rules after a revival: a late delivery older than it is stale in every regulation, and a deletion older than another regulation's snapshot still removes the older state; every arrival order agrees")
    func deletionHorizon() async throws {
        try await everyOrder([
            { Didomi.user(id: $0, version: 3, updatedAt: "2025-03-03T00:00:00Z", purposes: #"[{"id":"a","enabled":true},{"id":"k","enabled":true}]"#) },
            { Didomi.user(id: $0, version: 1, updatedAt: "2025-03-03T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#, regulation: "cpra") },
            { Didomi.deleted(id: $0, version: 4, updatedAt: "2025-03-10T00:00:00Z") },
            // k is restated unchanged: whichever comes first, it counts from this snapshot, not from before the deletion.
            { Didomi.user(id: $0, version: 5, updatedAt: "2025-03-12T00:00:00Z", purposes: #"[{"id":"a","enabled":false},{"id":"k","enabled":true}]"#) },
            { Didomi.user(id: $0, version: 2, updatedAt: "2025-03-05T00:00:00Z", purposes: #"[{"id":"b","enabled":true}]"#, regulation: "cpra") },
            { Didomi.event(id: "ev-old", user: $0, createdAt: "2025-03-06T00:00:00Z", purposes: #"[{"id":"e","enabled":true}]"#, regulation: "cpra") },
        ], sample: 7, expected: "gdpr/a/consent=denied@03-12 gdpr/k/consent=granted@03-12 | live")

        try await AgentHarness.run { agent in
            try await agent.post(body: Didomi.user(version: 1, updatedAt: "2025-03-03T00:00:00Z",
                                                   purposes: #"[{"id":"a","enabled":true}]"#, regulation: "cpra"))
            try await agent.post(body: Didomi.user(version: 5, updatedAt: "2025-03-12T00:00:00Z",
                                                   purposes: #"[{"id":"a","enabled":false}]"#))
            let delete = try await agent.post(body: Didomi.deleted(version: 4, updatedAt: "2025-03-10T00:00:00Z"))
            #expect(delete.outcome == "applied")
            #expect((delete.json["reason"] as? String)?.contains("restated after this deletion") == true, "\(delete.json)")
            let late = try await agent.post(body: Didomi.event(id: "ev-late", createdAt: "2025-03-09T00:00:00Z",
                                                               purposes: #"[{"id":"c","enabled":true}]"#, regulation: "cpra"))
            #expect(late.outcome == "stale")
            #expect((late.json["reason"] as? String)?.contains("not newer than the user's deletion") == true, "\(late.json)")
            // Between the deletion and the revival (the gdpr snapshot), the user was deleted.
            let between = try await agent.post(body: Didomi.event(id: "ev-between", createdAt: "2025-03-11T00:00:00Z",
                                                                  purposes: #"[{"id":"c","enabled":false}]"#, regulation: "cpra"))
            #expect(between.outcome == "stale")
            #expect((between.json["reason"] as? String)?.contains("while the user was deleted") == true, "\(between.json)")
            // After the revival, a cpra event applies to the revived user.
            let after = try await agent.post(body: Didomi.event(id: "ev-after", createdAt: "2025-03-13T00:00:00Z",
                                                                purposes: #"[{"id":"c","enabled":true}]"#, regulation: "cpra"))
            #expect(after.outcome == "applied", "\(after.json)")
            #expect(try await agent.consents(user: "u-1", regulation: "cpra") == ["c": "granted"])
            #expect(try await agent.consents(user: "u-1") == ["a": "denied"])
            let user = try await agent.scalar("""
                select coalesce(external_ref, '-') || ' ' || version || ' ' || (deleted_at is null)
                  from consent.current_users where user_id = 'u-1'
                """, as: String.self)
            #expect(user == "u1@example.com 5 true")
        }
    }

    @Test("an event between a deletion and the snapshot that revives the user does not count, in any regulation and any arrival order")
    func eventsWhileDeleted() async throws {
        try await everyOrder([
            { Didomi.user(id: $0, version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#) },
            { Didomi.user(id: $0, version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"x","enabled":true}]"#, regulation: "cpra") },
            { Didomi.deleted(id: $0, version: 2, updatedAt: "2025-03-10T00:00:00Z") },
            // The revival: a restated unchanged, so it counts from here.
            { Didomi.user(id: $0, version: 3, updatedAt: "2025-03-12T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#) },
            { Didomi.event(id: "ev-cpra", user: $0, createdAt: "2025-03-11T00:00:00Z",
                           purposes: #"[{"id":"y","enabled":true,"values":{"topics":{"value":"food"}}}]"#, regulation: "cpra") },
            { Didomi.event(id: "ev-gdpr", user: $0, createdAt: "2025-03-11T00:00:00Z", purposes: #"[{"id":"b","enabled":true}]"#) },
        ], sample: 7, expected: "gdpr/a/consent=granted@03-12 | live")
    }

    @Test("the revival is the earliest snapshot after the deletion, in any regulation and arrival order; a late deletion keeps no vendor row its revival did not restate")
    func revivalAcrossRegulations() async throws {
        try await everyOrder([
            { Didomi.deleted(id: $0, version: 1, updatedAt: "2025-03-10T00:00:00Z") },
            { Didomi.user(id: $0, version: 3, updatedAt: "2025-03-13T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#) },
            { Didomi.user(id: $0, version: 2, updatedAt: "2025-03-11T00:00:00Z", purposes: #"[{"id":"x","enabled":true}]"#, regulation: "cpra") },
        ], sample: 1, then: [
            // After the revival (the cpra snapshot): counts. Between the deletion and it: does not.
            { Didomi.event(id: "ev-after", user: $0, createdAt: "2025-03-12T00:00:00Z", purposes: #"[{"id":"y","enabled":true}]"#, regulation: "cpra") },
            { Didomi.event(id: "ev-between", user: $0, createdAt: "2025-03-10T12:00:00Z", purposes: #"[{"id":"z","enabled":true}]"#, regulation: "cpra") },
        ], expected: "cpra/x/consent=granted@03-11 cpra/y/consent=granted@03-12 gdpr/a/consent=granted@03-13 | live")

        // A vendor granted by an event between the deletion and a snapshot without vendor lists.
        try await everyOrder([
            { Didomi.deleted(id: $0, version: 1, updatedAt: "2025-03-10T00:00:00Z") },
            { Didomi.event(id: "ev-vendor", user: $0, createdAt: "2025-03-11T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#)
                .replacingOccurrences(of: #"{"purposes": [{"id":"a","enabled":true}]}"#,
                                      with: #"{"purposes": [{"id":"a","enabled":true}], "vendors": {"enabled": ["v1"], "disabled": [], "enabled_li": [], "disabled_li": []}}"#) },
            { Didomi.user(id: $0, version: 2, updatedAt: "2025-03-12T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#) },
        ], sample: 1, expected: "gdpr/a/consent=granted@03-12 | live")
    }

    @Test("a deletion that arrives after a newer event removes its row too (only a snapshot revives), and consents_as_of agrees in every order")
    func deletionAfterNewerEvent() async throws {
        try await everyOrder([
            { Didomi.user(id: $0, version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#) },
            { Didomi.event(id: "ev-after", user: $0, createdAt: "2025-03-05T00:00:00Z", purposes: #"[{"id":"b","enabled":true}]"#) },
            { Didomi.deleted(id: $0, version: 2, updatedAt: "2025-03-03T00:00:00Z") },
        ], sample: 1, expected: "deleted")
    }

    @Test("a late deletion removes what was seen at its time, whatever the tie, as a deletion arriving first makes it stale; preferences set after a tombstoning deletion are recorded removed at their time")
    func deletionTiesAndPreferences() async throws {
        // A gdpr snapshot dated exactly at the deletion: stale after it, removed by it when it comes late.
        try await everyOrder([
            { Didomi.user(id: $0, version: 5, updatedAt: "2025-03-10T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#) },
            { Didomi.deleted(id: $0, version: 4, updatedAt: "2025-03-10T00:00:00Z") },
            { Didomi.user(id: $0, version: 1, updatedAt: "2025-03-12T00:00:00Z", purposes: #"[{"id":"c","enabled":true}]"#, regulation: "cpra") },
        ], sample: 1, expected: "cpra/c/consent=granted@03-12 | live")

        try await AgentHarness.run { agent in
            try await agent.post(body: Didomi.event(id: "ev-pref", createdAt: "2025-03-05T00:00:00Z",
                                                    purposes: #"[{"id":"a","enabled":true,"values":{"topics":{"value":"food"}}}]"#))
            #expect(try await agent.preferences(user: "u-1") == ["a/topics": ["food"]])
            try await agent.post(body: Didomi.deleted(version: 2, updatedAt: "2025-03-03T00:00:00Z"))
            #expect(try await agent.preferences(user: "u-1").isEmpty)
            let last = try await agent.scalar("""
                select coalesce(array_to_string(value_ids, ','), 'removed') from consent.preference_changes
                 where user_id = 'u-1' and preference_id = 'topics'
                 order by changed_at desc, change_id desc limit 1
                """, as: String.self)
            #expect(last == "removed")
        }
    }

    @Test("016 gives a user deleted and revived before it its deletion horizon, from the history")
    func horizonBackfill() async throws {
        let all = try TestDatabase.migrator()
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("sql-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        for migration in all.migrations where migration.version < 16 {
            try migration.sql.write(toFile: "\(directory)/\(migration.name)", atomically: true, encoding: .utf8)
        }
        // A database at 015, where a deletion and a revival already happened.
        let admin = try await TestDatabase.shared.adminURL()
        let name = "b_" + UUID().uuidString.prefix(8).lowercased()
        _ = try await TestDatabase.withClient(url: admin) { client in
            try await client.query(PostgresQuery(unsafeSQL: "create database \(name)"))
        }
        let old = TestDatabase.replacingDatabase(in: admin, with: name)
        try await TestDatabase.withClient(url: old) { client in
            try await Migrator(directory: directory).migrate(client: client, logger: TestDatabase.logger)
            let store = ConsentStore(client: client, logger: TestDatabase.logger, timeout: .seconds(10))
            for body in [
                Didomi.user(version: 1, updatedAt: "2025-03-03T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#, regulation: "cpra"),
                Didomi.deleted(version: 2, updatedAt: "2025-03-10T00:00:00Z"),
                Didomi.user(version: 3, updatedAt: "2025-03-12T00:00:00Z", purposes: #"[{"id":"a","enabled":false}]"#),
            ] {
                let change = DidomiDecoder.decode(Data(body.utf8), receivedAt: Date())
                let result = try await store.apply([PendingDelivery(change: change, body: ByteBuffer(string: body))])
                #expect(result.map(\.outcome) == [.applied])
            }
            try await all.migrate(client: client, logger: TestDatabase.logger)
        }
        try await AgentHarness.run(databaseURL: old) { agent in
            let horizon = try await agent.scalar("""
                select coalesce(to_char(last_deleted_at at time zone 'UTC', 'MM-DD'), 'none') from consent.users where user_id = 'u-1'
                """, as: String.self)
            #expect(horizon == "03-10")
            let late = try await agent.post(body: Didomi.user(version: 2, updatedAt: "2025-03-05T00:00:00Z",
                                                              purposes: #"[{"id":"b","enabled":true}]"#, regulation: "cpra"))
            #expect(late.outcome == "stale", "\(late.json)")
            #expect(try await agent.consents(user: "u-1", regulation: "cpra").isEmpty)
        }
    }

    @Test("user.deleted without updated_at is dated at its receipt")
    func deletedAtReceiveTime() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(body: Didomi.user(version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#))
            let reply = try await agent.post(body: #"{"type": "user.deleted", "parameters": {"entity": {"id": "u-1", "organization_id": "org-t"}}}"#)
            #expect(reply.outcome == "applied")
            let recent = try await agent.scalar(
                "select deleted_at > now() - interval '1 minute' from consent.current_users where user_id = 'u-1'", as: Bool.self)
            #expect(recent == true)
            #expect(try await agent.consents(user: "u-1").isEmpty)
        }
    }

    @Test("a confirmed event applies per purpose only when newer than the row; snapshots keep later events")
    func eventsVersusSnapshots() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(body: Didomi.user(version: 2, updatedAt: "2025-03-05T00:00:00Z",
                                                   purposes: #"[{"id":"a","enabled":true},{"id":"b","enabled":true}]"#))
            // Older event: stale.
            let older = try await agent.post(body: Didomi.event(id: "ev-old", createdAt: "2025-03-04T00:00:00Z",
                                                                purposes: #"[{"id":"a","enabled":false}]"#))
            #expect(older.outcome == "stale")
            // Newer event: applied to its purpose only.
            try await agent.post(body: Didomi.event(id: "ev-new", createdAt: "2025-03-06T00:00:00Z",
                                                    purposes: #"[{"id":"b","enabled":false}]"#))
            #expect(try await agent.consents(user: "u-1") == ["a": "granted", "b": "denied"])
            // A newer-version snapshot taken before that event neither overwrites nor removes its row.
            try await agent.post(body: Didomi.user(version: 3, updatedAt: "2025-03-05T12:00:00Z",
                                                   purposes: #"[{"id":"a","enabled":false}]"#))
            #expect(try await agent.consents(user: "u-1") == ["a": "denied", "b": "denied"])
        }
    }

    @Test("an event older than the stored snapshot cannot bring back a purpose the snapshot dropped; a deleted event's late retry changes nothing; both orders agree")
    func lateEventsAfterSnapshot() async throws {
        let snapshot = Didomi.user(version: 3, updatedAt: "2025-03-05T10:05:00Z", purposes: #"[{"id":"q","enabled":true}]"#)
        let late = Didomi.event(id: "ev-late", createdAt: "2025-03-05T10:00:00Z", purposes: #"[{"id":"p","enabled":true}]"#)
        for order in [[late, snapshot], [snapshot, late]] {
            try await AgentHarness.run { agent in
                for body in order { try await agent.post(body: body) }
                #expect(try await agent.consents(user: "u-1") == ["q": "granted"], "order \(order == [late, snapshot] ? "event first" : "snapshot first")")
            }
        }
        try await AgentHarness.run { agent in
            try await agent.post(body: snapshot)
            let reply = try await agent.post(body: late)
            #expect(reply.outcome == "stale")
            #expect(reply.json["reason"].map { "\($0)".contains("not newer than the stored gdpr user state") } == true, "\(reply.json)")

            // event.deleted first, then a late retry of the event's creation (newer than any snapshot).
            try await agent.post(body: Didomi.event("event.deleted", id: "ev-gone", createdAt: "2025-03-06T00:00:00Z",
                                                    purposes: #"[{"id":"r","enabled":true}]"#))
            let retry = try await agent.post(body: Didomi.event(id: "ev-gone", createdAt: "2025-03-06T00:00:00Z",
                                                                purposes: #"[{"id":"r","enabled":true}]"#))
            #expect(retry.outcome == "stale", "\(retry.json)")
            #expect(try await agent.consents(user: "u-1") == ["q": "granted"])
            // A newer event still applies.
            let newer = try await agent.post(body: Didomi.event(id: "ev-next", createdAt: "2025-03-07T00:00:00Z",
                                                                purposes: #"[{"id":"p","enabled":false}]"#))
            #expect(newer.outcome == "applied", "\(newer.json)")
            #expect(try await agent.consents(user: "u-1") == ["q": "granted", "p": "denied"])
        }
    }

    @Test("ties are decided by source-side values, not by arrival order")
    func tiesAreDeterministic() async throws {
        let first = Didomi.event(id: "ev-a", createdAt: "2025-03-06T00:00:00Z", purposes: #"[{"id":"x","enabled":true}]"#)
        let second = Didomi.event(id: "ev-b", createdAt: "2025-03-06T00:00:00Z", purposes: #"[{"id":"x","enabled":false}]"#)
        var results: [String] = []
        for order in [[first, second], [second, first]] {
            try await AgentHarness.run { agent in
                for body in order { try await agent.post(body: body) }
                let status = try await agent.consents(user: "u-1")["x"] ?? "?"
                #expect(status == "denied")  // event id "ev-b" > "ev-a"
            }
            results.append("ok")
        }
        #expect(results.count == 2)
    }

    @Test("concurrent conflicting deliveries for one user end in the newest state")
    func concurrentDeliveries() async throws {
        try await AgentHarness.run { agent in
            for round in 0..<5 {
                let base = round * 10
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for version in (base + 1...base + 10).shuffled() {
                        group.addTask {
                            let reply = try await agent.post(body: Didomi.user(
                                version: version, updatedAt: String(format: "2025-03-01T00:%02d:00Z", version),
                                purposes: "[{\"id\":\"a\",\"enabled\":\(version % 2 == 0)},{\"id\":\"v\(version)\",\"enabled\":true}]"))
                            #expect(reply.status == .ok, "\(reply.message ?? "")")
                        }
                    }
                    try await group.waitForAll()
                }
                let top = base + 10
                #expect(try await agent.consents(user: "u-1") == ["a": "granted", "v\(top)": "granted"])
                #expect(try await agent.scalar("select version from consent.current_users where user_id = 'u-1'", as: Int64.self) == Int64(top))
            }
        }
    }

    @Test("a body that is not JSON gets 400 and is kept")
    func malformedJSON() async throws {
        try await AgentHarness.run { agent in
            let reply = try await agent.post(body: "{\"type\": \"user.updated\", ")
            #expect(reply.status == .badRequest)
            #expect(reply.message?.contains("not valid JSON") == true)
            let kept = try await agent.scalar("""
                select convert_from(body, 'UTF8') from consent.deliveries where id = \(reply.deliveryID ?? -1) and outcome = 'failed'
                """, as: String.self)
            #expect(kept == "{\"type\": \"user.updated\", ")
        }
    }

    @Test("a body of the wrong shape gets 400 naming the field, and is kept with the reason")
    func wrongShape() async throws {
        try await AgentHarness.run { agent in
            let missing = try await agent.post(body: #"{"type": "user.updated", "parameters": {"new_entity": {"id": "u", "organization_id": "o", "updated_at": "2025-01-01T00:00:00Z", "consents": {}}}}"#)
            #expect(missing.status == .badRequest)
            #expect(missing.message == "required field 'parameters.new_entity.version' is missing")
            let badTime = try await agent.post(body: Didomi.user(version: 1, updatedAt: "yesterday", purposes: "[]"))
            #expect(badTime.status == .badRequest)
            #expect(badTime.message?.contains("parameters.new_entity.updated_at") == true)
            // Dates that do not exist are refused by name too (not rolled over into another day).
            for impossible in ["2025-02-30T00:00:00Z", "2025-03-14T25:00:00Z", "2025-03-14T10:61:00.000Z"] {
                let reply = try await agent.post(body: Didomi.user(version: 1, updatedAt: impossible, purposes: "[]"))
                #expect(reply.status == .badRequest, "\(impossible)")
                #expect(reply.message?.contains("parameters.new_entity.updated_at") == true, "\(reply.message ?? "")")
            }
            let wrongType = try await agent.post(body: Didomi.user(version: 1, updatedAt: "2025-01-01T00:00:00Z",
                                                                   purposes: #"[{"id": "a", "enabled": "yes"}]"#))
            #expect(wrongType.status == .badRequest)
            #expect(wrongType.message?.contains("parameters.new_entity.consents.purposes[0].enabled") == true)
            let array = try await agent.post(body: "[1, 2]")
            #expect(array.status == .badRequest)
            let reasons = try await agent.count("select count(*)::int from consent.deliveries where outcome = 'failed' and reason is not null")
            #expect(reasons == 7)
            #expect(try await agent.count("select count(*)::int from consent.consents") == 0)
        }
    }

    @Test("an unknown event type is stored, not applied, and answered 200")
    func unknownTypeStored() async throws {
        try await AgentHarness.run { agent in
            let reply = try await agent.post(body: #"{"type": "user.merged", "parameters": {"entity": {"id": "u", "organization_id": "o"}}}"#)
            #expect(reply.status == .ok)
            #expect(reply.outcome == "stored")
            #expect(try await agent.count("select count(*)::int from consent.deliveries where outcome = 'stored'") == 1)
        }
    }

    @Test("415 for a non-JSON content type, 413 over the body limit, 400 for a body cut short, a stalled client cut off; nothing written")
    func admission() async throws {
        try await AgentHarness.run(configure: { $0.maxBodyBytes = 2048 }) { agent in
            let text = try await agent.post(body: "hello", contentType: "text/plain")
            #expect(text.status == .unsupportedMediaType)
            let gzipped = try await agent.post(body: "\u{1F}\u{8B}", headers: [("Content-Encoding", "gzip")])
            #expect(gzipped.status == .unsupportedMediaType && gzipped.message?.contains("Content-Encoding 'gzip'") == true,
                    "\(gzipped.json)")
            let big = try await agent.post(body: String(repeating: " ", count: 5000) + "{}")
            #expect(big.status == .contentTooLarge)
            #expect(big.message?.contains("2048") == true)
            // A body that ends before its Content-Length is not too large: 400, with a JSON message.
            let short = try agent.rawExchange("POST /webhooks/didomi HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"type\":")
            #expect(short.hasPrefix("HTTP/1.1 400"), "\(short)")
            #expect(short.contains("could not be read whole"), "\(short)")
            #expect(try await agent.count("select count(*)::int from consent.deliveries") == 0)
            // The identity encoding is no encoding: the body is read (and this one is a 400, kept).
            let identity = try await agent.post(body: "{}", headers: [("Content-Encoding", "identity")])
            #expect(identity.status == .badRequest && identity.message?.contains("Content-Encoding") != true, "\(identity.json)")
        }
        // A client that stops sending mid-request is cut off after the idle timeout, not kept for ever.
        try await AgentHarness.run(configure: { $0.idleTimeoutSeconds = 1 }) { agent in
            let started = ContinuousClock.now
            let stalled = try agent.rawExchange("POST /webhooks/didomi HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{", closeSending: false)
            #expect(ContinuousClock.now - started < .seconds(10), "\(stalled)")
            #expect(try await agent.count("select count(*)::int from consent.deliveries") == 0)
        }
    }
}
