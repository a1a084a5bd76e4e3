import Foundation
import ConsentServer
import Testing

/// The CLI as operators and timers run it: exit statuses and messages of the real binary (PRODUCT §6,
/// §7: reconcile exits 0 in sync or repaired, 3 drift left (`--check`), 1 on error; a bad configuration
/// names the key).
@Suite("Command line")
struct CommandLineTests {
    struct Run {
        var status: Int32
        var output: String
        var errors: String
    }

    /// Runs the binary to completion (60 s at most) with a clean configuration environment.
    static func run(_ arguments: [String], environment extra: [String: String] = [:], input: Data? = nil,
                    asNobody: Bool = false) async throws -> Run {
        let process = Process()
        if asNobody {
            process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
            process.arguments = ["--reuid=nobody", "--regid=nogroup", "--clear-groups", ServiceLifecycleTests.binary] + arguments
        } else {
            process.executableURL = URL(fileURLWithPath: ServiceLifecycleTests.binary)
            process.arguments = arguments
        }
        var environment = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("CONSENT_SYNC_") && $0.key != "DATABASE_URL" }
        environment["CONSENT_SYNC_CONFIG"] = TestDatabase.emptyConfiguration
        environment["CONSENT_SYNC_LOG_LEVEL"] = "warning"
        environment.merge(extra) { _, new in new }
        process.environment = environment
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cli-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let out = directory.appendingPathComponent("out"), err = directory.appendingPathComponent("err")
        FileManager.default.createFile(atPath: out.path, contents: nil)
        FileManager.default.createFile(atPath: err.path, contents: nil)
        process.standardOutput = try FileHandle(forWritingTo: out)
        process.standardError = try FileHandle(forWritingTo: err)
        if let input {
            let inputFile = directory.appendingPathComponent("in")
            try input.write(to: inputFile)
            process.standardInput = try FileHandle(forReadingFrom: inputFile)
        } else {
            process.standardInput = FileHandle.nullDevice
        }
        try process.run()
        let deadline = ContinuousClock.now + .seconds(60)
        while process.isRunning && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        if process.isRunning { process.terminate() }
        return Run(status: process.terminationStatus,
                   output: (try? String(contentsOf: out, encoding: .utf8)) ?? "",
                   errors: (try? String(contentsOf: err, encoding: .utf8)) ?? "")
    }

    @Test("a configuration file the agent's user cannot read stops the start, named; it is never taken for no file")
    func unreadableConfiguration() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cs-etc-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let file = directory + "/config.json"
        try #"{"http": {"port": 9191}}"#.write(toFile: file, atomically: true, encoding: .utf8)
        try FileManager.default.setAttributes([.posixPermissions: 0o000], ofItemAtPath: file)
        // As installed with a directory the service user may not enter: root runs the binary as nobody.
        let run = try await Self.run(["config", "check"], environment: ["CONSENT_SYNC_CONFIG": file], asNobody: getuid() == 0)
        #expect(run.status == 1, "\(run)")
        #expect(run.errors.contains("configuration file \(file) cannot be read: Permission denied"), "\(run)")
    }

    @Test("--help on every command (PRODUCT §7), exit 0; serve documents its defaults 127.0.0.1 and 8080")
    func help() async throws {
        let root = try await Self.run(["--help"])
        #expect(root.status == 0)
        for command in ["serve", "migrate", "reconcile", "replay", "clients", "status"] {
            #expect(root.output.contains(command), "\(command) in \(root.output)")
            let run = try await Self.run([command, "--help"])
            #expect(run.status == 0, "\(command): \(run)")
            #expect(run.output.contains("USAGE: consent-sync \(command)"), "\(command): \(run.output)")
        }
        for subcommand in ["create", "list", "revoke"] {
            #expect(try await Self.run(["clients", subcommand, "--help"]).status == 0, "clients \(subcommand)")
        }
        let serve = try await Self.run(["serve", "--help"]).output
        #expect(serve.contains("--host") && serve.contains("127.0.0.1") && serve.contains("--port") && serve.contains("8080"), "\(serve)")
    }

    @Test("a bad configuration exits 1 with a message naming the key")
    func badConfiguration() async throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("bad-\(UUID().uuidString).json").path
        try #"{"http": {"port": 99999999}}"#.write(toFile: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: file) }
        let run = try await Self.run(["config", "check", "--config", file])
        #expect(run.status == 1, "\(run)")
        #expect(run.errors.contains("http.port"), "\(run.errors)")

        // Not a host name or an address: refused by name, not left to fail at bind.
        for bad in ["", "not_a_host!!", "-lead.example", "a..b", "[::1"] {
            try #"{"http": {"host": "\#(bad)"}}"#.write(toFile: file, atomically: true, encoding: .utf8)
            let host = try await Self.run(["config", "check", "--config", file])
            #expect(host.status == 1, "\(bad): \(host)")
            #expect(host.errors.contains("http.host"), "\(bad): \(host.errors)")
        }
        for good in ["localhost", "0.0.0.0", "::", "[::1]", "fe80::1%eth0", "agent-1.internal.example.com."] {
            #expect(AgentConfiguration.isHost(good), "\(good)")
        }

        // The same values given as serve's flags are refused before anything starts, naming the flag.
        for (flags, name) in [(["--port", "70000"], "--port"), (["--host", ""], "--host"), (["--host", "zz!!"], "--host")] {
            let serve = try await Self.run(["serve"] + flags)
            #expect(serve.status != 0, "\(flags): \(serve)")
            #expect(serve.errors.contains(name), "\(flags): \(serve.errors)")
        }
    }

    @Test("a database that cannot be reached, or does not exist, is a prompt error naming the cause (exit 1)")
    func unreachableDatabase() async throws {
        let missing = TestDatabase.replacingDatabase(in: try await TestDatabase.shared.adminURL(), with: "no_such_database")
        let started = ContinuousClock.now
        for command in [["status"], ["migrate"], ["reconcile", "--file", "-", "--check"]] {
            let run = try await Self.run(command, environment: ["DATABASE_URL": missing], input: Data())
            #expect(run.status == 1, "\(command): \(run)")
            #expect(run.errors.contains("cannot connect to the database") && run.errors.contains("\"no_such_database\" does not exist"),
                    "\(command): \(run.errors)")
        }
        let refused = try await Self.run(["status"], environment: ["DATABASE_URL": "postgres://nobody@127.0.0.1:1/none?sslmode=disable"])
        #expect(refused.status == 1 && refused.errors.contains("cannot connect to the database at 127.0.0.1:1"), "\(refused)")
        #expect(ContinuousClock.now - started < .seconds(20), "the pool's minute of retries came back")
    }

    @Test("reconcile: 3 when --check finds drift, 0 once repaired and in sync, 1 when the source's settings are missing")
    func reconcileExitStatuses() async throws {
        let url = try await TestDatabase.shared.freshDatabase()
        let snapshot = try ReconciliationTests.write([
            ReconciliationTests.didomiUser("u-cli", version: 1, purposes: ["a": true, "b": false]),
        ])
        defer { try? FileManager.default.removeItem(atPath: snapshot) }
        let database = ["DATABASE_URL": url]
        let file = ["reconcile", "--source", "file", "--file", snapshot, "--snapshot-time", "2025-06-01T00:00:00Z"]

        let check = try await Self.run(file + ["--check"], environment: database)
        #expect(check.status == 3, "\(check)")
        let repair = try await Self.run(file, environment: database)
        #expect(repair.status == 0, "\(repair)")
        let again = try await Self.run(file + ["--check"], environment: database)
        #expect(again.status == 0, "\(again)")

        let missing = try await Self.run(["reconcile", "--source", "didomi"], environment: database)
        #expect(missing.status == 1, "\(missing)")
        #expect(missing.errors.contains("reconcile.didomi.organization_id"), "\(missing.errors)")

        // Without --source: the file when --file is given (in sync by now), else the configured platforms.
        let implied = try await Self.run(["reconcile", "--file", snapshot, "--snapshot-time", "2025-06-01T00:00:00Z", "--check"],
                                         environment: database)
        #expect(implied.status == 0, "\(implied)")
        let nothing = try await Self.run(["reconcile"], environment: database)
        #expect(nothing.status == 1, "\(nothing)")
        #expect(nothing.errors.contains("reconcile.didomi"), "\(nothing.errors)")
        // Without --source, CONSENT_SYNC_RECONCILE_SOURCE chooses (the reconciliation unit's drop-in).
        let chosen = try await Self.run(["reconcile"], environment: database.merging(["CONSENT_SYNC_RECONCILE_SOURCE": "dataguard"]) { $1 })
        #expect(chosen.status == 1 && chosen.errors.contains("--source dataguard needs reconcile.dataguard.application_id"), "\(chosen)")
        let misspelt = try await Self.run(["reconcile", "--source", ""], environment: database.merging(["CONSENT_SYNC_RECONCILE_SOURCE": "datagaurd"]) { $1 })
        #expect(misspelt.status == 1 && misspelt.errors.contains("CONSENT_SYNC_RECONCILE_SOURCE must be"), "\(misspelt)")
        // Arguments a run cannot use, malformed or unknown flags included, are errors of the run (1),
        // named, not usage errors (64).
        for (arguments, named) in [(["--source", "file"], "--file"), (["--source", "ftp"], "--source"),
                                   (["--file", snapshot, "--snapshot-time", "yesterday"], "--snapshot-time"),
                                   (["--file", snapshot, "--max-removal-share", "2"], "--max-removal-share"),
                                   (["--file", snapshot, "--max-removal-share", "abc"], "--max-removal-share"),
                                   (["--file", snapshot, "--chek"], "--chek")] {
            let bad = try await Self.run(["reconcile"] + arguments, environment: database)
            #expect(bad.status == 1, "\(arguments): \(bad)")
            #expect(bad.errors.contains(named), "\(arguments): \(bad.errors)")
        }
    }

    @Test("replay: an id that is not kept for replay is an error naming it (exit 1); nothing to replay is 0")
    func replayIDs() async throws {
        let database = ["DATABASE_URL": try await TestDatabase.shared.freshDatabase()]
        let none = try await Self.run(["replay"], environment: database)
        #expect(none.status == 0 && none.output.contains("nothing to replay"), "\(none)")
        let unknown = try await Self.run(["replay", "--id", "999999"], environment: database)
        #expect(unknown.status == 1 && unknown.errors.contains("not kept for replay") && unknown.errors.contains("999999"), "\(unknown)")
        let json = try await Self.run(["replay", "--id", "999999", "--json"], environment: database)
        #expect(json.status == 1 && json.output.contains("[") && json.errors.contains("999999"), "\(json)")
    }

    @Test("clients: create prints the secret once (--json for scripts), list shows it, revoke marks it revoked")
    func clients() async throws {
        let database = ["DATABASE_URL": try await TestDatabase.shared.freshDatabase()]
        let created = try await Self.run(["clients", "create", "didomi-production", "--json"], environment: database)
        #expect(created.status == 0, "\(created)")
        let client = try #require(try JSONSerialization.jsonObject(with: Data(created.output.utf8)) as? [String: String], "\(created.output)")
        let id = try #require(client["client_id"])
        #expect(client["name"] == "didomi-production")
        #expect((client["client_secret"] ?? "").count >= 32)
        let listed = try await Self.run(["clients", "list", "--json"], environment: database)
        let rows = try #require(try JSONSerialization.jsonObject(with: Data(listed.output.utf8)) as? [[String: Any]], "\(listed)")
        #expect(rows.map { $0["client_id"] as? String } == [id])
        #expect(rows.first?["revoked_at"] == nil && !listed.output.contains(client["client_secret"]!))
        #expect(try await Self.run(["clients", "revoke", id], environment: database).status == 0)
        let after = try await Self.run(["clients", "list"], environment: database)
        #expect(after.output.contains(id) && after.output.contains("revoked"), "\(after)")
        // The name as an option, or none (the default names the one client most installs have).
        let named = try await Self.run(["clients", "create", "--name", "didomi-staging", "--json"], environment: database)
        #expect(named.status == 0 && named.output.contains("didomi-staging"), "\(named)")
        let unnamed = try await Self.run(["clients", "create"], environment: database)
        #expect(unnamed.status == 0 && unnamed.output.contains("client_secret:"), "\(unnamed)")
        #expect(try await Self.run(["clients", "list"], environment: database).output.contains("didomi"))
        let twice = try await Self.run(["clients", "create", "a", "--name", "b"], environment: database)
        #expect(twice.status != 0 && twice.errors.contains("give the name once"), "\(twice)")
        let unknown = try await Self.run(["clients", "revoke", "no-such-client"], environment: database)
        #expect(unknown.status == 1 && unknown.errors.contains("no-such-client"), "\(unknown)")
    }

    @Test("reconcile reads a gzip-compressed snapshot and a snapshot on standard input (--file -)")
    func reconcileCompressedAndStdin() async throws {
        let url = try await TestDatabase.shared.freshDatabase()
        let database = ["DATABASE_URL": url]
        let plain = try ReconciliationTests.write([ReconciliationTests.didomiUser("u-gz", version: 1, purposes: ["a": true])])
        defer { try? FileManager.default.removeItem(atPath: plain) }
        let gzip = Process()
        gzip.executableURL = URL(fileURLWithPath: "/bin/gzip")
        gzip.arguments = ["-k", "-f", plain]
        try gzip.run()
        gzip.waitUntilExit()
        defer { try? FileManager.default.removeItem(atPath: plain + ".gz") }

        let compressed = try await Self.run(["reconcile", "--source", "file", "--file", plain + ".gz", "--json",
                                             "--snapshot-time", "2025-06-01T00:00:00Z"], environment: database)
        #expect(compressed.status == 0, "\(compressed)")
        #expect(compressed.output.contains("\"users_read\":1") || compressed.output.contains("\"users_read\" : 1"), "\(compressed.output)")

        let stdin = ReconciliationTests.didomiUser("u-gz", version: 2, updatedAt: "2025-04-01T00:00:00Z", purposes: ["a": false]) + "\n"
        // Read from standard input, the snapshot's time is when the read began (after the first run's writes).
        let piped = try await Self.run(["reconcile", "--source", "file", "--file", "-"],
                                       environment: database, input: Data(stdin.utf8))
        #expect(piped.status == 0, "\(piped)")
        #expect(piped.output.contains("1 users read"), "\(piped.output)")
        // A compressed stream on standard input is recognised by its content (gzip -c snapshot | ...), as
        // is a compressed file without the .gz name.
        // (Dated before the stored rows changed, so they are newer and not drift.)
        let pipedGzip = try await Self.run(["reconcile", "--source", "file", "--file", "-", "--check",
                                            "--snapshot-time", "2025-02-01T00:00:00Z"],
                                           environment: database, input: try Data(contentsOf: URL(fileURLWithPath: plain + ".gz")))
        #expect(pipedGzip.status == 0 && pipedGzip.output.contains("1 users read"), "\(pipedGzip)")
        let unnamed = plain + ".snapshot"
        try FileManager.default.copyItem(atPath: plain + ".gz", toPath: unnamed)
        defer { try? FileManager.default.removeItem(atPath: unnamed) }
        let unnamedRun = try await Self.run(["reconcile", "--source", "file", "--file", unnamed, "--check",
                                             "--snapshot-time", "2025-02-01T00:00:00Z"], environment: database)
        #expect(unnamedRun.status == 0 && unnamedRun.output.contains("1 users read"), "\(unnamedRun)")
        let status = try await TestDatabase.withClient(url: url) { client in
            try await client.query("select status from consent.current_consents where user_id = 'u-gz' and purpose_id = 'a'")
                .collect().first?.decode(String.self)
        }
        #expect(status == "denied", "\(piped.output)")
    }
}
