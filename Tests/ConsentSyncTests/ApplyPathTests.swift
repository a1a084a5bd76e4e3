import AsyncHTTPClient
import ConsentCore
import ConsentServer
import ConsentStore
import Foundation
import HTTPTypes
import Logging
import NIOConcurrencyHelpers
import NIOCore
import PostgresNIO
import Testing

/// The apply path below HTTP: batches, failure isolation, database outages, migrations, the analysts' role.
@Suite("Apply path")
struct ApplyPathTests {
    static func pending(_ body: String) -> PendingDelivery {
        PendingDelivery(change: DidomiDecoder.decode(Data(body.utf8), receivedAt: Date()), body: ByteBuffer(string: body))
    }

    @Test("two deliveries for one user in one batch: ordering and idempotency hold inside the batch")
    func sameUserTwiceInOneBatch() async throws {
        let url = try await TestDatabase.shared.freshDatabase()
        try await TestDatabase.withClient(url: url) { client in
            let store = ConsentStore(client: client, logger: TestDatabase.logger, timeout: .seconds(10))
            let newer = Didomi.user(version: 7, updatedAt: "2025-03-07T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#)
            let older = Didomi.user(version: 6, updatedAt: "2025-03-06T00:00:00Z", purposes: #"[{"id":"a","enabled":false}]"#)
            let results = try await store.apply([Self.pending(newer), Self.pending(older), Self.pending(newer), Self.pending("nope")])
            #expect(results.map(\.outcome) == [.applied, .stale, .duplicate, .failed])
            let status = try await client.query("select status from consent.current_consents where user_id = 'u-1'")
                .collect().first?.decode(String.self)
            #expect(status == "granted")
        }
    }

    @Test("a delivery the database refuses does not fail its neighbours, and is kept for replay")
    func badDeliveryBesideGoodOnes() async throws {
        let url = try await TestDatabase.shared.freshDatabase()
        try await TestDatabase.withClient(url: url) { client in
            let store = ConsentStore(client: client, logger: TestDatabase.logger, timeout: .seconds(10))
            var settings = Ingestor.Configuration()
            settings.workers = 1
            let ingestor = Ingestor(store: store, configuration: settings, logger: TestDatabase.logger)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await ingestor.run() }
                // An id far too long for an index entry (random, so it does not compress) decodes, but
                // PostgreSQL refuses it: the whole batch fails.
                let poison = Didomi.user(id: (0..<1200).map { _ in UUID().uuidString }.joined(), version: 1,
                                         updatedAt: "2025-03-01T00:00:00Z", purposes: "[]")
                let bodies = (1...8).map { Didomi.user(id: "u-\($0)", version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                                      purposes: #"[{"id":"a","enabled":true}]"#) } + [poison]
                let outcomes = try await withThrowingTaskGroup(of: String.self) { inner in
                    for body in bodies.shuffled() {
                        inner.addTask {
                            do {
                                return try await ingestor.submit(Self.pending(body)).outcome.rawValue
                            } catch let kept as DeliveryKept {
                                return "kept:\(kept.result.outcome.rawValue)"
                            }
                        }
                    }
                    return try await inner.reduce(into: [String]()) { $0.append($1) }
                }
                #expect(outcomes.filter { $0 == "applied" }.count == 8)
                #expect(outcomes.filter { $0 == "kept:failed" }.count == 1)
                let users = try await client.query("select count(*)::int from consent.current_users").collect().first?.decode(Int.self)
                #expect(users == 8)
                let kept = try await client.query("select count(*)::int from consent.deliveries where outcome = 'failed' and reason like 'database rejected%'")
                    .collect().first?.decode(Int.self)
                #expect(kept == 1)
                group.cancelAll()
            }
        }
    }

    @Test("the connection dies mid-batch: every request of the batch gets 503, nothing is half-applied; the retry applies")
    func connectionLostMidBatch() async throws {
        try await AgentHarness.run(configure: { $0.ingest.workers = 1; $0.applyTimeout = .seconds(5) }) { agent in
            // Every delivery insert waits on a lock the test holds, so that each batch is in flight
            // when the test kills its connection.
            try await agent.db.query("""
                create function hold_deliveries() returns trigger language plpgsql as $$
                begin perform pg_advisory_xact_lock_shared(4242); return new; end $$
                """)
            try await agent.db.query("create trigger slow after insert on consent.deliveries for each row execute function hold_deliveries()")
            let bodies = (1...6).map { Didomi.user(id: "u-\($0)", version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                                  purposes: #"[{"id":"a","enabled":true},{"id":"b","enabled":false}]"#) }
            let gate = try await TestDatabase.openConnection(url: agent.url)
            try await gate.query("select pg_advisory_lock(4242)", logger: TestDatabase.logger)
            // Stopped by a flag, not by cancelling it: a query whose task is cancelled mid-flight makes
            // the driver close its connection under it.
            let stop = NIOLockedValueBox(false)
            let killer = Task {
                while !stop.withLockedValue({ $0 }) {
                    _ = try? await agent.db.query("""
                        select pg_terminate_backend(pid) from pg_stat_activity
                         where datname = current_database() and wait_event_type = 'Lock' and wait_event = 'advisory'
                           and query like '%apply_batch%'
                        """).collect()
                    try? await Task.sleep(for: .milliseconds(50))
                }
            }
            // The gate is closed whatever happens (a connection must be closed before it goes away).
            var statuses: [Int] = []
            var failure: (any Error)?
            do {
                statuses = try await withThrowingTaskGroup(of: Int.self) { group in
                    for body in bodies { group.addTask { Int(try await agent.post(body: body).status.code) } }
                    return try await group.reduce(into: [Int]()) { $0.append($1) }
                }
            } catch {
                failure = error
            }
            stop.withLockedValue { $0 = true }
            _ = await killer.result
            try await gate.close()
            if let failure { throw failure }
            #expect(statuses == Array(repeating: 503, count: 6))
            #expect(try await agent.count("select count(*)::int from consent.deliveries") == 0)
            #expect(try await agent.count("select count(*)::int from consent.consents") == 0)
            #expect(try await agent.count("select count(*)::int from consent.delivery_keys") == 0)

            try await agent.db.query("drop trigger slow on consent.deliveries")
            for body in bodies {
                var reply = try await agent.post(body: body)
                for _ in 0..<50 where reply.status != .ok {
                    try await Task.sleep(for: .milliseconds(100))
                    reply = try await agent.post(body: body)
                }
                #expect(reply.outcome == "applied")
            }
            #expect(try await agent.count("select count(*)::int from consent.consents") == 12)
        }
    }

    @Test("the apply queue is bounded: beyond it requests get 503 overloaded with Retry-After at once and write nothing")
    func queueFullBackPressure() async throws {
        try await AgentHarness.run(configure: {
            $0.ingest.workers = 1; $0.ingest.maxBatch = 1; $0.ingest.queueCapacity = 2; $0.applyTimeout = .seconds(30)
        }) { agent in
            // The one worker's batch waits on a lock the test holds: the queue fills behind it.
            try await agent.db.query("""
                create function hold_deliveries() returns trigger language plpgsql as $$
                begin perform pg_advisory_xact_lock_shared(4243); return new; end $$
                """)
            try await agent.db.query("create trigger slow after insert on consent.deliveries for each row execute function hold_deliveries()")
            let gate = try await TestDatabase.openConnection(url: agent.url)
            try await gate.query("select pg_advisory_lock(4243)", logger: TestDatabase.logger)

            let bodies = (1...10).map { Didomi.user(id: "q-\($0)", version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                                   purposes: #"[{"id":"a","enabled":true}]"#) }
            // Real concurrent connections (the harness's test client sends one request at a time).
            struct Answer: Sendable { var status: Int; var error: String?; var outcome: String?; var retryAfter: String? }
            let port = try #require(agent.client.port)
            let replies = Task {
                try await withThrowingTaskGroup(of: Answer.self) { group in
                    for body in bodies {
                        group.addTask {
                            var request = HTTPClientRequest(url: "http://127.0.0.1:\(port)/webhooks/didomi")
                            request.method = .POST
                            request.headers.add(name: "Content-Type", value: "application/json")
                            request.body = .bytes(ByteBuffer(string: body))
                            let response = try await HTTPClient.shared.execute(request, timeout: .seconds(60))
                            let bytes = try await response.body.collect(upTo: 1 << 20)
                            let json = (try? JSONSerialization.jsonObject(with: Data(buffer: bytes))) as? [String: Any] ?? [:]
                            return Answer(status: Int(response.status.code), error: json["error"] as? String,
                                          outcome: json["status"] as? String, retryAfter: response.headers.first(name: "Retry-After"))
                        }
                    }
                    return try await group.reduce(into: [Answer]()) { $0.append($1) }
                }
            }
            // The refused ones are answered while the accepted ones still wait.
            var waited = 0
            while try await agent.count("""
                select count(*)::int from pg_stat_activity
                 where datname = current_database() and wait_event = 'advisory' and query like '%apply_batch%'
                """) == 0, waited < 100 {
                try await Task.sleep(for: .milliseconds(50)); waited += 1
            }
            try await Task.sleep(for: .milliseconds(500))
            try await gate.query("select pg_advisory_unlock(4243)", logger: TestDatabase.logger)
            try await gate.close()
            let all = try await replies.value

            let refused = all.filter { $0.status == 503 }
            let applied = all.filter { $0.status == 200 }
            #expect(refused.count + applied.count == 10)
            #expect(applied.count >= 1 && applied.count <= 3)   // one in flight, at most two queued
            #expect(!refused.isEmpty)
            for reply in refused {
                #expect(reply.error == "overloaded")
                #expect(reply.retryAfter != nil)
            }
            #expect(applied.allSatisfy { $0.outcome == "applied" })
            #expect(try await agent.count("select count(*)::int from consent.deliveries") == applied.count)
        }
    }

    @Test("database down: 503 with Retry-After in well under a second (webhooks, token checks, token requests), nothing written; recovery by itself")
    func databaseDownThenRecovery() async throws {
        let cluster = try await EmbeddedPostgres.privateTestCluster("outage")
        let admin = cluster.url(database: "postgres")
        _ = try await TestDatabase.withClient(url: admin) { client in
            try await client.query("create database outage")
        }
        let url = TestDatabase.replacingDatabase(in: admin, with: "outage")
        _ = try await TestDatabase.withClient(url: url) { client in
            try await TestDatabase.migrator().migrate(client: client, logger: TestDatabase.logger)
        }
        // Authentication on, tokens checked in the database on every request (no cache): the token
        // check and the token endpoint must fail as fast as the apply path.
        let configure: @Sendable (inout AgentConfiguration) -> Void = {
            $0.applyTimeout = .milliseconds(500)
            $0.authDisabled = false
            $0.auth.tokenCacheSeconds = 0
        }
        try await AgentHarness.run(configure: configure, databaseURL: url) { agent in
            let (clientID, secret) = try await OAuthRepository(client: agent.db, logger: TestDatabase.logger)
                .createClient(name: "didomi-outage")
            let form = "grant_type=client_credentials&client_id=\(clientID)&client_secret=\(secret)"
            let issued = try await agent.post("/oauth/token", body: form, contentType: "application/x-www-form-urlencoded")
            let token = try #require(issued.json["access_token"] as? String)
            let bearer = [("Authorization", "Bearer \(token)")]
            let first = try await agent.post(body: Didomi.user(version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                                               purposes: #"[{"id":"a","enabled":true}]"#),
                                             headers: bearer)
            #expect(first.outcome == "applied")

            await cluster.stop()
            let second = Didomi.user(version: 2, updatedAt: "2025-03-02T00:00:00Z", purposes: #"[{"id":"a","enabled":false}]"#)
            for (path, body, type, headers) in [("/webhooks/didomi", second, "application/json", bearer),
                                                ("/oauth/token", form, "application/x-www-form-urlencoded", [])] {
                let started = ContinuousClock.now
                let down = try await agent.post(path, body: body, contentType: type, headers: headers)
                let elapsed = ContinuousClock.now - started
                #expect(down.status == .serviceUnavailable, "\(path): \(down.json)")
                #expect(down.headers[.retryAfter] != nil, "\(path)")
                #expect(elapsed < .milliseconds(900), "\(path) answered in \(elapsed)")
            }

            try await cluster.start()
            var recovered: AgentHarness.Reply?
            for _ in 0..<100 {
                let reply = try await agent.post(body: second, headers: bearer)
                if reply.status == .ok { recovered = reply; break }
                try await Task.sleep(for: .milliseconds(200))
            }
            #expect(recovered?.outcome == "applied")
            // The outage wrote nothing: two deliveries in all, the state is version 2.
            #expect(try await agent.count("select count(*)::int from consent.deliveries") == 2)
            #expect(try await agent.consents(user: "u-1") == ["a": "denied"])
        }
        await cluster.stop()
    }

    @Test("a database that stops answering (frozen, or cut off without a reset) gets 503 within the answer deadline, not a hang; the agent recovers when it answers again")
    func frozenDatabase() async throws {
        let cluster = try await EmbeddedPostgres.privateTestCluster("frozen")
        let admin = cluster.url(database: "postgres")
        _ = try await TestDatabase.withClient(url: admin) { client in
            try await client.query("create database frozen")
        }
        let url = TestDatabase.replacingDatabase(in: admin, with: "frozen")
        _ = try await TestDatabase.withClient(url: url) { client in
            try await TestDatabase.migrator().migrate(client: client, logger: TestDatabase.logger)
        }
        /// SIGSTOP or SIGCONT to the server and every process it started.
        @Sendable func signalServer(_ signal: Int32) throws {
            let pidFile = try String(contentsOfFile: cluster.dataDirectory + "/postmaster.pid", encoding: .utf8)
            let server = try #require(pidFile.split(separator: "\n").first.flatMap { pid_t($0) })
            kill(server, signal)
            for entry in try FileManager.default.contentsOfDirectory(atPath: "/proc") where entry.allSatisfy(\.isNumber) {
                guard let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
                      let close = stat.lastIndex(of: ")") else { continue }
                let fields = stat[stat.index(after: close)...].split(separator: " ")
                if fields.count > 1, pid_t(fields[1]) == server, let pid = pid_t(entry) { kill(pid, signal) }
            }
        }
        try await AgentHarness.run(configure: { $0.applyTimeout = .milliseconds(500) }, databaseURL: url) { agent in
            let first = try await agent.post(body: Didomi.user(version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                                               purposes: #"[{"id":"a","enabled":true}]"#))
            #expect(first.outcome == "applied")

            try signalServer(SIGSTOP)
            defer { try? signalServer(SIGCONT) }
            let second = Didomi.user(version: 2, updatedAt: "2025-03-02T00:00:00Z", purposes: #"[{"id":"a","enabled":false}]"#)
            let started = ContinuousClock.now
            let frozen = try await agent.post(body: second)
            let elapsed = ContinuousClock.now - started
            #expect(frozen.status == .serviceUnavailable, "\(frozen.json)")
            #expect(frozen.headers[.retryAfter] != nil)
            #expect(elapsed < .milliseconds(500) + ConsentStore.answerDeadline + .seconds(2), "answered in \(elapsed)")
            let probe = ContinuousClock.now
            #expect(try await agent.client.execute(uri: "/readyz", method: .get).status == .serviceUnavailable)
            #expect(ContinuousClock.now - probe < .seconds(3))

            try signalServer(SIGCONT)
            var recovered: AgentHarness.Reply?
            for _ in 0..<100 {
                let reply = try await agent.post(body: second)
                if reply.status == .ok { recovered = reply; break }
                try await Task.sleep(for: .milliseconds(200))
            }
            // The frozen statement may have committed once the server went on: the retry is then a duplicate.
            #expect(["applied", "duplicate"].contains(recovered?.outcome ?? "-"), "\(recovered?.json ?? [:])")
            #expect(try await agent.consents(user: "u-1") == ["a": "denied"])
        }
        await cluster.stop()
    }

    @Test("two migrate runs at once are safe; an edited released migration is refused")
    func migrations() async throws {
        let admin = try await TestDatabase.shared.adminURL()
        let name = "m_" + UUID().uuidString.prefix(8).lowercased()
        _ = try await TestDatabase.withClient(url: admin) { client in
            try await client.query(PostgresQuery(unsafeSQL: "create database \(name)"))
        }
        let url = TestDatabase.replacingDatabase(in: admin, with: name)
        let migrator = try TestDatabase.migrator()
        try await TestDatabase.withClient(url: url) { client in
            let applied = try await withThrowingTaskGroup(of: [Int].self) { group in
                for _ in 0..<3 { group.addTask { try await migrator.migrate(client: client, logger: TestDatabase.logger) } }
                return try await group.reduce(into: [Int]()) { $0 += $1 }
            }
            #expect(applied.sorted() == migrator.migrations.map(\.version))
            #expect(try await migrator.pending(client: client, logger: TestDatabase.logger).isEmpty)

            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("sql-\(UUID().uuidString)").path
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            for migration in migrator.migrations {
                let sql = migration.version == 1 ? migration.sql + "\n-- edited\n" : migration.sql
                try sql.write(toFile: "\(directory)/\(migration.name)", atomically: true, encoding: .utf8)
            }
            let edited = try Migrator(directory: directory)
            await #expect(throws: Migrator.MigrationError.self) {
                try await edited.migrate(client: client, logger: TestDatabase.logger)
            }
        }
    }

    @Test("consent_analyst reads the views (the history too) and consents_as_of, and nothing else")
    func analystRole() async throws {
        try await AgentHarness.run { agent in
            try await agent.postFixture("didomi/webhooks/nested/user.updated.json")
            let rows = try await agent.db.withConnection { connection in
                try await connection.query("set role consent_analyst", logger: TestDatabase.logger)
                let count = try await connection.query("select count(*)::int from consent.current_consents", logger: TestDatabase.logger)
                    .collect().first?.decode(Int.self)
                let asOf = try await connection.query("select count(*)::int from consent.consents_as_of(now())", logger: TestDatabase.logger)
                    .collect().first?.decode(Int.self)
                var refused = false
                do {
                    _ = try await connection.query("select count(*) from consent.consents", logger: TestDatabase.logger).collect()
                } catch { refused = true }
                var applyRefused = false
                do {
                    _ = try await connection.query("select * from consent.apply_batch('[]', '{}')", logger: TestDatabase.logger).collect()
                } catch { applyRefused = true }
                // The history, with what caused each change and the delivery that carried it.
                let changes = try await connection.query("""
                    select count(*)::int from consent.consent_changes
                     where cause like 'didomi:user:%' and delivery_id is not null and status is not null
                       and previous_status is null and item_kind = 'purpose'
                    """, logger: TestDatabase.logger).collect().first?.decode(Int.self)
                let preferenceChanges = try await connection.query(
                    "select count(*)::int from consent.preference_changes where value_ids is not null and delivery_id is not null",
                    logger: TestDatabase.logger).collect().first?.decode(Int.self)
                try await connection.query("reset role", logger: TestDatabase.logger)
                let readable = try await connection.query("""
                    select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace
                     where n.nspname = 'consent' and has_table_privilege('consent_analyst', c.oid, 'select')
                     order by 1
                    """, logger: TestDatabase.logger).collect().map { try $0.decode(String.self) }
                #expect(changes == 4)
                #expect(preferenceChanges == 2)  // topics and frequency under newsletter
                #expect(readable == ["consent_changes", "current_consents", "current_preferences", "current_users",
                                     "current_vendor_consents", "preference_changes"])
                // Of everything in the schema, the role may execute consents_as_of only.
                let executable = try await connection.query("""
                    select p.oid::regprocedure::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                     where n.nspname = 'consent' and has_function_privilege('consent_analyst', p.oid, 'execute')
                     order by 1
                    """, logger: TestDatabase.logger).collect().map { try $0.decode(String.self) }
                return (count, asOf, refused, applyRefused, executable)
            }
            #expect(rows.0 == 4)
            #expect(rows.1 == 4)
            #expect(rows.2)
            #expect(rows.3)
            #expect(rows.4 == ["consent.consents_as_of(timestamp with time zone)"])
        }
    }

    @Test("every table, view and column of schema consent has a comment")
    func everythingCommented() async throws {
        try await AgentHarness.run { agent in
            let missing = try await agent.db.query("""
                select c.relname || coalesce('.' || a.attname, '')
                  from pg_class c join pg_namespace n on n.oid = c.relnamespace
                  left join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                 where n.nspname = 'consent' and c.relkind in ('r', 'v')
                   and ((a.attname is null and obj_description(c.oid, 'pg_class') is null)
                     or (a.attname is not null and col_description(c.oid, a.attnum) is null))
                """).collect().map { try $0.decode(String.self) }
            #expect(missing == [], "without COMMENT ON: \(missing)")
        }
    }

    @Test("consents_as_of answers from the history by source-side time")
    func consentsAsOf() async throws {
        try await AgentHarness.run { agent in
            try await agent.postFixture("didomi/webhooks/nested/user.updated.json")  // v4 at 2025-03-14 09:21:07.530
            try await agent.postFixture("didomi/webhooks/pending-existing-user/01-event.created.pending.json")
            try await agent.postFixture("didomi/webhooks/pending-existing-user/02-event.updated.confirmed.json")  // 08:02:55.017 on 03-18
            func sms(at: String) async throws -> String? {
                try await agent.scalar("""
                    select status || ':' || in_force from consent.consents_as_of(\(at)::timestamptz)
                     where user_id = \(Users.alice) and purpose_id = 'sms_offers'
                    """, as: String.self)
            }
            #expect(try await sms(at: "2025-03-13T00:00:00Z") == nil)
            #expect(try await sms(at: "2025-03-15T00:00:00Z") == "denied:false")
            #expect(try await sms(at: "2025-03-18T09:00:00Z") == "granted:true")
        }
    }

    @Test("consents_as_of has the columns of current_consents, in order, and as of now it is current_consents")
    func consentsAsOfColumns() async throws {
        try await AgentHarness.run { agent in
            try await agent.postFixture("didomi/webhooks/nested/user.updated.json")
            try await agent.postFixture("didomi/webhooks/pending-existing-user/01-event.created.pending.json")
            try await agent.postFixture("didomi/webhooks/pending-existing-user/02-event.updated.confirmed.json")
            try await agent.post("/webhooks/dataguard/effective-permissions", body: DataGuard.body(permissions: [
                DataGuard.permission("o1", transaction: "t1", obtainedAt: "2025-03-01T00:00:00Z"),
            ], sentAt: "2025-03-01T00:00:05Z"))

            func columns(_ relation: String) async throws -> [String] {
                try await agent.db.query("""
                    select a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                      from pg_attribute a where a.attrelid = \(relation)::regclass and a.attnum > 0 order by a.attnum
                    """).collect().map { try $0.decode(String.self) }
            }
            let function = try await agent.db.query("""
                select unnest(p.proargnames[2:]) || ' ' || format_type(unnest(p.proallargtypes[2:]), null)
                  from pg_proc p where p.oid = 'consent.consents_as_of(timestamptz)'::regprocedure
                """).collect().map { try $0.decode(String.self) }
            #expect(function == (try await columns("consent.current_consents")))

            let current = try await agent.count("select count(*)::int from consent.current_consents")
            #expect(current >= 5)
            let differing = try await agent.count("""
                select count(*)::int from (
                    (select * from consent.current_consents except all select * from consent.consents_as_of(now()))
                    union all
                    (select * from consent.consents_as_of(now()) except all select * from consent.current_consents)) d
                """)
            #expect(differing == 0)
        }
    }
}

/// The ingestor's last bound: a batch that outlives every bound of its own is answered, not waited for.
@Suite("Batch deadline")
struct BatchDeadlineTests {
    @Test("an operation that never ends gives DatabaseUnavailable at the deadline; one that ends in time gives its result or its error")
    func firstWithinDeadline() async throws {
        let started = ContinuousClock.now
        await #expect(throws: DatabaseUnavailable.self) {
            try await firstWithin(.milliseconds(200), logger: TestDatabase.logger) { () async throws -> Int in
                // Deaf to cancellation and far past the deadline: like a driver call that lost its reply.
                // When it ends at last, its late result is dropped.
                await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                    DispatchQueue.global().asyncAfter(deadline: .now() + 3) { done.resume() }
                }
                return 1
            }
        }
        let waited = ContinuousClock.now - started
        #expect(waited >= .milliseconds(200) && waited < .seconds(5), "\(waited)")

        #expect(try await firstWithin(.seconds(5), logger: TestDatabase.logger) { 42 } == 42)
        struct Refused: Error {}
        await #expect(throws: Refused.self) {
            try await firstWithin(.seconds(5), logger: TestDatabase.logger) { () async throws -> Int in throw Refused() }
        }
    }
}
