import ConsentServer
import ConsentStore
import Foundation
import Metrics
import PostgresNIO
import Prometheus
import Testing

/// One Prometheus registry for the test process (metrics are bootstrapped once per process).
enum TestMetrics {
    static let registry: PrometheusCollectorRegistry = {
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(AgentMetrics.factory(registry: registry))
        return registry
    }()
}

/// PRODUCT §7 for operators: health, metrics, replay, retention, configuration errors.
@Suite("Operations")
struct OperationsTests {
    @Test("/healthz, /readyz (database reachable, migrations current) and /metrics after deliveries")
    func healthAndMetrics() async throws {
        _ = TestMetrics.registry
        try await AgentHarness.run(registry: TestMetrics.registry) { agent in
            let health = try await agent.client.execute(uri: "/healthz", method: .get)
            #expect(health.status == .ok)
            // Unknown paths and methods answer in JSON too.
            let unknown = try await agent.client.execute(uri: "/webhooks/nowhere", method: .post)
            #expect(unknown.status == .notFound)
            #expect(String(buffer: unknown.body).contains(#""message":"no route for POST /webhooks/nowhere""#), "\(String(buffer: unknown.body))")
            let wrongMethod = try await agent.client.execute(uri: "/webhooks/didomi", method: .get)
            #expect(wrongMethod.status == .methodNotAllowed)
            #expect(wrongMethod.headers[.allow] == "POST")
            #expect(wrongMethod.headers[.contentType]?.hasPrefix("application/json") == true)
            #expect(String(buffer: wrongMethod.body).contains(#""message":"GET is not allowed on /webhooks/didomi""#))
            let deleteHealth = try await agent.client.execute(uri: "/healthz", method: .delete)
            #expect(deleteHealth.status == .methodNotAllowed)
            #expect(deleteHealth.headers[.allow] == "GET, HEAD")
            #expect(try await agent.client.execute(uri: "/webhooks/dataguard/consent-receipts", method: .put).status == .methodNotAllowed)
            let ready = try await agent.client.execute(uri: "/readyz", method: .get)
            #expect(ready.status == .ok)
            try await agent.postFixture("didomi/webhooks/nested/user.updated.json")
            try await agent.post(body: "not json")
            let metrics = String(buffer: try await agent.client.execute(uri: "/metrics", method: .get).body)
            #expect(metrics.contains(#"consent_sync_deliveries_total{endpoint="didomi",outcome="applied"}"#))
            #expect(metrics.contains(#"consent_sync_deliveries_total{endpoint="didomi",outcome="failed"}"#))
            #expect(metrics.contains("consent_sync_delivery_duration_seconds_bucket"))
            #expect(metrics.contains("consent_sync_apply_batch_size"))
            #expect(metrics.contains("consent_sync_kept_deliveries"))
            #expect(metrics.contains("consent_sync_db_connection_wait_seconds"))
            // Series exist from the start, at zero: an endpoint and outcome nothing here produced.
            #expect(metrics.contains(#"consent_sync_deliveries_total{endpoint="dataguard.citizen-emails",outcome="stale"} 0"#), "\(metrics)")
            // (Other suites of this process may have posted there: the series exists, whatever its count.)
            #expect(metrics.contains(#"consent_sync_delivery_duration_seconds_count{endpoint="dataguard.consent-receipts"}"#))
            // Batch sizes have buckets of their own (1, 2, 4, …), not the defaults starting at 5.
            #expect(metrics.contains(#"consent_sync_apply_batch_size_bucket{le="1.0"}"#) || metrics.contains(#"consent_sync_apply_batch_size_bucket{le="1"}"#))
            #expect(metrics.contains(#"consent_sync_last_reconciliation_drift{kind="consent_extra"} 0"#))

            // Drift gauges follow the latest run: a kind it no longer found reads 0.
            try await agent.db.query("""
                insert into consent.reconciliation_runs (source, mode, finished_at, snapshot_time, drift_counts, outcome)
                values ('file', 'check', now(), now(), '{"consent_different": 7}', 'drift')
                """)
            let drifted = String(buffer: try await agent.client.execute(uri: "/metrics", method: .get).body)
            #expect(drifted.contains(#"consent_sync_last_reconciliation_drift{kind="consent_different"} 7"#))
            try await agent.db.query("""
                insert into consent.reconciliation_runs (source, mode, finished_at, snapshot_time, drift_counts, outcome)
                values ('file', 'check', now(), now(), '{}', 'in_sync')
                """)
            let clean = String(buffer: try await agent.client.execute(uri: "/metrics", method: .get).body)
            #expect(clean.contains(#"consent_sync_last_reconciliation_drift{kind="consent_different"} 0"#), "\(clean)")

            // Readiness says so when a migration is pending.
            try await agent.db.query("delete from consent.schema_migrations where version = (select max(version) from consent.schema_migrations)")
            let pending = try await agent.client.execute(uri: "/readyz", method: .get)
            #expect(pending.status == .serviceUnavailable)
            #expect(String(buffer: pending.body).contains("migrations_pending"))
        }
    }

    @Test("/readyz with the database down answers 503 quickly")
    func readyWhenDatabaseDown() async throws {
        let url = "postgres://nobody@127.0.0.1:1/none?sslmode=disable"
        try await AgentHarness.run(configure: { $0.applyTimeout = .milliseconds(500) }, databaseURL: url) { agent in
            let started = ContinuousClock.now
            let ready = try await agent.client.execute(uri: "/readyz", method: .get)
            #expect(ready.status == .serviceUnavailable)
            #expect(ContinuousClock.now - started < .seconds(2))
            #expect(try await agent.client.execute(uri: "/healthz", method: .get).status == .ok)
        }
    }

    @Test("replay re-applies a failed delivery once its cause is fixed, and leaves what still fails")
    func replay() async throws {
        try await AgentHarness.run { agent in
            // A delivery that cannot be applied (a NUL character PostgreSQL text cannot hold) is kept as failed...
            let poison = Didomi.user(id: "bad\\u0000user", version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: "[]")
            let refused = try await agent.post(body: poison)
            #expect(refused.status == .badRequest)
            #expect(refused.message == "field 'parameters.new_entity.id' contains a NUL character (\\u0000), which cannot be stored",
                    "\(refused.message ?? "")")
            // ...and a stored one (an unknown type) and a malformed one are kept too.
            try await agent.post(body: #"{"type": "user.merged", "parameters": {"entity": {"id": "u", "organization_id": "o"}}}"#)
            try await agent.post(body: "not json")
            // The cause gets fixed: here, by failing differently no more (simulate a fixed decoder by
            // replacing the kept body with its corrected form, as an operator would after a fix).
            try await agent.db.query("""
                update consent.deliveries set body = convert_to(replace(convert_from(body, 'UTF8'), 'bad\\u0000user', 'good-user'), 'UTF8')
                 where id = \(refused.deliveryID!)
                """)
            let store = ConsentStore(client: agent.db, logger: TestDatabase.logger, timeout: .seconds(10))
            let results = try await Replayer(store: store).replay(.init())
            let byID = Dictionary(uniqueKeysWithValues: results.map { ($0.delivery_id, $0) })
            #expect(byID[refused.deliveryID!]?.outcome == "applied")
            #expect(results.filter { $0.outcome.hasPrefix("still_") }.count == 2)
            #expect(try await agent.count("select count(*)::int from consent.current_users where user_id = 'good-user'") == 1)
            let marked = try await agent.count("select count(*)::int from consent.deliveries where replayed_at is not null")
            #expect(marked == 1)
            // Replaying again finds nothing new to apply.
            let again = try await Replayer(store: store).replay(.init())
            #expect(again.allSatisfy { $0.replayed_as == nil })
        }
    }

    @Test("retention prunes old deliveries but keeps failed ones not yet replayed")
    func retention() async throws {
        try await AgentHarness.run { agent in
            try await agent.postFixture("didomi/webhooks/nested/user.created.json")
            try await agent.post(body: "not json")
            try await agent.postFixture("didomi/webhooks/nested/user.updated.json")
            try await agent.db.query("update consent.deliveries set received_at = now() - interval '40 days' where id in (select min(id) from consent.deliveries union select min(id) + 1 from consent.deliveries)")
            try await agent.db.query("update consent.delivery_keys set applied_at = now() - interval '40 days'")
            var settings = RetentionService.Settings()
            settings.deliveriesDays = 30
            let totals = try await RetentionService.prune(client: agent.db, settings: settings, logger: TestDatabase.logger)
            #expect(totals["deliveries"] == 1)
            let left = try await agent.db.query("select outcome from consent.deliveries order by id").collect().map { try $0.decode(String.self) }
            #expect(left == ["failed", "applied"])
            // History is the audit trail: kept unless configured otherwise.
            #expect(totals["consent_history"] == nil)
            let history = try await agent.count("select count(*)::int from consent.consent_history")
            #expect(history > 0)

            // retention.history_days: history recorded before the limit goes, the rest stays.
            try await agent.db.query("update consent.consent_history set recorded_at = now() - interval '40 days' where id = (select min(id) from consent.consent_history)")
            try await agent.db.query("update consent.preference_history set recorded_at = now() - interval '40 days'")
            let preferences = try await agent.count("select count(*)::int from consent.preference_history")
            settings.historyDays = 30
            let pruned = try await RetentionService.prune(client: agent.db, settings: settings, logger: TestDatabase.logger)
            #expect(pruned["consent_history"] == 1)
            #expect(pruned["preference_history"] == Int64(preferences))
            #expect(try await agent.count("select count(*)::int from consent.consent_history") == history - 1)
            #expect(try await agent.count("select count(*)::int from consent.preference_history") == 0)
            // The pass finds old history through the recorded_at index (013), not by reading all of it.
            for (table, index) in [("consent_history", "consent_history_recorded_at"), ("preference_history", "preference_history_recorded_at")] {
                let connection = try await TestDatabase.openConnection(url: agent.url)
                try await connection.query("set enable_seqscan = off", logger: TestDatabase.logger)
                let plan = try await connection.query("explain select id from consent.\(unescaped: table) where recorded_at < now() - interval '30 days' limit 10000",
                                                      logger: TestDatabase.logger).collect().map { try $0.decode(String.self) }.joined(separator: "\n")
                try await connection.close()
                #expect(plan.contains(index), "\(plan)")
            }
        }
    }

    @Test("a citizen e-mail refused as malformed is kept for replay and outlives retention; stored ones are not replay work")
    func failedCitizenEmailKept() async throws {
        try await AgentHarness.run { agent in
            let path = "/webhooks/dataguard/citizen-emails"
            let refused = try await agent.post(path, body: "[]")
            #expect(refused.status == .badRequest)
            let failed = try #require(refused.deliveryID)
            let email = try String(contentsOfFile: TestDatabase.fixtures + "/dataguard/webhooks/citizen-email.SPECULATIVE.json", encoding: .utf8)
            let stored = try await agent.post(path, body: email)
            #expect(stored.outcome == "stored", "\(stored.json)")
            try await agent.db.query("update consent.deliveries set received_at = now() - interval '40 days'")

            let store = ConsentStore(client: agent.db, logger: TestDatabase.logger, timeout: .seconds(10))
            let offered = try await Replayer(store: store).replay(.init())
            #expect(offered.map(\.delivery_id) == [failed], "\(offered)")
            #expect(offered.first?.outcome == "still_failed")
            let status = try await StatusReport.load(client: agent.db, logger: TestDatabase.logger)
            #expect(status.kept_not_replayed == 1)

            var settings = RetentionService.Settings()
            settings.deliveriesDays = 30
            _ = try await RetentionService.prune(client: agent.db, settings: settings, logger: TestDatabase.logger)
            #expect(try await agent.count("select count(*)::int from consent.deliveries where id = \(failed)") == 1)
        }
    }

    @Test("a bad configuration value fails with a message naming the key")
    func configurationErrors() async throws {
        func message(_ environment: [String: String]) async -> String {
            do {
                _ = try await AgentConfiguration.load(file: nil, environment: environment)
                return "accepted"
            } catch {
                return "\(error)"
            }
        }
        #expect(await message(["CONSENT_SYNC_HTTP_PORT": "eighty"]).contains("'http.port'"))
        #expect(await message(["CONSENT_SYNC_AUTH_DISABLED": "maybe"]).contains("'auth.disabled'"))
        #expect(await message(["CONSENT_SYNC_NETWORK_DIDOMI_ALLOW": "35.159.1.63/40"]).contains("'network.didomi.allow'"))
        #expect(await message(["DATABASE_URL": "mysql://x"]).contains("'database.url'"))
        #expect(await message(["CONSENT_SYNC_LOG_LEVEL": "loud"]).contains("'log.level'"))
        #expect(await message(["CONSENT_SYNC_AUTH_DATAGUARD_KEY_LOCATION": "cookie"]).contains("'auth.dataguard.key_location'"))
        #expect(await message(["CONSENT_SYNC_HTTP_PORT": "9090", "CONSENT_SYNC_AUTH_DISABLED": "true"]) == "accepted")
        #expect(await message(["CONSENT_SYNC_AUTH_OAUTH_TOKEN_LIFETIME_SECONDS": "1"]) == "accepted")
        #expect(await message(["CONSENT_SYNC_AUTH_OAUTH_TOKEN_LIFETIME_SECONDS": "0"]).contains("auth.oauth.token_lifetime_seconds"))
        #expect(await message(["CONSENT_SYNC_DATABASE_ANSWER_TIMEOUT_MS": "0"]).contains("'database.answer_timeout_ms'"))
        #expect(await message(["CONSENT_SYNC_HTTP_IDLE_TIMEOUT_SECONDS": "0"]).contains("'http.idle_timeout_seconds'"))
        let timeouts = try await AgentConfiguration.load(file: nil, environment: [
            "CONSENT_SYNC_DATABASE_ANSWER_TIMEOUT_MS": "2500", "CONSENT_SYNC_HTTP_IDLE_TIMEOUT_SECONDS": "15"])
        #expect(timeouts.answerTimeout == .milliseconds(2500) && timeouts.idleTimeoutSeconds == 15)
        // API base URLs and regulation names are checked at start, named.
        let didomi = ["CONSENT_SYNC_RECONCILE_DIDOMI_ORGANIZATION_ID": "org", "CONSENT_SYNC_RECONCILE_DIDOMI_API_KEY": "k",
                      "CONSENT_SYNC_RECONCILE_DIDOMI_API_SECRET": "s"]
        for url in ["not a url", "ftp://api.didomi.io/v1", "https:///v1"] {
            let refused = await message(didomi.merging(["CONSENT_SYNC_RECONCILE_DIDOMI_BASE_URL": url]) { $1 })
            #expect(refused.contains("'reconcile.didomi.base_url' must be an http or https URL"), "\(url): \(refused)")
        }
        #expect(await message(didomi.merging(["CONSENT_SYNC_RECONCILE_DIDOMI_BASE_URL": "http://127.0.0.1:9/v1"]) { $1 }) == "accepted")
        #expect(await message(["CONSENT_SYNC_RECONCILE_DATAGUARD_APPLICATION_ID": "app", "CONSENT_SYNC_RECONCILE_DATAGUARD_API_KEY": "k",
                               "CONSENT_SYNC_RECONCILE_DATAGUARD_BASE_URL": "consentric"]).contains("'reconcile.dataguard.base_url'"))
        #expect(await message(didomi.merging(["CONSENT_SYNC_RECONCILE_DIDOMI_REGULATIONS": "gdpr;cpra"]) { $1 })
            .contains("'reconcile.didomi.regulations' must list regulation names"))
        // A list in the environment may be written as the file writes it, a JSON array.
        let arrays = try await AgentConfiguration.load(file: nil, environment: didomi.merging([
            "CONSENT_SYNC_RECONCILE_DIDOMI_REGULATIONS": #"["gdpr", "CPRA"]"#,
            "CONSENT_SYNC_NETWORK_DIDOMI_ALLOW": #"["35.159.1.63/32", "10.0.0.0/8"]"#,
            "CONSENT_SYNC_AUTH_DATAGUARD_API_KEYS": #"["k1","k2"]"#]) { $1 })
        #expect(arrays.reconcile.didomi?.regulations == ["gdpr", "cpra"])
        #expect(arrays.auth.didomiAllow.map(\.description) == ["35.159.1.63/32", "10.0.0.0/8"])
        #expect(arrays.auth.dataguard[.effectivePermissions]?.apiKeys == ["k1", "k2"])
        // Regulations are spelt as the webhooks store them, whatever the operator typed.
        let spelt = try await AgentConfiguration.load(file: nil, environment: [
            "CONSENT_SYNC_RECONCILE_DIDOMI_ORGANIZATION_ID": "org", "CONSENT_SYNC_RECONCILE_DIDOMI_API_KEY": "k",
            "CONSENT_SYNC_RECONCILE_DIDOMI_API_SECRET": "s", "CONSENT_SYNC_RECONCILE_DIDOMI_REGULATIONS": "GDPR, cpra,"])
        #expect(spelt.reconcile.didomi?.regulations == ["gdpr", "cpra"])

        let file = FileManager.default.temporaryDirectory.appendingPathComponent("cs-\(UUID().uuidString).json").path
        try #"{"http": {"port": 9191}, "ingest": {"max_batch": 64}, "auth": {"dataguard": {"api_keys": ["k1", "k2"]}}}"#
            .write(toFile: file, atomically: true, encoding: .utf8)
        let loaded = try await AgentConfiguration.load(file: file, environment: ["CONSENT_SYNC_INGEST_MAX_BATCH": "32"])
        #expect(loaded.port == 9191)
        #expect(loaded.ingest.maxBatch == 32)
        #expect(loaded.auth.dataguard[.effectivePermissions]?.apiKeys == ["k1", "k2"])
        let missing = await {
            do { _ = try await AgentConfiguration.load(file: "/nonexistent.json", environment: [:]); return "accepted" } catch { return "\(error)" }
        }()
        #expect(missing.contains("/nonexistent.json"))
        // Named by CONSENT_SYNC_CONFIG (as the units do) and missing: never taken for "no file", which
        // would start the agent on defaults without a word (unreadable: CommandLineTests).
        let missingByEnvironment = await {
            do { _ = try await AgentConfiguration.load(file: nil, environment: ["CONSENT_SYNC_CONFIG": "/nonexistent.json"]); return "accepted" }
            catch { return "\(error)" }
        }()
        #expect(missingByEnvironment.contains("/nonexistent.json does not exist (named by CONSENT_SYNC_CONFIG)"), "\(missingByEnvironment)")

        // A misspelt key in the file stops the start, named, with the key it probably meant; in the
        // environment (shared with other programs) it is reported, not fatal.
        func fileMessage(_ json: String) async throws -> String {
            try json.write(toFile: file, atomically: true, encoding: .utf8)
            do { _ = try await AgentConfiguration.load(file: file, environment: [:]); return "accepted" } catch { return "\(error)" }
        }
        // The shipped example uses known keys only.
        let example = try await AgentConfiguration.load(file: TestDatabase.repositoryRoot + "/config/consent-sync.example.json", environment: [:])
        #expect(example.ingest.maxBatch == 128)
        let typo = try await fileMessage(#"{"http": {"prot": 9191}}"#)
        #expect(typo.contains("unknown key 'http.prot'") && typo.contains("did you mean 'http.port'"), "\(typo)")
        let stranger = try await fileMessage(#"{"auth": {"disabled": true}, "colour": "blue"}"#)
        #expect(stranger.contains("unknown key 'colour'"), "\(stranger)")
        let keys = file + ".keys"
        try "receipts-key\n".write(toFile: keys, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: keys) }
        let nested = try await fileMessage(#"{"network": {"dataguard": {"allow": ["10.0.0.0/8"], "citizen_emails": {"allow": "10.1.0.0/16"}}}, "auth": {"dataguard": {"consent_receipts": {"api_keys_file": "KEYS"}}}}"#
            .replacingOccurrences(of: "KEYS", with: keys))
        #expect(nested == "accepted", "\(nested)")
        let environment = try await AgentConfiguration.load(file: nil, environment: [
            "CONSENT_SYNC_HTTP_PROT": "1", "CONSENT_SYNC_HTTP_PORT": "9090",
            "CONSENT_SYNC_NETWORK_DATAGUARD_ALLOW": "10.0.0.0/8",
            "CONSENT_SYNC_NETWORK_DATAGUARD_CONSENT_RECEIPTS_ALLOW": "192.168.0.0/16"])
        #expect(environment.unknownEnvironmentKeys == ["CONSENT_SYNC_HTTP_PROT"])
        #expect(environment.auth.dataguard[.effectivePermissions]?.allow.map(\.description) == ["10.0.0.0/8"])
        #expect(environment.auth.dataguard[.consentReceipts]?.allow.map(\.description) == ["192.168.0.0/16"])
        // An endpoint's own credentials replace the shared ones of both kinds.
        let scoped = try await AgentConfiguration.load(file: nil, environment: [
            "CONSENT_SYNC_AUTH_DATAGUARD_API_KEYS": "shared-key", "CONSENT_SYNC_AUTH_DATAGUARD_BEARER_TOKENS": "shared-token",
            "CONSENT_SYNC_AUTH_DATAGUARD_CITIZEN_EMAILS_API_KEYS": "mail-key"])
        #expect(scoped.auth.dataguard[.citizenEmails]?.apiKeys == ["mail-key"])
        #expect(scoped.auth.dataguard[.citizenEmails]?.bearerTokens == [])
        #expect(scoped.auth.dataguard[.consentReceipts]?.apiKeys == ["shared-key"])
        #expect(scoped.auth.dataguard[.consentReceipts]?.bearerTokens == ["shared-token"])
    }

    @Test("the database password can live apart from the URL: a key, a file or the database-password credential; a URL with its own keeps it")
    func databasePassword() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cs-credentials-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // As the units load it: the credentials directory, each file FILE as consent-sync_FILE.
        try "from, the credential \n".write(toFile: directory + "/consent-sync_database-password", atomically: true, encoding: .utf8)
        try "dg-key-1\ndg-key-2\n".write(toFile: directory + "/consent-sync_dataguard-api-keys", atomically: true, encoding: .utf8)
        try "from-the-file\nsecond line ignored\n".write(toFile: directory + "/file", atomically: true, encoding: .utf8)
        let url = "postgres://mirror:in-the-url@db.internal:5432/consent"

        let credential = try await AgentConfiguration.load(file: nil, environment: ["DATABASE_URL": url, "CREDENTIALS_DIRECTORY": directory])
        #expect(credential.databasePassword == "from, the credential ")
        #expect(credential.auth.dataguard[.effectivePermissions]?.apiKeys == ["dg-key-1", "dg-key-2"])
        #expect(try Agent.clientConfiguration(url: "postgres://mirror@db.internal:5432/consent", configuration: credential).password
                == "from, the credential ")
        // DATABASE_URL overrides the configuration: a password it carries is the one used.
        #expect(try Agent.clientConfiguration(url: url, configuration: credential).password == "in-the-url")
        let file = try await AgentConfiguration.load(file: nil, environment: [
            "DATABASE_URL": url, "CREDENTIALS_DIRECTORY": directory, "CONSENT_SYNC_DATABASE_PASSWORD_FILE": directory + "/file"])
        #expect(file.databasePassword == "from-the-file")
        let key = try await AgentConfiguration.load(file: nil, environment: ["DATABASE_URL": url, "CONSENT_SYNC_DATABASE_PASSWORD": "a,b c"])
        #expect(key.databasePassword == "a,b c")
        let none = try await AgentConfiguration.load(file: nil, environment: ["DATABASE_URL": url])
        #expect(none.databasePassword == nil)
        #expect(try Agent.clientConfiguration(url: url, configuration: none).password == "in-the-url")
        let unreadable = await {
            do {
                _ = try await AgentConfiguration.load(file: nil, environment: ["CONSENT_SYNC_DATABASE_PASSWORD_FILE": directory + "/absent"])
                return "accepted"
            } catch { return "\(error)" }
        }()
        #expect(unreadable.contains("'database.password_file'"))
    }

    @Test("a second process on the embedded cluster (status, clients beside serve) uses the running server and leaves it running")
    func embeddedClusterShared() async throws {
        let serving = try await EmbeddedPostgres.privateTestCluster("shared")
        let directory = serving.options.directory
        let pidFile = serving.dataDirectory + "/postmaster.pid"
        let pid = try String(contentsOfFile: pidFile, encoding: .utf8).split(separator: "\n").first.map(String.init)

        let operator_ = EmbeddedPostgres(options: serving.options, logger: TestDatabase.logger)
        try await operator_.start()
        _ = try await TestDatabase.withClient(url: operator_.url(database: "postgres")) { client in
            try await client.query("select 1")
        }
        await operator_.stop()

        // Still the first server, still accepting connections.
        #expect(try String(contentsOfFile: pidFile, encoding: .utf8).split(separator: "\n").first.map(String.init) == pid)
        let answer = try await TestDatabase.withClient(url: serving.url(database: "postgres")) { client in
            try await client.query("select 1").collect().first?.decode(Int.self)
        }
        #expect(answer == 1)
        await serving.stop()
        #expect(!FileManager.default.fileExists(atPath: pidFile))
        try? FileManager.default.removeItem(atPath: directory)
    }

    @Test("an ordinary database owner migrates (no superuser); without CREATEROLE the error says to create consent_analyst")
    func migrateAsDatabaseOwner() async throws {
        let cluster = try await EmbeddedPostgres.privateTestCluster("owner")
        let admin = cluster.url(database: "postgres")
        try await TestDatabase.withClient(url: admin) { client in
            try await client.query("create role app_owner login")
            try await client.query("create database app owner app_owner")
        }
        var components = URLComponents(string: TestDatabase.replacingDatabase(in: admin, with: "app"))!
        components.user = "app_owner"
        let owner = components.string!
        let migrator = try TestDatabase.migrator()

        let refused = await #expect(throws: Migrator.MigrationError.self) {
            try await TestDatabase.withClient(url: owner) { client in _ = try await migrator.migrate(client: client, logger: TestDatabase.logger) }
        }
        #expect(refused?.description.contains("CREATE ROLE consent_analyst NOLOGIN") == true, "\(refused?.description ?? "")")

        _ = try await TestDatabase.withClient(url: admin) { client in try await client.query("create role consent_analyst nologin") }
        let pending = try await TestDatabase.withClient(url: owner) { client in
            _ = try await migrator.migrate(client: client, logger: TestDatabase.logger)
            return try await migrator.pending(client: client, logger: TestDatabase.logger).count
        }
        #expect(pending == 0)
        let readable = try await TestDatabase.withClient(url: TestDatabase.replacingDatabase(in: admin, with: "app")) { client in
            try await client.query("""
                select has_table_privilege('consent_analyst', 'consent.current_consents', 'select')
                   and not has_table_privilege('consent_analyst', 'consent.consents', 'select')
                """).collect().first?.decode(Bool.self)
        }
        #expect(readable == true)
        await cluster.stop()
        try? FileManager.default.removeItem(atPath: cluster.options.directory)
    }

    @Test("DATABASE_URL without a user or a host reads as libpq does: the operating-system user, its database, the local socket")
    func databaseURLDefaults() async throws {
        let user = DatabaseURL.operatingSystemUser
        #expect(!user.isEmpty)
        let named = try DatabaseURL.configuration("postgres://db.internal:6543/consent")
        #expect(named.username == user)
        #expect(named.database == "consent")
        #expect(named.host == "db.internal" && named.port == 6543)
        #expect(try DatabaseURL.configuration("postgres://db.internal").database == user)
        #expect(try DatabaseURL.configuration("postgres://@db.internal/consent?user=mirror").username == "mirror")
        #expect(try DatabaseURL.configuration("postgres:///consent?host=db.internal").host == "db.internal")
        let local = try DatabaseURL.configuration("postgresql:///consent?port=6543")
        if FileManager.default.fileExists(atPath: "\(DatabaseURL.defaultSocketDirectory)/.s.PGSQL.6543") {
            #expect(local.unixSocketPath == "\(DatabaseURL.defaultSocketDirectory)/.s.PGSQL.6543")
        } else {
            #expect(local.host == "localhost" && local.port == 6543)
        }

        // A real connection with no user in the URL logs in as the operating-system user.
        let cluster = try await EmbeddedPostgres.privateTestCluster("osuser")
        let admin = cluster.url(database: "postgres")
        if user != EmbeddedPostgres.serverUser {
            try await TestDatabase.withClient(url: admin) { client in
                try await client.query(PostgresQuery(unsafeSQL: "create role \"\(user)\" login"))
            }
        }
        var components = URLComponents(string: admin)!
        components.user = nil
        components.path = "/postgres"
        let current = try await TestDatabase.withClient(url: components.string!) { client in
            try await client.query("select current_user::text").collect().first?.decode(String.self)
        }
        #expect(current == user)
        await cluster.stop()
        try? FileManager.default.removeItem(atPath: cluster.options.directory)
    }

    @Test("sslmode as libpq reads it: prefer and require accept a self-signed server certificate, verify-full refuses it")
    func sslModes() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("consent-sync-tls-\(UUID().uuidString)").path
        let port = Int.random(in: 20_000..<40_000)
        var options = EmbeddedPostgres.Options(directory: directory, port: port)
        options.durable = false
        let cluster = EmbeddedPostgres(options: options, logger: TestDatabase.logger)
        try await cluster.start()
        TestClusterReaper.register(cluster)
        // A self-signed certificate, readable by the server only.
        let data = cluster.dataDirectory
        let openssl = Process()
        openssl.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        openssl.arguments = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=db.invalid",
                             "-keyout", data + "/server.key", "-out", data + "/server.crt"]
        openssl.standardError = FileHandle.nullDevice
        try openssl.run()
        openssl.waitUntilExit()
        #expect(openssl.terminationStatus == 0)
        for file in ["server.key", "server.crt"] {
            var attributes: [FileAttributeKey: Any] = [.posixPermissions: 0o600]
            if getuid() == 0 { attributes[.ownerAccountName] = "postgres" }
            try FileManager.default.setAttributes(attributes, ofItemAtPath: data + "/" + file)
        }
        try await TestDatabase.withClient(url: cluster.url(database: "postgres")) { client in
            try await client.query("alter system set ssl = on")
            try await client.query("select pg_reload_conf()")
        }
        try await Task.sleep(for: .milliseconds(300))

        func encrypted(_ mode: String) async throws -> Bool? {
            let url = "postgres://\(EmbeddedPostgres.serverUser)@127.0.0.1:\(port)/postgres?sslmode=\(mode)"
            return try await TestDatabase.withClient(url: url) { client in
                try await client.query("select ssl from pg_stat_ssl where pid = pg_backend_pid()").collect().first?.decode(Bool.self)
            }
        }
        #expect(try await encrypted("prefer") == true)
        #expect(try await encrypted("require") == true)
        #expect(try await encrypted("disable") == false)
        // The pool keeps retrying a connection that fails: no answer within a few seconds is a refusal too.
        let verified = await withTaskGroup(of: Bool?.self) { group in
            group.addTask { (try? await encrypted("verify-full")) ?? false }
            group.addTask { try? await Task.sleep(for: .seconds(4)); return nil }
            let first = await group.next() ?? nil
            group.cancelAll()
            return first
        }
        #expect(verified != true, "a self-signed certificate passed verify-full")
        #expect(throws: DatabaseURL.InvalidURL.self) { _ = try DatabaseURL.configuration("postgres://u@h/db?sslmode=sometimes") }
        // PRODUCT §3: a password is never logged, wherever the URL carries it.
        #expect(DatabaseURL.redacted("postgres://u:S3CRET@h:5432/db?sslmode=require") == "postgres://u:***@h:5432/db?sslmode=require")
        #expect(DatabaseURL.redacted("postgres://u@/db?host=/run/pg&password=S3CRET") == "postgres://u@/db?host=/run/pg&password=***")
        #expect(DatabaseURL.redacted("postgres://u@h/db") == "postgres://u@h/db")
        await cluster.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}
