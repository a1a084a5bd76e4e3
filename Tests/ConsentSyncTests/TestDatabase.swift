import ConsentServer
import ConsentStore
import Foundation
import Logging
import PostgresNIO

#if canImport(Glibc)
import Glibc
#endif

/// The tests' PostgreSQL: `DATABASE_URL` when given, else one throwaway cluster per test process
/// (started on first use, fsync off, unix socket only), with a fresh migrated database per test.
actor TestDatabase {
    static let shared = TestDatabase()

    private var server: Task<String, any Error>?

    static let logger: Logger = {
        var logger = Logger(label: "consent-sync-tests")
        logger.logLevel = ProcessInfo.processInfo.environment["TEST_LOG_LEVEL"].flatMap { Logger.Level(rawValue: $0) } ?? .critical
        return logger
    }()

    static var repositoryRoot: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().path
    }

    static var fixtures: String { repositoryRoot + "/../shared/spec/fixtures" }

    /// An empty configuration file, for runs of the binary that must not read the machine's own.
    static let emptyConfiguration: String = {
        _ = FileManager.default.createFile(atPath: emptyConfigurationPath(), contents: Data("{}".utf8))
        atexit { unlink(TestDatabase.emptyConfigurationPath()) }
        return emptyConfigurationPath()
    }()

    static func emptyConfigurationPath() -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("consent-sync-test-\(getpid()).json").path
    }

    static func migrator() throws -> Migrator {
        try Migrator(directory: repositoryRoot + "/sql")
    }

    /// URL of a server whose `postgres` database can create databases.
    func adminURL() async throws -> String {
        if let server { return try await server.value }
        let task = Task { try await Self.startServer() }
        server = task
        return try await task.value
    }

    private static func startServer() async throws -> String {
        if let url = ProcessInfo.processInfo.environment["DATABASE_URL"], !url.isEmpty {
            return url
        }
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("consent-sync-tests-\(getpid())").path
        var options = EmbeddedPostgres.Options(directory: directory, port: nil)
        options.durable = false
        try? FileManager.default.removeItem(atPath: directory)
        let cluster = EmbeddedPostgres(options: options, logger: Self.logger)
        try await cluster.start()
        TestClusterReaper.register(cluster)
        return cluster.url(database: "postgres")
    }

    /// Creates an empty database with the migrations applied; returns its URL.
    func freshDatabase() async throws -> String {
        let admin = try await adminURL()
        let name = "t_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased().prefix(16)
        try await Self.withClient(url: admin) { client in
            try await client.query(PostgresQuery(unsafeSQL: "create database \(name)"))
        }
        let url = Self.replacingDatabase(in: admin, with: String(name))
        let migrator = try Self.migrator()
        try await Self.withClient(url: url) { client in
            try await migrator.migrate(client: client, logger: Self.logger)
        }
        return url
    }

    static func replacingDatabase(in url: String, with name: String) -> String {
        var components = URLComponents(string: url)!
        components.path = "/" + name
        return components.string!
    }

    /// A single connection outside any pool (to hold session-level locks).
    static func openConnection(url: String) async throws -> PostgresConnection {
        let config = try DatabaseURL.configuration(url)
        let connection: PostgresConnection.Configuration
        if let socket = config.unixSocketPath {
            connection = .init(unixSocketPath: socket, username: config.username, password: config.password, database: config.database)
        } else {
            connection = .init(host: config.host ?? "localhost", port: config.port ?? 5432, username: config.username,
                               password: config.password, database: config.database, tls: .disable)
        }
        return try await PostgresConnection.connect(configuration: connection, id: 1, logger: logger)
    }

    /// Runs `body` with a running pool.
    static func withClient<T: Sendable>(url: String, _ body: @escaping @Sendable (PostgresClient) async throws -> T) async throws -> T {
        var config = try DatabaseURL.configuration(url)
        config.options.connectTimeout = .seconds(2)
        let client = PostgresClient(configuration: config, backgroundLogger: logger)
        return try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask { await client.run(); return nil }
            defer { group.cancelAll() }
            try await Task.sleep(for: .milliseconds(5))
            return try await body(client)
        }
    }
}

extension EmbeddedPostgres {
    /// A started throwaway cluster of its own (non-durable, in a temporary directory), for tests that
    /// stop and start the server.
    static func privateTestCluster(_ name: String) async throws -> EmbeddedPostgres {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("consent-sync-\(name)-\(UUID().uuidString)").path
        var options = EmbeddedPostgres.Options(directory: directory, port: nil)
        options.durable = false
        let cluster = EmbeddedPostgres(options: options, logger: TestDatabase.logger)
        try await cluster.start()
        TestClusterReaper.register(cluster)
        return cluster
    }
}

/// Stops the throwaway clusters when the test process exits, and removes their directories (a
/// cluster's WAL alone is about a gigabyte: left behind, every run would fill the disk a bit more).
/// The server is found by its postmaster.pid at exit, so a cluster a test restarted is stopped too.
enum TestClusterReaper {
    nonisolated(unsafe) static var directories: [String] = []

    static func register(_ cluster: EmbeddedPostgres) {
        directories.append(URL(fileURLWithPath: cluster.dataDirectory).deletingLastPathComponent().path)
        if directories.count == 1 {
            atexit {
                func server(_ directory: String) -> pid_t? {
                    guard let text = try? String(contentsOfFile: directory + "/data/postmaster.pid", encoding: .utf8) else { return nil }
                    return pid_t(text.split(separator: "\n").first ?? "")
                }
                let servers = TestClusterReaper.directories.map { ($0, server($0)) }
                for case (_, let pid?) in servers { kill(pid, SIGINT) }
                for (directory, pid) in servers {
                    // Fast shutdown takes a moment; the directory goes once the server is gone.
                    if let pid { for _ in 0..<100 where kill(pid, 0) == 0 { usleep(50_000) } }
                    try? FileManager.default.removeItem(atPath: directory)
                }
            }
        }
    }
}
