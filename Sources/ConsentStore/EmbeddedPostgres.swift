import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// A private PostgreSQL cluster under a directory, run as a child process with the server binaries
/// found on the machine. Used when no database is configured (and by the test suite).
///
/// The server is the child itself (`postgres`, not `pg_ctl`), waited for asynchronously, stopped with
/// SIGINT (fast shutdown). As root, it runs as the `postgres` user (initdb refuses root).
public final class EmbeddedPostgres: @unchecked Sendable {
    public struct Options: Sendable {
        /// Where the cluster lives (`<directory>/data`) and where its socket is.
        public var directory: String
        /// Loopback TCP port; nil = unix socket only.
        public var port: Int?
        /// Test clusters trade durability for speed.
        public var durable: Bool = true
        public var extraSettings: [String: String] = [:]

        public init(directory: String, port: Int?) {
            self.directory = directory
            self.port = port
        }
    }

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    public let options: Options
    private let logger: Logger
    private let lock = NSLock()
    private var process: Process?

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    public var dataDirectory: String { options.directory + "/data" }
    public var socketDirectory: String { options.directory + "/run" }
    public var effectivePort: Int { options.port ?? 5432 }

    /// `DATABASE_URL` for a database of this cluster (over the unix socket).
    public func url(database: String) -> String {
        "postgres://\(Self.serverUser)@localhost:\(effectivePort)/\(database)?host=\(socketDirectory)"
    }

    /// The role the cluster was initialised with.
    public static var serverUser: String { getuid() == 0 ? "postgres" : (ProcessInfo.processInfo.environment["USER"] ?? "postgres") }

    /// Initialises the cluster if needed and starts the server; returns once it accepts connections.
    public func start() async throws {
        let bin = try Self.binDirectory()
        let fm = FileManager.default
        try fm.createDirectory(atPath: socketDirectory, withIntermediateDirectories: true)
        if !fm.fileExists(atPath: dataDirectory + "/PG_VERSION") {
            try fm.createDirectory(atPath: dataDirectory, withIntermediateDirectories: true)
            try chownForServer(options.directory)
            try chownForServer(dataDirectory)
            chmod(dataDirectory, 0o700)
            var args = ["-D", dataDirectory, "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "-U", Self.serverUser]
            if !options.durable { args.append("--no-sync") }
            logger.info("initialising embedded PostgreSQL cluster", metadata: ["directory": "\(dataDirectory)"])
            try await run(bin + "/initdb", args)
        }
        try chownForServer(socketDirectory)

        // Another process of this agent (`serve`, while an operator runs `status` or `clients`) may
        // already run the cluster: use it, and leave it running when done.
        if usesRunningServer() { return }

        var settings = [
            "listen_addresses": options.port == nil ? "" : "127.0.0.1",
            "unix_socket_directories": socketDirectory,
            "max_connections": "200",
        ]
        if let port = options.port { settings["port"] = String(port) }
        if !options.durable {
            settings["fsync"] = "off"
            settings["synchronous_commit"] = "off"
            settings["full_page_writes"] = "off"
        }
        settings.merge(options.extraSettings) { _, new in new }
        var args = ["-D", dataDirectory]
        for (key, value) in settings.sorted(by: { $0.key < $1.key }) { args += ["-c", "\(key)=\(value)"] }

        let process = try launch(bin + "/postgres", args, logFile: options.directory + "/postgres.log")
        lock.withLock { self.process = process }
        try await waitUntilReady(process)
        if !process.isRunning { lock.withLock { self.process = nil } }  // another one's server is used
    }

    /// Stops the server (fast shutdown) and waits for it to exit.
    public func stop() async {
        guard let process = lock.withLock({ self.process }) else { return }
        if process.isRunning { kill(process.processIdentifier, SIGINT) }
        for _ in 0..<300 where process.isRunning {
            try? await Task.sleep(for: .milliseconds(50))
        }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        lock.withLock { self.process = nil }
    }

    /// Where `initdb` and `postgres` are: `pg_config --bindir`'s sibling, else the newest
    /// /usr/lib/postgresql/<major>/bin.
    public static func binDirectory() throws -> String {
        let fm = FileManager.default
        if let env = ProcessInfo.processInfo.environment["CONSENT_SYNC_POSTGRES_BIN"], fm.fileExists(atPath: env + "/postgres") {
            return env
        }
        let root = "/usr/lib/postgresql"
        let majors = ((try? fm.contentsOfDirectory(atPath: root)) ?? []).compactMap(Int.init).sorted(by: >)
        for major in majors where fm.fileExists(atPath: "\(root)/\(major)/bin/postgres") {
            return "\(root)/\(major)/bin"
        }
        for dir in ["/usr/local/pgsql/bin", "/usr/bin"] where fm.fileExists(atPath: dir + "/postgres") {
            return dir
        }
        throw Failure(description: "no PostgreSQL server binaries found (install postgresql, or set DATABASE_URL)")
    }

    // MARK: - Processes

    /// As root, wrap a command so that it runs as the `postgres` user.
    private func command(_ executable: String, _ args: [String]) -> (String, [String]) {
        guard getuid() == 0 else { return (executable, args) }
        return ("/usr/bin/setpriv", ["--reuid=postgres", "--regid=postgres", "--init-groups", "--", executable] + args)
    }

    private func chownForServer(_ path: String) throws {
        guard getuid() == 0 else { return }
        guard let user = getpwnam("postgres") else {
            throw Failure(description: "running as root needs a 'postgres' user to run the embedded server")
        }
        chown(path, user.pointee.pw_uid, user.pointee.pw_gid)
    }

    private func launch(_ executable: String, _ args: [String], logFile: String?) throws -> Process {
        let (path, arguments) = command(executable, args)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        process.currentDirectoryURL = URL(fileURLWithPath: options.directory)
        process.standardInput = FileHandle.nullDevice
        if let logFile {
            FileManager.default.createFile(atPath: logFile, contents: nil)
            try chownForServer(logFile)
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: logFile))
            handle.seekToEndOfFile()
            process.standardOutput = handle
            process.standardError = handle
        } else {
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
        }
        try process.run()
        return process
    }

    /// Runs a command to completion without blocking a thread of the cooperative pool.
    private func run(_ executable: String, _ args: [String]) async throws {
        let logFile = options.directory + "/initdb.log"
        let process = try launch(executable, args, logFile: logFile)
        while process.isRunning { try await Task.sleep(for: .milliseconds(50)) }
        guard process.terminationStatus == 0 else {
            let log = (try? String(contentsOfFile: logFile, encoding: .utf8)) ?? ""
            throw Failure(description: "\(executable) failed (\(process.terminationStatus)): \(log.suffix(2000))")
        }
    }

    /// postmaster.pid: line 1 the server's pid, line 8 its status ("ready" once it accepts connections).
    private func serverStatus() -> (pid: Int32, ready: Bool)? {
        guard let text = try? String(contentsOfFile: dataDirectory + "/postmaster.pid", encoding: .utf8) else { return nil }
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        guard let first = lines.first, let pid = Int32(first.trimmingCharacters(in: .whitespaces)) else { return nil }
        return (pid, lines.count >= 8 && lines[7].trimmingCharacters(in: .whitespaces) == "ready")
    }

    /// The pid of a server already running this cluster and accepting connections, if any (a stale
    /// postmaster.pid of a dead server does not count: the server cleans it up when it starts).
    private func runningServer() -> Int32? {
        guard let status = serverStatus(), status.ready, status.pid > 0 else { return nil }
        let alive = kill(status.pid, 0) == 0 || errno == EPERM
        return alive ? status.pid : nil
    }

    /// Whether another process's server already runs this cluster (then it is used, and left running).
    private func usesRunningServer() -> Bool {
        guard let running = runningServer() else { return false }
        logger.info("using the embedded PostgreSQL cluster already running", metadata: ["pid": "\(running)"])
        return true
    }

    /// Ready when postmaster.pid says so, and says it of the server this process started.
    private func waitUntilReady(_ process: Process) async throws {
        for _ in 0..<600 {
            guard process.isRunning else {
                // Lost a race with another process of this agent starting the same cluster: use theirs.
                for _ in 0..<100 {
                    if usesRunningServer() { return }
                    try await Task.sleep(for: .milliseconds(100))
                }
                let log = (try? String(contentsOfFile: options.directory + "/postgres.log", encoding: .utf8)) ?? ""
                throw Failure(description: "embedded PostgreSQL exited during start-up: \(log.suffix(2000))")
            }
            if let status = serverStatus(), status.ready, status.pid == process.processIdentifier { return }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw Failure(description: "embedded PostgreSQL did not become ready within 30 s")
    }
}
