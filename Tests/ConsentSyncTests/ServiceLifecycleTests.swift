import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The binary as systemd runs it: Type=notify readiness, watchdog pings, SIGTERM draining in-flight work.
@Suite("Running under systemd")
struct ServiceLifecycleTests {
    static var binary: String {
        let candidates = [".build/debug/consent-sync", ".build/x86_64-unknown-linux-gnu/debug/consent-sync",
                          ".build/aarch64-unknown-linux-gnu/debug/consent-sync"]
        return candidates.map { TestDatabase.repositoryRoot + "/" + $0 }
            .first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates[0]
    }

    /// A datagram socket standing in for systemd's $NOTIFY_SOCKET.
    final class NotifySocket: @unchecked Sendable {
        let path: String
        let fd: Int32

        init() throws {
            path = FileManager.default.temporaryDirectory.appendingPathComponent("notify-\(UUID().uuidString.prefix(8))").path
            fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { buffer in
                for (index, byte) in path.utf8.enumerated() { buffer[index] = byte }
            }
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard bound == 0 else { throw POSIXError(.EADDRINUSE) }
            var timeout = timeval(tv_sec: 0, tv_usec: 200_000)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        }

        /// Messages received within `limit`.
        func receive(until done: ([String]) -> Bool, limit: Duration) -> [String] {
            var messages: [String] = []
            let deadline = ContinuousClock.now + limit
            var buffer = [UInt8](repeating: 0, count: 4096)
            while ContinuousClock.now < deadline && !done(messages) {
                let count = recv(fd, &buffer, buffer.count, 0)
                if count > 0 { messages.append(String(decoding: buffer[0..<count], as: UTF8.self)) }
            }
            return messages
        }

        deinit {
            close(fd)
            unlink(path)
        }
    }

    /// Opens a TCP connection to 127.0.0.1:port.
    static func connect(port: Int) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        return result == 0 ? fd : -1
    }

    static func send(_ fd: Int32, _ text: String) {
        _ = text.withCString { Glibc.send(fd, $0, strlen($0), 0) }
    }

    @Test("READY=1 when serving, WATCHDOG=1 pings, STOPPING=1 on SIGTERM; an in-flight request completes; exit 0")
    func notifyAndDrain() async throws {
        let url = try await TestDatabase.shared.freshDatabase()
        let notify = try NotifySocket()
        let port = 20_000 + Int.random(in: 0..<20_000)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.binary)
        process.arguments = ["serve", "--port", String(port)]
        var environment = ProcessInfo.processInfo.environment
        environment["DATABASE_URL"] = url
        environment["NOTIFY_SOCKET"] = notify.path
        environment["WATCHDOG_USEC"] = "200000"
        environment["CONSENT_SYNC_AUTH_DISABLED"] = "true"
        environment["CONSENT_SYNC_LOG_LEVEL"] = "warning"
        environment["CONSENT_SYNC_CONFIG"] = TestDatabase.emptyConfiguration
        process.environment = environment
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer { if process.isRunning { process.terminate() } }

        let startup = notify.receive(until: { $0.contains { $0.contains("READY=1") } }, limit: .seconds(60))
        #expect(startup.contains { $0.contains("READY=1") }, "\(startup)")
        let pings = notify.receive(until: { $0.filter { $0 == "WATCHDOG=1" }.count >= 2 }, limit: .seconds(5))
        #expect(pings.filter { $0 == "WATCHDOG=1" }.count >= 2)

        // A request in flight: headers and half of the body sent before SIGTERM, the rest after.
        let body = Didomi.user(version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#)
        let bytes = Array(body.utf8)
        let fd = Self.connect(port: port)
        #expect(fd >= 0)
        defer { close(fd) }
        Self.send(fd, "POST /webhooks/didomi HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: \(bytes.count)\r\n\r\n")
        Self.send(fd, String(decoding: bytes[0..<bytes.count / 2], as: UTF8.self))
        try await Task.sleep(for: .milliseconds(200))
        kill(process.processIdentifier, SIGTERM)
        let stopping = notify.receive(until: { $0.contains { $0.contains("STOPPING=1") } }, limit: .seconds(5))
        #expect(stopping.contains { $0.contains("STOPPING=1") })
        Self.send(fd, String(decoding: bytes[(bytes.count / 2)...], as: UTF8.self))
        var response = [UInt8](repeating: 0, count: 4096)
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let count = recv(fd, &response, response.count, 0)
        let text = count > 0 ? String(decoding: response[0..<count], as: UTF8.self) : ""
        #expect(text.hasPrefix("HTTP/1.1 200"), "\(text)")
        #expect(text.contains("\"applied\""))

        for _ in 0..<300 where process.isRunning { try await Task.sleep(for: .milliseconds(50)) }
        #expect(!process.isRunning)
        #expect(process.terminationStatus == 0)
        let applied = try await TestDatabase.withClient(url: url) { client in
            try await client.query("select count(*)::int from consent.deliveries where outcome = 'applied'")
                .collect().first?.decode(Int.self)
        }
        #expect(applied == 1)
    }
}
