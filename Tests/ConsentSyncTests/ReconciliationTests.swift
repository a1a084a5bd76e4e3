import ConsentCore
import ConsentReconcile
import ConsentServer
import ConsentStore
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import NIOConcurrencyHelpers
import NIOCore
import PostgresNIO
import Testing

/// PRODUCT §6: reconciliation against real PostgreSQL, with files and a local server speaking the
/// documented Didomi and DataGuard API shapes.
@Suite("Reconciliation")
struct ReconciliationTests {
    static func didomiUser(_ id: String, version: Int, updatedAt: String = "2025-03-01T00:00:00Z", purposes: [String: Bool],
                           tenant: String = "org-t", values: [String: String] = [:]) -> String {
        let list = purposes.sorted { $0.key < $1.key }.map { purpose, enabled in
            let prefs = values[purpose].map { #", "values": {"pref": {"value": "\#($0)"}}"# } ?? ""
            return #"{"id": "\#(purpose)", "enabled": \#(enabled)\#(prefs)}"#
        }.joined(separator: ", ")
        return #"{"id": "\#(id)", "organization_id": "\#(tenant)", "organization_user_id": "\#(id)@example.com", "version": \#(version), "created_at": "2025-01-01T00:00:00Z", "updated_at": "\#(updatedAt)", "consents": {"purposes": [\#(list)]}}"#
    }

    static func write(_ lines: [String]) throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("snapshot-\(UUID().uuidString).ndjson").path
        try (lines.joined(separator: "\n") + "\n").write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    static func reconcile(_ db: PostgresClient, _ source: some SnapshotSource, check: Bool = false,
                          maxShare: Double = 0.05) async throws -> Reconciler.Report {
        var options = Reconciler.Options()
        options.checkOnly = check
        options.maxRemovalShare = maxShare
        return try await Reconciler(client: db, logger: TestDatabase.logger, progressToTerminal: false).run(source, options: options)
    }

    static let later = Date().addingTimeInterval(3600)

    @Test("every drift kind is found and repaired, recorded with the run; a second run is in sync")
    func everyDriftKind() async throws {
        try await AgentHarness.run { agent in
            // Stored: a (a1 granted, a2 granted, pref x), b (b1), c (c1).
            try await agent.post(body: Didomi.user(id: "a", version: 1, updatedAt: "2025-03-01T00:00:00Z",
                purposes: #"[{"id":"a1","enabled":true},{"id":"a2","enabled":true,"values":{"pref":{"value":"x"}}}]"#))
            try await agent.post(body: Didomi.user(id: "b", version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"b1","enabled":true}]"#))
            try await agent.post(body: Didomi.user(id: "c", version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"c1","enabled":true}]"#))
            for n in 0..<40 {  // bystanders, so that removing one user stays under the 5 % guard
                try await agent.post(body: Didomi.user(id: "z\(n)", version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"z","enabled":true}]"#))
            }
            // Snapshot: a differs (a1 denied, a2 gone, a3 new, pref y), b same, c missing at the source, d new.
            var lines = [
                Self.didomiUser("a", version: 2, purposes: ["a1": false, "a3": true], values: ["a1": "y"]),
                Self.didomiUser("b", version: 1, purposes: ["b1": true]),
                Self.didomiUser("d", version: 1, purposes: ["d1": true]),
            ]
            lines += (0..<40).map { Self.didomiUser("z\($0)", version: 1, purposes: ["z": true]) }
            let path = try Self.write(lines)
            let report = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: Self.later))
            #expect(report.outcome == "repaired", "\(report)")
            #expect(report.exitCode == 0)
            #expect(report.drift["user_missing_here"] == 1)
            #expect(report.drift["user_missing_at_source"] == 1)
            #expect(report.drift["consent_missing"] == 2)      // a3, d1
            #expect(report.drift["consent_extra"] == 1)        // a2
            #expect(report.drift["consent_different"] == 1)    // a1
            #expect(report.drift["preference_different"] == 2) // a2/pref extra, a1/pref missing
            #expect(report.repaired == report.drift)
            #expect(try await agent.consents(user: "a") == ["a1": "denied", "a3": "granted"])
            #expect(try await agent.preferences(user: "a") == ["a1/pref": ["y"]])
            #expect(try await agent.consents(user: "d") == ["d1": "granted"])
            #expect(try await agent.consents(user: "c").isEmpty)
            #expect(try await agent.scalar("select deleted_at is not null from consent.users where user_id = 'c'", as: Bool.self) == true)
            // The removal is a deletion: once a newer snapshot revives c, a late delivery older than the
            // reconciliation's snapshot is still stale, in any regulation.
            let afterSnapshot = ISO8601DateFormatter().string(from: Self.later.addingTimeInterval(3600))
            let revived = try await agent.post(body: Didomi.user(id: "c", version: 5, updatedAt: afterSnapshot, purposes: #"[{"id":"c2","enabled":true}]"#))
            #expect(revived.outcome == "applied", "\(revived.json)")
            let late = try await agent.post(body: Didomi.user(id: "c", version: 1, updatedAt: "2025-03-02T00:00:00Z",
                                                              purposes: #"[{"id":"c1","enabled":true}]"#, regulation: "cpra"))
            #expect(late.outcome == "stale", "\(late.json)")
            #expect(try await agent.consents(user: "c", regulation: "cpra").isEmpty)
            let caused = try await agent.count("select count(*)::int from consent.consent_history where cause = \("reconciliation:\(report.run_id)")")
            #expect(caused == 5)  // a1, a2 removed, a3, d1, c1 removed
            let stored = try await agent.scalar("select outcome || ':' || (drift_counts->>'consent_missing') from consent.reconciliation_runs where id = \(report.run_id)", as: String.self)
            #expect(stored == "repaired:2")

            let again = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: Self.later))
            #expect(again.outcome == "in_sync", "\(again.drift)")
            #expect(again.exitCode == 0)
            // `consent-sync status` reports the last run.
            let status = try await StatusReport.load(client: agent.db, logger: TestDatabase.logger)
            #expect(status.last_reconciliation?.hasPrefix("#\(again.run_id) file repair") == true, "\(status.last_reconciliation ?? "nil")")
            #expect(status.last_reconciliation?.contains("in_sync") == true)
        }
    }

    @Test("--check reports drift, changes nothing and exits 3")
    func checkOnly() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(body: Didomi.user(id: "a", version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"a1","enabled":true}]"#))
            let before = try await agent.count("select count(*)::int from consent.consent_history")
            let path = try Self.write([Self.didomiUser("a", version: 2, purposes: ["a1": false])])
            let report = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: Self.later), check: true)
            #expect(report.outcome == "drift")
            #expect(report.exitCode == 3)
            #expect(report.drift["consent_different"] == 1)
            #expect(report.repaired.isEmpty)
            #expect(try await agent.consents(user: "a") == ["a1": "granted"])
            #expect(try await agent.count("select count(*)::int from consent.consent_history") == before)
            #expect(try await agent.count("select count(*)::int from consent.reconciliation_drift where not repaired") == 1)
        }
    }

    @Test("a row changed after the snapshot was read keeps the newer state (a webhook landing mid-run wins)")
    func newerRowsWin() async throws {
        try await AgentHarness.run { agent in
            let snapshotTime = Date()
            let path = try Self.write([Self.didomiUser("a", version: 1, purposes: ["a1": false])])
            // The webhook lands after the snapshot was taken and its change is newer (source-side time).
            let newer = Timestamp.format(snapshotTime.addingTimeInterval(5))
            try await agent.post(body: Didomi.user(id: "a", version: 2, updatedAt: newer, purposes: #"[{"id":"a1","enabled":true}]"#))
            let report = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: snapshotTime))
            #expect(report.drift["consent_different"] == nil)
            #expect(try await agent.consents(user: "a") == ["a1": "granted"])
        }
    }

    @Test("an item removed, or a user deleted, after the snapshot's time stays so: not drift, not repaired back")
    func laterRemovalsStay() async throws {
        try await AgentHarness.run { agent in
            let snapshotTime = try #require(Timestamp.parse("2025-03-19T00:00:00Z"))
            let prefs = #", "values": {"pref": {"value": "v1"}}"#
            // Before the snapshot: r with a1 and a2 (and a preference), d with a1 and a preference.
            try await agent.post(body: Didomi.user(id: "r", version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                                   purposes: #"[{"id":"a1","enabled":true},{"id":"a2","enabled":true\#(prefs)}]"#))
            try await agent.post(body: Didomi.user(id: "d", version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                                   purposes: #"[{"id":"a1","enabled":true\#(prefs)}]"#))
            // After it: r drops a2 and its preference, d is deleted.
            try await agent.post(body: Didomi.user(id: "r", version: 2, updatedAt: "2025-04-01T00:00:00Z",
                                                   purposes: #"[{"id":"a1","enabled":true}]"#))
            try await agent.post(body: Didomi.deleted(id: "d", version: 2, updatedAt: "2025-04-02T00:00:00Z"))
            // The snapshot read before both, as the file says.
            let path = try Self.write([
                Self.didomiUser("r", version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: ["a1": true, "a2": true], values: ["a2": "v1"]),
                Self.didomiUser("d", version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: ["a1": true], values: ["a1": "v1"]),
            ])
            defer { try? FileManager.default.removeItem(atPath: path) }
            let check = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: snapshotTime), check: true)
            #expect(check.drift.isEmpty, "\(check.drift)")
            let repair = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: snapshotTime))
            #expect(repair.outcome == "in_sync", "\(repair.drift)")
            let r = try await agent.consents(user: "r")
            #expect(r == ["a1": "granted"])
            let rPrefs = try await agent.preferences(user: "r")
            #expect(rPrefs.isEmpty)
            #expect(try await agent.count("select count(*)::int from consent.current_preferences where user_id = 'd'") == 0)
            #expect(try await agent.count("select count(*)::int from consent.current_consents where user_id = 'd'") == 0)
            // A snapshot read after those changes still repairs what is missing.
            let later = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: try #require(Timestamp.parse("2025-05-01T00:00:00Z"))))
            #expect((later.drift["consent_missing"] ?? 0) >= 1, "\(later.drift)")
            let repaired = try await agent.consents(user: "r")
            #expect(repaired == ["a1": "granted", "a2": "granted"])
        }
    }

    @Test("a removal a webhook commits while the repair waits for the user's lock is not repaired back, and is not counted as drift")
    func repairWaitsForWebhookInFlight() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(body: Didomi.user(id: "r", version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                                   purposes: #"[{"id":"a1","enabled":true}]"#))
            // The snapshot, read on 03-19, has a2 too: drift (consent_missing) as long as nothing newer says otherwise.
            let path = try Self.write([Self.didomiUser("r", version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                                       purposes: ["a1": true, "a2": true])])
            defer { try? FileManager.default.removeItem(atPath: path) }
            let snapshotTime = try #require(Timestamp.parse("2025-03-19T00:00:00Z"))

            // A webhook batch in flight for r: it holds r's lock, and its history says a2 was removed on 04-01
            // (after the snapshot). It commits only once the reconciliation waits for that lock.
            let holding = NIOLockedValueBox(false)
            let release = NIOLockedValueBox(false)
            let webhook = Task {
                try await agent.db.withConnection { connection in
                    let logger = TestDatabase.logger
                    try await connection.perform("begin", logger: logger)
                    try await connection.perform("select pg_advisory_xact_lock(consent.user_lock_key('didomi', 'org-t', 'r'))", logger: logger)
                    try await connection.perform("""
                        insert into consent.consent_history
                               (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, previous_status,
                                changed_at, seen_at, seen_at2, seen_tie, cause)
                        values ('didomi', 'org-t', 'r', 'gdpr', 'purpose', 'a2', 'consent', null, 'granted',
                                '2025-04-01T00:00:00Z', '2025-04-01T00:00:00Z', '2025-04-01T00:00:00Z', 'v3', 'didomi:user.updated')
                        """, logger: logger)
                    holding.withLockedValue { $0 = true }
                    while !release.withLockedValue({ $0 }) { try await Task.sleep(for: .milliseconds(20)) }
                    try await connection.perform("commit", logger: logger)
                }
            }
            let deadline = ContinuousClock.now + .seconds(30)
            while !holding.withLockedValue({ $0 }), ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
            let run = Task { try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: snapshotTime)) }
            // Until the reconciliation waits for r's lock.
            while try await agent.count("""
                select count(*)::int from pg_locks
                 where locktype = 'advisory' and not granted
                   and database = (select oid from pg_database where datname = current_database())
                """) == 0, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            #expect(ContinuousClock.now < deadline, "the repair never waited for the user's lock")
            release.withLockedValue { $0 = true }
            try await webhook.value
            let report = try await run.value
            #expect(try await agent.consents(user: "r") == ["a1": "granted"])
            #expect(report.drift["consent_missing"] == nil, "\(report.drift)")
            #expect(report.outcome == "in_sync")
            let stored = try await agent.scalar("""
                select coalesce(drift_counts->>'consent_missing', '0') from consent.reconciliation_runs where id = \(report.run_id)
                """, as: String.self)
            #expect(stored == "0")
        }
    }

    @Test("a user listed twice in one snapshot is compared once, as its newest listing")
    func repeatedUser() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(body: Didomi.user(id: "twice", version: 5, updatedAt: "2025-03-05T00:00:00Z",
                                                   purposes: #"[{"id":"sms","enabled":true},{"id":"mail","enabled":true}]"#))
            // An older listing before and after the newest, and the newest listed twice.
            let older = Self.didomiUser("twice", version: 4, updatedAt: "2025-03-04T00:00:00Z", purposes: ["sms": false, "mail": true])
            let newest = Self.didomiUser("twice", version: 5, updatedAt: "2025-03-05T00:00:00Z", purposes: ["sms": true, "mail": true])
            let path = try Self.write([older, newest, newest, older])
            defer { try? FileManager.default.removeItem(atPath: path) }
            let check = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: Self.later), check: true)
            #expect(check.outcome == "in_sync" && check.drift.isEmpty, "\(check.drift)")
            // A user missing here and listed twice is one user to create, each item once.
            let missing = Self.didomiUser("new", version: 1, updatedAt: "2025-03-05T00:00:00Z", purposes: ["a": true, "b": false])
            let second = try Self.write([missing, missing])
            defer { try? FileManager.default.removeItem(atPath: second) }
            let repair = try await Self.reconcile(agent.db, try NDJSONSource(path: second, snapshotTime: Self.later), maxShare: 1)
            #expect(repair.drift["user_missing_here"] == 1 && repair.drift["consent_missing"] == 2, "\(repair.drift)")
            let created = try await agent.consents(user: "new")
            #expect(created == ["a": "granted", "b": "denied"])
            // DataGuard: the newest listing is the one with the newest items, whatever their sentAt says
            // (a retry re-stamps it).
            func citizen(_ state: String, _ transaction: String, obtainedAt: String, sentAt: String) -> String {
                DataGuard.body(permissions: [DataGuard.permission("o1", state: state, transaction: transaction, obtainedAt: obtainedAt)],
                               sentAt: sentAt).replacingOccurrences(of: "\n", with: " ")
            }
            let newer = citizen("DENIED", "t-new", obtainedAt: "2025-05-01T11:00:00Z", sentAt: "2025-05-01T11:00:01Z")
            let retried = citizen("GRANTED", "t-old", obtainedAt: "2025-05-01T10:00:00Z", sentAt: "2025-05-01T12:00:00Z")
            #expect(try await agent.post("/webhooks/dataguard/effective-permissions", body: newer).outcome == "applied")
            let third = try Self.write([newer, retried])
            defer { try? FileManager.default.removeItem(atPath: third) }
            let dataguard = try await Self.reconcile(agent.db, try NDJSONSource(path: third, snapshotTime: Self.later), check: true)
            #expect(dataguard.drift.isEmpty, "\(dataguard.drift)")
        }
    }

    /// A snapshot whose time is the agent's own clock at the start of the fetch (as for the API sources).
    struct FetchedSource: SnapshotSource {
        let file: NDJSONSource
        var name: String { "file" }
        var snapshotTime: Date { file.snapshotTime }
        var writtenBefore: Date? { file.snapshotTime }
        func read(_ consume: ([ChangeSet]) async throws -> Void) async throws { try await file.read(consume) }
    }

    @Test("newer than the snapshot means a later source-side time; rows received late but changed before it are drift")
    func snapshotTimeIsSourceTime() async throws {
        try await AgentHarness.run { agent in
            // Stored now, changed at the source in March 2025.
            try await agent.post(body: Didomi.user(id: "a", version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"a1","enabled":true}]"#))
            for n in 0..<40 {  // bystanders, so that one removal stays under the 5 % guard
                try await agent.post(body: Didomi.user(id: "z\(n)", version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"z","enabled":true}]"#))
            }
            try await agent.post(body: Didomi.user(id: "gone", version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"g","enabled":true}]"#))
            // Changed at the source in July 2025: newer than a June snapshot.
            try await agent.post(body: Didomi.user(id: "b", version: 3, updatedAt: "2025-07-01T00:00:00Z", purposes: #"[{"id":"b1","enabled":true}]"#))
            let lines = [Self.didomiUser("a", version: 2, updatedAt: "2025-05-01T00:00:00Z", purposes: ["a1": false]),
                         Self.didomiUser("b", version: 2, updatedAt: "2025-05-01T00:00:00Z", purposes: ["b1": false])]
                + (0..<40).map { Self.didomiUser("z\($0)", version: 1, purposes: ["z": true]) }
            let path = try Self.write(lines)
            let june = Timestamp.parse("2025-06-01T00:00:00Z")!

            // A snapshot of 1 June (--snapshot-time): a is drift although the agent wrote it after that date;
            // "gone" is missing at the source; b changed after the snapshot and is not drift.
            let check = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: june), check: true)
            #expect(check.outcome == "drift", "\(check)")
            #expect(check.exitCode == 3)
            #expect(check.drift == ["consent_different": 1, "user_missing_at_source": 1], "\(check.drift)")

            let repair = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: june))
            #expect(repair.outcome == "repaired", "\(repair)")
            #expect(try await agent.consents(user: "a") == ["a1": "denied"])
            #expect(try await agent.consents(user: "b") == ["b1": "granted"])
            #expect(try await agent.consents(user: "gone").isEmpty)
            let again = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: june), check: true)
            #expect(again.outcome == "in_sync", "\(again.drift)")

            // A snapshot the agent fetches itself (its clock at the fetch start): a user received during the
            // fetch is not missing at the source, even with a source-side time before the fetch; b, changed in
            // July and stored long before, differs from this snapshot.
            let fetchStart = Date()
            try await Task.sleep(for: .milliseconds(20))
            try await agent.post(body: Didomi.user(id: "late", version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"l1","enabled":true}]"#))
            let fetched = try await Self.reconcile(agent.db, FetchedSource(file: try NDJSONSource(path: path, snapshotTime: fetchStart)), check: true)
            #expect(fetched.drift == ["consent_different": 1], "\(fetched.drift)")
            // The same time given as the snapshot's (no write-time guard): "late" counts as missing at the source.
            let given = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: fetchStart), check: true)
            #expect(given.drift == ["consent_different": 1, "user_missing_at_source": 1], "\(given.drift)")
        }
    }

    @Test("a truncated source is refused by the mass-removal guard; exit 1, nothing removed")
    func massRemovalGuard() async throws {
        try await AgentHarness.run { agent in
            for n in 0..<20 {
                try await agent.post(body: Didomi.user(id: "u\(n)", version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"p","enabled":true}]"#))
            }
            let path = try Self.write((0..<5).map { Self.didomiUser("u\($0)", version: 1, purposes: ["p": true]) })
            let report = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: Self.later))
            #expect(report.outcome == "refused")
            #expect(report.exitCode == 1)
            #expect(report.error?.contains("refused to remove 15 users") == true, "\(report.error ?? "")")
            #expect(try await agent.count("select count(*)::int from consent.current_users where deleted_at is null") == 20)
            // An empty snapshot removes nothing either (no tenant in it).
            let empty = try await Self.reconcile(agent.db, try NDJSONSource(path: try Self.write([]), snapshotTime: Self.later))
            #expect(empty.outcome == "in_sync")
        }
    }

    @Test("a user absent from a gdpr snapshot who has cpra state is not missing at the source (PRODUCT §4)")
    func otherRegulationNotRemoved() async throws {
        try await AgentHarness.run { agent in
            try await agent.post(body: Didomi.user(id: "cpra-only", version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                                   purposes: #"[{"id":"sale","enabled":false}]"#, regulation: "cpra"))
            // A cpra snapshot with no purposes is state too (its version guards later deliveries).
            try await agent.post(body: Didomi.user(id: "cpra-empty", version: 3, updatedAt: "2025-03-01T00:00:00Z",
                                                   purposes: "[]", regulation: "cpra"))
            try await agent.post(body: Didomi.user(id: "gone", version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                                   purposes: #"[{"id":"p","enabled":true}]"#))
            var lines: [String] = []
            for n in 0..<40 {  // bystanders, so that removing one user stays under the 5 % guard
                try await agent.post(body: Didomi.user(id: "z\(n)", version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                                       purposes: #"[{"id":"z","enabled":true}]"#))
                lines.append(Self.didomiUser("z\(n)", version: 1, purposes: ["z": true]))
            }
            // A gdpr-only snapshot of the tenant: neither "gone" nor "cpra-only" is in it.
            let report = try await Self.reconcile(agent.db, try NDJSONSource(path: try Self.write(lines), snapshotTime: Self.later))
            #expect(report.outcome == "repaired", "\(report)")
            #expect(report.drift == ["user_missing_at_source": 1], "\(report.drift)")
            #expect(try await agent.consents(user: "cpra-only", regulation: "cpra") == ["sale": "denied"])
            #expect(try await agent.consents(user: "gone").isEmpty)
            #expect(try await agent.count("""
                select count(*)::int from consent.current_users where user_id in ('cpra-only', 'cpra-empty') and deleted_at is null
                """) == 2)
        }
    }

    @Test("a snapshot item with a value this version does not know is not drift: the stored row stays")
    func unknownValueInSnapshot() async throws {
        try await AgentHarness.run { agent in
            let effective = "/webhooks/dataguard/effective-permissions"
            func citizen(_ id: String, _ permissions: [String], sentAt: String) -> String {
                DataGuard.body(permissions: permissions, sentAt: sentAt)
                    .replacingOccurrences(of: DataGuard.citizen, with: id).replacingOccurrences(of: "\n", with: " ")
            }
            // Stored: two citizens, each with o1 and o2 granted, and a preference.
            for id in ["c-new-state", "c-plain"] {
                let body = DataGuard.body(permissions: [
                    DataGuard.permission("o1", transaction: "\(id)-t1", obtainedAt: "2025-03-01T00:00:00Z"),
                    DataGuard.permission("o2", transaction: "\(id)-t2", obtainedAt: "2025-03-01T00:00:00Z"),
                ], preferences: [DataGuard.preference("topics", choices: ["food"], submission: "\(id)-s1", updatedAt: "2025-03-01T00:00:00Z")],
                sentAt: "2025-03-01T00:00:01Z").replacingOccurrences(of: DataGuard.citizen, with: id)
                let reply = try await agent.post(effective, body: body)
                #expect(reply.outcome == "applied", "\(reply.json)")
            }
            // Snapshot: both deny o1; the first carries o2 in a state DataGuard added later, the second
            // no longer has o2.
            let path = try Self.write([
                citizen("c-new-state", [
                    DataGuard.permission("o1", state: "DENIED", transaction: "n-t3", obtainedAt: "2025-03-02T00:00:00Z"),
                    DataGuard.permission("o2", state: "SUSPENDED_BY_REGULATOR", transaction: "n-t4", obtainedAt: "2025-03-02T00:00:00Z"),
                ], sentAt: "2025-03-02T00:00:01Z"),
                citizen("c-plain", [
                    DataGuard.permission("o1", state: "DENIED", transaction: "p-t3", obtainedAt: "2025-03-02T00:00:00Z"),
                ], sentAt: "2025-03-02T00:00:01Z"),
            ])
            let report = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: Self.later))
            #expect(report.outcome == "repaired", "\(report)")
            #expect(report.users_with_unknown_values == 1)
            #expect(report.drift == ["consent_different": 2, "consent_extra": 1, "preference_different": 1], "\(report.drift)")
            // Nothing of the user with the unknown value is removed, preferences included.
            #expect(try await agent.count("select count(*)::int from consent.current_preferences where user_id = 'c-new-state'") == 1)
            #expect(try await agent.count("select count(*)::int from consent.current_preferences where user_id = 'c-plain'") == 0)
            // The known item is repaired for both; o2 is removed only where the source no longer has it.
            #expect(try await agent.consents(user: "c-new-state", regulation: nil) == ["o1": "denied", "o2": "granted"])
            #expect(try await agent.consents(user: "c-plain", regulation: nil) == ["o1": "denied"])
            #expect(try await agent.count("""
                select count(*)::int from consent.reconciliation_drift
                 where run_id = \(report.run_id) and user_id = 'c-new-state' and kind = 'consent_extra'
                """) == 0)
        }
    }

    /// A source that blocks until released, to hold a run open.
    struct GatedSource: SnapshotSource {
        let gate: NIOLockedValueBox<Bool>
        var name: String { "file" }
        var snapshotTime: Date { Date() }
        var writtenBefore: Date? { nil }
        func read(_ consume: ([ChangeSet]) async throws -> Void) async throws {
            while !gate.withLockedValue({ $0 }) { try await Task.sleep(for: .milliseconds(20)) }
        }
    }

    @Test("two runs at once: the second says another is running")
    func concurrentRuns() async throws {
        try await AgentHarness.run { agent in
            let gate = NIOLockedValueBox(false)
            let first = Task { try await Self.reconcile(agent.db, GatedSource(gate: gate)) }
            // Until the first run holds the lock (a fixed pause is not enough on a loaded machine).
            let deadline = ContinuousClock.now + .seconds(30)
            while try await agent.count("""
                select count(*)::int from pg_locks
                 where locktype = 'advisory' and granted and objsubid = 1
                   and database = (select oid from pg_database where datname = current_database())
                """) == 0, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            await #expect(throws: Reconciler.AlreadyRunning.self) {
                _ = try await Self.reconcile(agent.db, GatedSource(gate: NIOLockedValueBox(true)))
            }
            while try await agent.count("select count(*)::int from consent.reconciliation_runs") == 0, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            let during = try await StatusReport.load(client: agent.db, logger: TestDatabase.logger)
            #expect(during.last_reconciliation?.contains(": running,") == true, "\(during.last_reconciliation ?? "")")
            gate.withLockedValue { $0 = true }
            #expect(try await first.value.outcome == "in_sync")

            // A run whose process was killed keeps no outcome: status says interrupted, and the next run
            // records it as an error.
            let killed = try await agent.scalar("""
                insert into consent.reconciliation_runs (source, mode, snapshot_time) values ('file:x', 'check', now()) returning id
                """, as: Int64.self)
            let after = try await StatusReport.load(client: agent.db, logger: TestDatabase.logger)
            #expect(after.last_reconciliation?.contains(": interrupted,") == true, "\(after.last_reconciliation ?? "")")
            _ = try await Self.reconcile(agent.db, GatedSource(gate: NIOLockedValueBox(true)))
            let recorded = try await agent.scalar("""
                select outcome || ' ' || error from consent.reconciliation_runs where id = \(killed) and finished_at is not null
                """, as: String.self)
            #expect(recorded == "error interrupted: the process ended before the run finished")
        }
    }

    @Test("a snapshot path that is a directory is a clear error, never a crash; a malformed line ends the run saying how far it read")
    func unreadableFile() async throws {
        try await AgentHarness.run { agent in
            let directory = FileManager.default.temporaryDirectory.path
            let refused = await #expect(throws: (any Error).self) { _ = try NDJSONSource(path: directory, snapshotTime: nil) }
            #expect("\(refused.map { "\($0)" } ?? "")".contains("is a directory"))
            // A byte-order mark at the start of the file is not part of the first line.
            let path = try Self.write(["\u{FEFF}" + Self.didomiUser("u-bom", version: 1, purposes: ["p": true])])
            defer { try? FileManager.default.removeItem(atPath: path) }
            let report = try await Self.reconcile(agent.db, try NDJSONSource(path: path, snapshotTime: nil))
            #expect(report.outcome == "repaired" && report.users_read == 1, "\(report)")
            // A malformed line ends the run as an error, nothing removed, saying how far it read.
            let broken = try Self.write([Self.didomiUser("u-ok", version: 1, purposes: ["p": true]), "{\"id\": 7}"])
            defer { try? FileManager.default.removeItem(atPath: broken) }
            let failed = try await Self.reconcile(agent.db, try NDJSONSource(path: broken, snapshotTime: nil, batchSize: 1))
            #expect(failed.outcome == "error" && failed.users_read == 1 && failed.error?.contains("line 2") == true, "\(failed)")
            #expect(try await agent.count("select count(*)::int from consent.current_consents where user_id = 'u-bom'") == 1)
        }
    }

    @Test("Didomi API: session token, cursor pages for every regulation, a 429 and a 500 retried")
    func didomiAPI() async throws {
        let hits = NIOLockedValueBox<[String]>([])
        let router = Router()
        router.post("/v1/sessions") { request, _ in
            var request = request
            let body = String(buffer: try await request.collectBody(upTo: 4096))
            guard body.contains("\"secret\":\"s3cret\"") || body.contains("\"secret\" : \"s3cret\"") else { return Response(status: .unauthorized) }
            return Response(status: .ok, headers: [.contentType: "application/json"],
                            body: .init(byteBuffer: ByteBuffer(string: #"{"access_token": "tok-1", "expires_in": 3600}"#)))
        }
        router.get("/v1/consents/users") { request, _ in
            guard request.headers[.authorization] == "Bearer tok-1" else { return Response(status: .unauthorized) }
            let cursor = request.uri.queryParameters["$cursor"].map(String.init)
            let regulation = request.uri.queryParameters["regulation"].map(String.init) ?? "gdpr"
            let key = "\(regulation):\(cursor ?? "-")"
            let count = hits.withLockedValue { $0.append(key); return $0.filter { $0 == key }.count }
            if key == "gdpr:p2" && count == 1 { return Response(status: .tooManyRequests, headers: [.retryAfter: "1"]) }
            if key == "gdpr:p2" && count == 2 { return Response(status: .internalServerError) }
            let page: String
            switch (regulation, cursor) {
            case ("gdpr", nil):
                page = #"{"data": [\#(Self.didomiUser("x1", version: 1, purposes: ["p": true])), \#(Self.didomiUser("x2", version: 1, purposes: ["p": false]))], "limit": 2, "cursor": "p2"}"#
            case ("gdpr", "p2"):
                page = #"{"data": [\#(Self.didomiUser("x3", version: 1, purposes: ["p": true]))], "limit": 2, "cursor": null}"#
            default:
                page = #"{"data": [\#(Self.didomiUser("x1", version: 1, purposes: ["q": true]))], "limit": 2, "cursor": null}"#
            }
            return Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(string: page)))
        }
        let api = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)), logger: TestDatabase.logger)
        try await api.test(.live) { client in
            try await AgentHarness.run { agent in
                var settings = DidomiAPISource.Settings(organizationID: "org-t", apiKey: "k", apiSecret: "s3cret")
                settings.baseURL = "http://127.0.0.1:\(client.port!)/v1"
                settings.regulations = ["gdpr", "cpra"]
                settings.pageSize = 2
                let report = try await Self.reconcile(agent.db, DidomiAPISource(settings: settings, logger: TestDatabase.logger))
                #expect(report.outcome == "repaired", "\(report)")
                #expect(report.users_read == 4)
                #expect(try await agent.consents(user: "x2") == ["p": "denied"])
                #expect(try await agent.consents(user: "x1", regulation: "cpra") == ["q": "granted"])
                #expect(hits.withLockedValue { $0.filter { $0 == "gdpr:p2" }.count } == 3)
            }
        }
    }

    @Test("DataGuard store: limit/offset pages with includeTotal=false and X-API-Key")
    func dataguardAPI() async throws {
        let router = Router()
        router.get("/v1/store") { request, _ in
            guard request.headers[HTTPField.Name("X-API-Key")!] == "dg-key",
                  request.uri.queryParameters["includeTotal"] == "false",
                  request.uri.queryParameters["applicationId"] == "app-1" else { return Response(status: .unauthorized) }
            let offset = Int(request.uri.queryParameters["offset"].map(String.init) ?? "0") ?? 0
            let limit = Int(request.uri.queryParameters["limit"].map(String.init) ?? "0") ?? 0
            let all = (0..<150).map { n in
                #"{"citizenId": "c\#(n)", "externalRef": "R\#(n)", "permissions": [{"transactionId": "t\#(n)", "optionType": "option", "optionId": "o1", "justification": "consent", "state": "GRANTED", "recordedAt": "2025-03-01T00:00:00Z", "obtainedAt": "2025-03-01T00:00:00Z"}], "preferences": []}"#
            }
            let page = Array(all[min(offset, all.count)..<min(offset + limit, all.count)])
            return Response(status: .ok, headers: [.contentType: "application/json"],
                            body: .init(byteBuffer: ByteBuffer(string: #"{"data": [\#(page.joined(separator: ","))]}"#)))
        }
        let api = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)), logger: TestDatabase.logger)
        try await api.test(.live) { client in
            try await AgentHarness.run { agent in
                var settings = DataGuardAPISource.Settings(applicationID: "app-1", apiKey: "dg-key")
                settings.baseURL = "http://127.0.0.1:\(client.port!)"
                settings.path = "/v1/store"
                let report = try await Self.reconcile(agent.db, DataGuardAPISource(settings: settings, logger: TestDatabase.logger))
                #expect(report.users_read == 150)
                #expect(report.drift["consent_missing"] == 150)
                #expect(try await agent.count("select count(*)::int from consent.current_consents where source = 'dataguard' and in_force") == 150)
            }
        }
    }

    @Test("reconcile --json with both platforms configured prints one JSON document: the array of both reports")
    func bothPlatformsOneDocument() async throws {
        let router = Router()
        @Sendable func json(_ text: String) -> Response {
            Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(string: text)))
        }
        router.post("/didomi/sessions") { _, _ in json(#"{"access_token": "tok", "expires_in": 3600}"#) }
        router.get("/didomi/consents/users") { _, _ in
            json(#"{"data": [\#(Self.didomiUser("j1", version: 1, purposes: ["p": true]))], "limit": 100, "cursor": null}"#)
        }
        router.get("/dataguard/store") { request, _ in
            let offset = request.uri.queryParameters["offset"].map(String.init) ?? "0"
            return json(offset != "0" ? #"{"data": []}"# : #"{"data": [{"citizenId": "c-j", "permissions": [{"transactionId": "t-j", "optionType": "option", "optionId": "o1", "justification": "consent", "state": "GRANTED", "recordedAt": "2025-03-01T00:00:00Z", "obtainedAt": "2025-03-01T00:00:00Z"}], "preferences": []}]}"#)
        }
        let api = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)), logger: TestDatabase.logger)
        try await api.test(.live) { client in
            let base = "http://127.0.0.1:\(client.port!)"
            let run = try await CommandLineTests.run(["reconcile", "--json", "--check"], environment: [
                "DATABASE_URL": try await TestDatabase.shared.freshDatabase(),
                "CONSENT_SYNC_RECONCILE_DIDOMI_ORGANIZATION_ID": "org-t", "CONSENT_SYNC_RECONCILE_DIDOMI_API_KEY": "k",
                "CONSENT_SYNC_RECONCILE_DIDOMI_API_SECRET": "s", "CONSENT_SYNC_RECONCILE_DIDOMI_BASE_URL": base + "/didomi",
                "CONSENT_SYNC_RECONCILE_DATAGUARD_APPLICATION_ID": "app-j", "CONSENT_SYNC_RECONCILE_DATAGUARD_API_KEY": "dg",
                "CONSENT_SYNC_RECONCILE_DATAGUARD_BASE_URL": base, "CONSENT_SYNC_RECONCILE_DATAGUARD_PATH": "/dataguard/store",
            ])
            #expect(run.status == 3, "\(run)")
            let reports = try #require(try JSONSerialization.jsonObject(with: Data(run.output.utf8)) as? [[String: Any]], "\(run.output)")
            #expect(reports.map { $0["source"] as? String } == ["didomi-api", "dataguard-api"], "\(run.output)")
            #expect(reports.map { $0["users_read"] as? Int } == [1, 1], "\(run.output)")
        }
    }

    @Test("a 100,000-user snapshot streams with flat memory")
    func flatMemory() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("big-\(UUID().uuidString).ndjson").path
        FileManager.default.createFile(atPath: path, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        var chunk = ""
        for n in 0..<100_000 {
            chunk += Self.didomiUser("big\(n)", version: 1, purposes: ["p1": n % 2 == 0, "p2": true]) + "\n"
            if n % 5000 == 4999 { handle.write(Data(chunk.utf8)); chunk = "" }
        }
        handle.write(Data(chunk.utf8))
        try handle.close()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let url = try await TestDatabase.shared.freshDatabase()
        try await TestDatabase.withClient(url: url) { db in
            let before = Self.residentMiB()
            let report = try await Self.reconcile(db, try NDJSONSource(path: path, snapshotTime: Self.later), check: true)
            let growth = Self.residentMiB() - before
            #expect(report.users_read == 100_000)
            #expect(report.drift["consent_missing"] == 200_000)
            #expect(growth < 150, "resident memory grew by \(growth) MiB")
        }
    }

    static func residentMiB() -> Int {
        let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return (Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) / 1024
    }
}
