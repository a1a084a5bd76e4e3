import ArgumentParser
import ConsentCore
import ConsentReconcile
import ConsentServer
import ConsentStore
import Foundation
import Hummingbird
import Logging
import Metrics
import PostgresNIO
import Prometheus
import ServiceLifecycle

@main
struct ConsentSync: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "consent-sync",
        abstract: "Keeps PostgreSQL in sync with a consent-management platform (Didomi, DataGuard CPM).",
        subcommands: [Serve.self, Migrate.self, Reconcile.self, Replay.self, Clients.self, Status.self, Prune.self, Config.self]
    )

    /// As ArgumentParser's, except that `reconcile` keeps PRODUCT §6's statuses (0 in sync, 3 drift not
    /// repaired, 1 error): a malformed flag there is an error, 1, where other commands answer the usage
    /// status 64. A timer or a script then needs to know three statuses, not four.
    static func main() async {
        let arguments = Array(CommandLine.arguments.dropFirst())
        do {
            var command = try parseAsRoot(arguments)
            if var command = command as? AsyncParsableCommand { try await command.run() } else { try command.run() }
        } catch {
            if arguments.first == "reconcile", exitCode(for: error) == .validationFailure {
                FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
                Foundation.exit(1)
            }
            exit(withError: error)
        }
    }
}

/// Options every command shares.
struct CommonOptions: ParsableArguments {
    @Option(name: .long, help: "Configuration file (JSON). Default: /etc/consent-sync/config.json when it exists.")
    var config: String?

    func load() async throws -> AgentConfiguration {
        do {
            return try await AgentConfiguration.load(file: config)
        } catch {
            throw CommandFailure("\(error)")
        }
    }
}

/// A command that could not do its work (bad configuration, missing settings, unknown client):
/// printed as "Error: <message>", exit status 1. Malformed flags stay usage errors (exit status 64).
struct CommandFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Bootstraps logging once per process.
enum Bootstrap {
    static func logging(level: String) -> Logger {
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = Logger.Level(rawValue: level) ?? .info
            return handler
        }
        var logger = Logger(label: "consent-sync")
        logger.logLevel = Logger.Level(rawValue: level) ?? .info
        return logger
    }

    static func metrics() -> PrometheusCollectorRegistry {
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(AgentMetrics.factory(registry: registry))
        return registry
    }
}

/// The database the agent uses: the configured one, or a private embedded cluster.
struct Database {
    let url: String
    let embedded: EmbeddedPostgres?

    static func open(_ configuration: AgentConfiguration, logger: Logger) async throws -> Database {
        if let url = configuration.databaseURL {
            logger.info("using database", metadata: ["url": "\(DatabaseURL.redacted(url))"])
            return Database(url: url, embedded: nil)
        }
        let cluster = EmbeddedPostgres(
            options: .init(directory: configuration.stateDirectory + "/postgres", port: configuration.embeddedPort),
            logger: logger)
        try await cluster.start()
        try await createDatabase("consent_sync", in: cluster, logger: logger)
        let url = cluster.url(database: "consent_sync")
        logger.notice("""
            no database configured: started an embedded PostgreSQL (loopback only) under \
            \(cluster.options.directory); connect with: psql -h 127.0.0.1 -p \(cluster.effectivePort) \
            -U \(EmbeddedPostgres.serverUser) consent_sync   (DATABASE_URL=\(url))
            """)
        return Database(url: url, embedded: cluster)
    }

    static func createDatabase(_ name: String, in cluster: EmbeddedPostgres, logger: Logger) async throws {
        let client = PostgresClient(configuration: try DatabaseURL.configuration(cluster.url(database: "postgres")),
                                    backgroundLogger: logger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await client.run() }
            defer { group.cancelAll() }
            let exists = try await client.query("select 1 from pg_database where datname = \(name)").collect()
            if exists.isEmpty {
                try await client.perform(PostgresQuery(unsafeSQL: "create database \"\(name)\""), logger: logger)
            }
        }
    }

    func stop() async {
        await embedded?.stop()
    }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the webhook endpoints (and /healthz, /readyz, /metrics).")

    @OptionGroup var options: CommonOptions
    @Option(name: .long, help: "Address to listen on (default 127.0.0.1, or http.host).")
    var host: String?
    @Option(name: .long, help: "Port to listen on (default 8080, or http.port).")
    var port: Int?

    func validate() throws {
        if let port, !AgentConfiguration.ports.contains(port) {
            throw ValidationError("--port must be in \(AgentConfiguration.ports), got \(port)")
        }
        if let host, !AgentConfiguration.isHost(host) {
            throw ValidationError("--host must be an address or host name, got '\(host)'")
        }
    }

    func run() async throws {
        var configuration = try await options.load()
        if let host { configuration.host = host }
        if let port { configuration.port = port }
        let logger = Bootstrap.logging(level: configuration.logLevel)
        let registry = Bootstrap.metrics()

        for name in configuration.unknownEnvironmentKeys {
            logger.warning("environment variable \(name) names no configuration key; it is ignored")
        }
        if configuration.auth.disabled {
            logger.warning("authentication is OFF (auth.disabled=true): every caller can write consent state; local development only")
        } else {
            let unprotected = configuration.auth.dataguard.filter { !$0.value.isConfigured }.map { "/webhooks/dataguard/\($0.key.rawValue)" }.sorted()
            if !unprotected.isEmpty {
                logger.notice("no DataGuard credentials configured (auth.dataguard.api_keys / bearer_tokens): these endpoints refuse every delivery", metadata: ["endpoints": "\(unprotected.joined(separator: ", "))"])
            }
            if configuration.auth.didomiAllow.isEmpty {
                logger.notice("network.didomi.allow is empty: /webhooks/didomi and /oauth/token accept any address (Didomi documents 35.159.1.63)")
            }
        }

        let migrator = try Migrator(directory: Migrator.locateDirectory(configured: configuration.migrationsDirectory))
        let database = try await Database.open(configuration, logger: logger)
        do {
            try await prepareSchema(url: database.url, configuration: configuration, migrator: migrator, logger: logger)
            let client = PostgresClient(
                configuration: try Agent.clientConfiguration(url: database.url, configuration: configuration),
                backgroundLogger: logger)
            let notifier = SystemdNotifier()
            let app = Agent.buildApplication(
                configuration: configuration,
                dependencies: .init(client: client, migrator: migrator, registry: registry),
                logger: logger,
                onServerRunning: { _ in notifier.notify("READY=1\nSTATUS=accepting webhooks") })
            // The watchdog runs beside the application and shuts down first: STOPPING=1 goes out at
            // once on SIGTERM, then the server stops accepting, drains, and the queue is applied.
            var groupConfiguration = ServiceGroupConfiguration(
                services: [
                    .init(service: app),
                    .init(service: SystemdWatchdogService(notifier: notifier,
                                                          interval: SystemdNotifier.watchdogInterval(), logger: logger)),
                ],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger)
            // Below the unit's TimeoutStopSec (30 s): drain, then give up rather than be killed.
            groupConfiguration.maximumGracefulShutdownDuration = .seconds(20)
            groupConfiguration.maximumCancellationDuration = .seconds(5)
            try await ServiceGroup(configuration: groupConfiguration).run()
        } catch {
            await database.stop()
            throw error
        }
        await database.stop()
    }

    /// Applies (or only checks) migrations before the socket opens.
    private func prepareSchema(url: String, configuration: AgentConfiguration, migrator: Migrator, logger: Logger) async throws {
        try await withClient(url: url, configuration: configuration, logger: logger) { client in
            if configuration.migrateOnStart {
                let applied = try await migrator.migrate(client: client, logger: logger)
                if !applied.isEmpty { logger.info("migrations applied", metadata: ["versions": "\(applied)"]) }
            } else {
                let pending = try await migrator.pending(client: client, logger: logger)
                guard pending.isEmpty else {
                    throw CommandFailure("migrations pending (\(pending.map(\.name).joined(separator: ", "))): run consent-sync migrate, or set database.migrate_on_start=true")
                }
            }
        }
    }
}

/// Runs `body` with a short-lived pool.
func withClient<T: Sendable>(
    url: String, configuration: AgentConfiguration, logger: Logger,
    _ body: @escaping @Sendable (PostgresClient) async throws -> T
) async throws -> T {
    let clientConfiguration = try Agent.clientConfiguration(url: url, configuration: configuration)
    try await DatabaseURL.checkConnection(url: url, client: clientConfiguration, logger: logger)
    let client = PostgresClient(configuration: clientConfiguration, backgroundLogger: logger)
    return try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { await client.run(); return nil }
        defer { group.cancelAll() }
        try await Task.sleep(for: .milliseconds(10))  // let the pool start before the first lease
        return try await body(client)
    }
}

struct Migrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Apply pending SQL migrations (sql/NNN_name.sql), serialised by an advisory lock.")

    @OptionGroup var options: CommonOptions

    @Flag(name: .long, help: "Only list pending migrations; exit 2 when some are pending.")
    var check = false

    func run() async throws {
        let configuration = try await options.load()
        let logger = Bootstrap.logging(level: configuration.logLevel)
        let migrator = try Migrator(directory: Migrator.locateDirectory(configured: configuration.migrationsDirectory))
        let database = try await Database.open(configuration, logger: logger)
        let check = self.check
        let pending: [String]
        do {
            pending = try await withClient(url: database.url, configuration: configuration, logger: logger) { client in
                if check {
                    return try await migrator.pending(client: client, logger: logger).map(\.name)
                }
                return try await migrator.migrate(client: client, logger: logger).map(String.init)
            }
        } catch {
            await database.stop()
            throw error
        }
        await database.stop()
        if check {
            print(pending.isEmpty ? "migrations are current" : "pending: \(pending.joined(separator: ", "))")
            if !pending.isEmpty { throw ExitCode(2) }
        } else {
            print(pending.isEmpty ? "migrations are current" : "applied migrations: \(pending.joined(separator: ", "))")
        }
    }
}

struct Clients: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage the OAuth clients that may fetch tokens at POST /oauth/token (e.g. Didomi).",
        subcommands: [Create.self, List.self, Revoke.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a client; prints its secret once.")
        @OptionGroup var options: CommonOptions
        @Argument(help: "A name for the client, e.g. didomi-production.") var positionalName: String?
        @Option(name: .customLong("name"), help: "The name, as an option instead (default: didomi).") var optionName: String?
        @Flag(help: "Print {client_id, client_secret, name} as JSON.") var json = false

        func validate() throws {
            if positionalName != nil && optionName != nil { throw ValidationError("give the name once: NAME or --name NAME") }
            if name.isEmpty { throw ValidationError("the client name must not be empty") }
        }

        var name: String { positionalName ?? optionName ?? "didomi" }

        func run() async throws {
            let (id, secret) = try await Clients.withRepository(options) { try await $0.createClient(name: name) }
            if json {
                try printJSON(["client_id": id, "client_secret": secret, "name": name])
                return
            }
            print("client_id:     \(id)")
            print("client_secret: \(secret)")
            print("(the secret is not stored and cannot be shown again)")
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List clients.")
        @OptionGroup var options: CommonOptions
        @Flag(help: "Print the clients as a JSON array.") var json = false

        func run() async throws {
            let clients = try await Clients.withRepository(options) { try await $0.listClients() }
            if json {
                struct Row: Encodable { var client_id, name: String; var created_at: Date; var revoked_at: Date? }
                try printJSON(clients.map { Row(client_id: $0.clientID, name: $0.name, created_at: $0.createdAt, revoked_at: $0.revokedAt) })
                return
            }
            if clients.isEmpty { print("no clients"); return }
            for client in clients {
                let state = client.revokedAt.map { "revoked \($0.formatted(.iso8601))" } ?? "active"
                print("\(client.clientID)\t\(client.name)\tcreated \(client.createdAt.formatted(.iso8601))\t\(state)")
            }
        }
    }

    struct Revoke: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Revoke a client and every token issued to it.")
        @OptionGroup var options: CommonOptions
        @Argument(help: "The client_id to revoke.") var clientID: String

        func run() async throws {
            let id = clientID
            guard try await Clients.withRepository(options, { try await $0.revokeClient(id) }) else {
                throw CommandFailure("no active client \(id)")
            }
            print("revoked \(id)")
        }
    }

    static func withRepository<T: Sendable>(
        _ options: CommonOptions, _ body: @escaping @Sendable (OAuthRepository) async throws -> T
    ) async throws -> T {
        let configuration = try await options.load()
        let logger = Bootstrap.logging(level: configuration.logLevel == "info" ? "warning" : configuration.logLevel)
        let migrator = try Migrator(directory: Migrator.locateDirectory(configured: configuration.migrationsDirectory))
        let database = try await Database.open(configuration, logger: logger)
        do {
            let result = try await withClient(url: database.url, configuration: configuration, logger: logger) { client in
                try await migrator.migrate(client: client, logger: logger)
                return try await body(OAuthRepository(client: client, logger: logger))
            }
            await database.stop()
            return result
        } catch {
            await database.stop()
            throw error
        }
    }
}

struct Config: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Configuration tools.", subcommands: [Check.self])

    struct Check: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate the configuration file and environment without starting anything.")
        @OptionGroup var options: CommonOptions

        func run() async throws {
            let configuration = try await options.load()
            let migrations = Migrator.locateDirectory(configured: configuration.migrationsDirectory)
            _ = try Migrator(directory: migrations)
            print("configuration is valid")
            for name in configuration.unknownEnvironmentKeys {
                print("  warning:   environment variable \(name) names no configuration key; it is ignored")
            }
            print("  listen:    \(configuration.host):\(configuration.port)")
            print("  database:  \(configuration.databaseURL.map(DatabaseURL.redacted) ?? "embedded under \(configuration.stateDirectory)")")
            print("  migrations: \(migrations)")
            print("  auth:      \(configuration.auth.disabled ? "DISABLED (development only)" : "on")")
            for (kind, credentials) in configuration.auth.dataguard.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
                print("  dataguard \(kind.rawValue): \(credentials.apiKeys.count) API key(s), \(credentials.bearerTokens.count) bearer token(s)")
            }
        }
    }
}

/// Opens the configured database (embedded or not), brings the schema up to date, runs `body`.
func withDatabase<T: Sendable>(
    _ options: CommonOptions, quiet: Bool = true,
    _ body: @escaping @Sendable (PostgresClient, AgentConfiguration, Logger) async throws -> T
) async throws -> T {
    let configuration = try await options.load()
    let logger = Bootstrap.logging(level: quiet && configuration.logLevel == "info" ? "warning" : configuration.logLevel)
    let migrator = try Migrator(directory: Migrator.locateDirectory(configured: configuration.migrationsDirectory))
    let database = try await Database.open(configuration, logger: logger)
    do {
        let result = try await withClient(url: database.url, configuration: configuration, logger: logger) { client in
            if configuration.migrateOnStart {
                try await migrator.migrate(client: client, logger: logger)
            }
            return try await body(client, configuration, logger)
        }
        await database.stop()
        return result
    } catch {
        await database.stop()
        throw error
    }
}

/// A line on standard error (what went wrong goes there, so that stdout stays the report).
func printError(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}

func printJSON(_ value: some Encodable) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    encoder.dateEncodingStrategy = .iso8601
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}

struct Replay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Re-apply kept deliveries (failed, or stored because a value was unknown) with the current decoders.")
    @OptionGroup var options: CommonOptions
    @Option(name: .customLong("id"), help: "A delivery id to replay (repeatable). Default: every kept delivery.")
    var ids: [Int64] = []
    @Option(help: "Only deliveries received at or after this ISO 8601 time.") var since: String?
    @Option(help: "Only deliveries received before this ISO 8601 time.") var until: String?
    @Flag(help: "Print the results as JSON.") var json = false

    func run() async throws {
        var selection = Replayer.Selection()
        selection.ids = ids
        if let since {
            guard let date = Timestamp.parseArgument(since) else { throw ValidationError("--since is not an ISO 8601 time: \(since)") }
            selection.since = date
        }
        if let until {
            guard let date = Timestamp.parseArgument(until) else { throw ValidationError("--until is not an ISO 8601 time: \(until)") }
            selection.until = date
        }
        let selected = selection
        let results = try await withDatabase(options) { client, configuration, logger in
            try await Replayer(store: ConsentStore(client: client, logger: logger, timeout: .seconds(30))).replay(selected)
        }
        // An id asked for by name that is not waiting for a replay is an error (a typo must not read as done).
        let missing = ids.filter { id in !results.contains { $0.delivery_id == id } }
        if json {
            try printJSON(results)
        } else if results.isEmpty {
            print("nothing to replay")
        } else {
            for result in results {
                let target = result.replayed_as.map { " as delivery \($0)" } ?? ""
                print("delivery \(result.delivery_id) (\(result.endpoint)): \(result.outcome)\(target)\(result.reason.map { " — \($0)" } ?? "")")
            }
            let replayed = results.filter { $0.replayed_as != nil }.count
            print("\(replayed) of \(results.count) replayed")
        }
        if !missing.isEmpty {
            printError("not kept for replay (no such delivery, applied, or already replayed): \(missing.map(String.init).joined(separator: ", "))")
            throw ExitCode(1)
        }
    }
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "What is stored, recent failures, the last reconciliation.")
    @OptionGroup var options: CommonOptions
    @Flag(help: "Print as JSON.") var json = false

    func run() async throws {
        let report = try await withDatabase(options) { client, _, logger in
            try await StatusReport.load(client: client, logger: logger)
        }
        if json { try printJSON(report); return }
        print("stored:")
        if report.stored.isEmpty { print("  nothing yet") }
        for count in report.stored {
            print("  \(count.source): \(count.users) users (\(count.deleted_users) deleted), \(count.consents) consent rows, \(count.preferences) preference rows")
        }
        print("deliveries in the last 24 h: " + (report.deliveries_24h.isEmpty ? "none" :
            report.deliveries_24h.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")))
        print("kept, not replayed: \(report.kept_not_replayed)")
        for kept in report.recent_kept {
            print("  #\(kept.delivery_id) \(kept.received_at.formatted(.iso8601)) \(kept.endpoint) \(kept.outcome): \(kept.reason ?? "")")
        }
        print("last reconciliation: \(report.last_reconciliation ?? "never")")
    }
}

struct Prune: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Apply the retention settings now (serve also does it every hour).")
    @OptionGroup var options: CommonOptions

    func run() async throws {
        let totals = try await withDatabase(options) { client, configuration, logger in
            try await RetentionService.prune(client: client, settings: configuration.retention, logger: logger)
        }
        for (kind, count) in totals.sorted(by: { $0.key < $1.key }) { print("\(kind): \(count) removed") }
    }
}

struct Reconcile: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare stored state with a full snapshot, report drift and repair it.",
        discussion: """
            Exit codes: 0 in sync (or all drift repaired), 3 drift found and not repaired (--check), \
            1 error (including a refused mass removal, or another reconciliation already running).
            """)

    enum SourceKind: String, CaseIterable {
        case didomi, dataguard, file
    }

    @OptionGroup var options: CommonOptions
    @Option(help: """
        Where the snapshot comes from: didomi (Consents API), dataguard (store endpoint), file (NDJSON). \
        Default: file when --file is given, else every platform configured under reconcile.*, one after the other.
        """)
    var source: String?
    @Option(help: "NDJSON snapshot for --source file (one Didomi user or DataGuard effective-permissions object per line; .gz accepted; - = stdin).")
    var file: String?
    @Option(help: "Time of the snapshot (ISO 8601); default: the file's modification time, or the fetch start.")
    var snapshotTime: String?
    @Flag(help: "Only report drift; change nothing (exit 3 when there is drift).")
    var check = false
    @Option(help: "Largest share of stored users that may be removed as missing at the source (default 0.05, or reconcile.max_removal_share).")
    var maxRemovalShare: Double?
    @Flag(help: "Print the report as JSON (one object per source).")
    var json = false

    /// The arguments' meaning is checked here rather than in `validate()`: a reconciliation that cannot
    /// run is an error (exit 1, PRODUCT §6), not a usage error.
    /// Without `--source`, `CONSENT_SYNC_RECONCILE_SOURCE` (the reconciliation unit's drop-in) chooses.
    func requestedSource(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> SourceKind? {
        let named = source.flatMap { $0.isEmpty ? nil : $0 }
        let fromEnvironment = environment["CONSENT_SYNC_RECONCILE_SOURCE"].flatMap { $0.isEmpty ? nil : $0 }
        guard let source = named ?? (file == nil ? fromEnvironment : nil) else { return file == nil ? nil : .file }
        guard let kind = SourceKind(rawValue: source) else {
            if named == nil {
                throw CommandFailure("CONSENT_SYNC_RECONCILE_SOURCE must be didomi, dataguard or file, not '\(source.prefix(40))'")
            }
            throw CommandFailure("--source must be didomi, dataguard or file, not '\(source.prefix(40))'")
        }
        if kind == .file && file == nil { throw CommandFailure("--source file needs --file PATH (or - for stdin)") }
        if kind != .file && file != nil { throw CommandFailure("--file is read only with --source file") }
        return kind
    }

    func run() async throws {
        let requested = try requestedSource()
        if let snapshotTime, Timestamp.parseArgument(snapshotTime) == nil {
            throw CommandFailure("--snapshot-time is not an ISO 8601 time: '\(snapshotTime.prefix(64))'")
        }
        if let maxRemovalShare, !(0...1).contains(maxRemovalShare) {
            throw CommandFailure("--max-removal-share must be between 0 and 1")
        }
        let path = file
        let at = snapshotTime.flatMap(Timestamp.parseArgument)
        let check = self.check
        let share = maxRemovalShare
        let reports = try await withDatabase(options, quiet: false) { client, configuration, logger in
            // API sources take their time from the fetch start: each is made just before its run.
            var snapshots: [() throws -> any SnapshotSource] = []
            switch requested {
            case .file:
                snapshots = [{ try NDJSONSource(path: path!, snapshotTime: at) }]
            case .didomi:
                guard let settings = configuration.reconcile.didomi else {
                    throw CommandFailure("--source didomi needs reconcile.didomi.organization_id, reconcile.didomi.api_key and reconcile.didomi.api_secret")
                }
                snapshots = [{ DidomiAPISource(settings: settings, logger: logger) }]
            case .dataguard:
                guard let settings = configuration.reconcile.dataguard else {
                    throw CommandFailure("--source dataguard needs reconcile.dataguard.application_id and reconcile.dataguard.api_key")
                }
                snapshots = [{ DataGuardAPISource(settings: settings, logger: logger) }]
            case nil:
                if let settings = configuration.reconcile.didomi { snapshots.append { DidomiAPISource(settings: settings, logger: logger) } }
                if let settings = configuration.reconcile.dataguard { snapshots.append { DataGuardAPISource(settings: settings, logger: logger) } }
                guard !snapshots.isEmpty else {
                    throw CommandFailure("nothing to reconcile with: give --source file --file PATH, or configure reconcile.didomi.* or reconcile.dataguard.*")
                }
            }
            var runOptions = Reconciler.Options()
            runOptions.checkOnly = check
            runOptions.maxRemovalShare = share ?? configuration.reconcile.maxRemovalShare
            var reports: [Reconciler.Report] = []
            for snapshot in snapshots {
                reports.append(try await Reconciler(client: client, logger: logger).run(try snapshot(), options: runOptions))
            }
            return reports
        }
        // One JSON document whatever ran: a run's report, or an array of them when both platforms ran.
        if json { try reports.count == 1 ? printJSON(reports[0]) : printJSON(reports) }
        for report in reports where !json {
            print("reconciliation #\(report.run_id) (\(report.source), \(report.mode)): \(report.outcome)")
            print("  snapshot time \(report.snapshot_time.formatted(.iso8601)), \(report.users_read) users read\(report.complete ? "" : " (incomplete)"), \(String(format: "%.1f", report.seconds)) s")
            if report.users_with_unknown_values > 0 {
                print("  \(report.users_with_unknown_values) users carry values this version does not know: their stored items were not removed")
            }
            for (kind, count) in report.drift.sorted(by: { $0.key < $1.key }) {
                print("  \(kind): \(count) found, \(report.repaired[kind, default: 0]) repaired")
            }
            if let error = report.error { printError("reconciliation #\(report.run_id) (\(report.source)): \(error)") }
        }
        // 1 if any run failed, else 3 if any drift is left, else 0.
        let codes = reports.map(\.exitCode)
        let code: Int32 = codes.contains(1) ? 1 : codes.contains(3) ? 3 : 0
        if code != 0 { throw ExitCode(code) }
    }
}
