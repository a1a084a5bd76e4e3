import AsyncHTTPClient
import ConsentCore
import ConsentServer
import ConsentStore
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import NIOCore
import PostgresNIO
import Prometheus
import Testing

/// A running agent (real HTTP server, real PostgreSQL) for one test, plus SQL access to its database.
struct AgentHarness {
    let client: any TestClientProtocol
    let db: PostgresClient
    let url: String

    /// Starts an agent on a fresh database and runs `body` against it.
    static func run(
        configure: @Sendable (inout AgentConfiguration) -> Void = { _ in },
        databaseURL: String? = nil,
        logger: Logger = TestDatabase.logger,
        registry: PrometheusCollectorRegistry? = nil,
        _ body: @escaping @Sendable (AgentHarness) async throws -> Void
    ) async throws {
        let url: String
        if let databaseURL { url = databaseURL } else { url = try await TestDatabase.shared.freshDatabase() }
        var configuration = AgentConfiguration(stateDirectory: NSTemporaryDirectory())
        configuration.host = "127.0.0.1"
        configuration.port = 0
        configuration.authDisabled = true
        // The whole suite runs in parallel on a small machine: a connection lease can take longer
        // than the production default. Tests about the bound set it themselves.
        configuration.applyTimeout = .seconds(10)
        configure(&configuration)
        let appClient = PostgresClient(
            configuration: try Agent.clientConfiguration(url: url, configuration: configuration),
            backgroundLogger: TestDatabase.logger)
        let app = Agent.buildApplication(
            configuration: configuration,
            dependencies: .init(client: appClient, migrator: try TestDatabase.migrator(), registry: registry),
            logger: logger)
        try await TestDatabase.withClient(url: url) { db in
            try await app.test(.live) { client in
                try await body(AgentHarness(client: client, db: db, url: url))
            }
        }
    }

    // MARK: - Requests

    struct Reply {
        var status: HTTPResponse.Status
        var headers: HTTPFields
        var json: [String: Any]
        var outcome: String? { json["status"] as? String }
        var message: String? { json["message"] as? String }
        var deliveryID: Int64? { (json["delivery_id"] as? NSNumber)?.int64Value }
    }

    /// Posts like a platform does: a real HTTP client, a connection per concurrent request (no
    /// pipelining), and a deadline, so a request that is never answered fails the test instead of
    /// hanging it.
    @discardableResult
    func post(_ path: String = "/webhooks/didomi", body: String, contentType: String? = "application/json",
              headers extra: [(String, String)] = []) async throws -> Reply {
        let port = try #require(client.port)
        var request = HTTPClientRequest(url: "http://127.0.0.1:\(port)\(path)")
        request.method = .POST
        if let contentType { request.headers.add(name: "Content-Type", value: contentType) }
        request.headers.add(contentsOf: extra)
        request.body = .bytes(ByteBuffer(string: body))
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(60))
        let bytes = try await response.body.collect(upTo: 16 << 20)
        var headers = HTTPFields()
        for (name, value) in response.headers {
            if let field = HTTPField.Name(name) { headers.append(HTTPField(name: field, value: value)) }
        }
        let json = (try? JSONSerialization.jsonObject(with: Data(buffer: bytes))) as? [String: Any] ?? [:]
        return Reply(status: HTTPResponse.Status(code: Int(response.status.code)), headers: headers, json: json)
    }

    /// Sends `request` byte for byte on a new connection, closes the sending side (unless told not to),
    /// and returns what the agent answered until it closed the connection (30 s at most), for framing
    /// no HTTP client would produce.
    func rawExchange(_ request: String, closeSending: Bool = true) throws -> String {
        let port = try #require(client.port)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        #expect(fd >= 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        #expect(connected == 0)
        let bytes = Array(request.utf8)
        #expect(write(fd, bytes, bytes.count) == bytes.count)
        if closeSending { shutdown(fd, Int32(SHUT_WR)) }
        var limit = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = read(fd, &buffer, buffer.count)
            if count <= 0 { break }
            answer += buffer[0..<count]
        }
        return String(decoding: answer, as: UTF8.self)
    }

    /// Posts a fixture file (path under shared/spec/fixtures) and expects 200 with `outcome`.
    @discardableResult
    func postFixture(_ path: String, expect outcome: String? = "applied",
                     sourceLocation: SourceLocation = #_sourceLocation) async throws -> Reply {
        let body = try String(contentsOfFile: TestDatabase.fixtures + "/" + path, encoding: .utf8)
        let reply = try await post(body: body)
        #expect(reply.status == .ok, "\(path): \(reply.json)", sourceLocation: sourceLocation)
        if let outcome {
            #expect(reply.outcome == outcome, "\(path): \(reply.json)", sourceLocation: sourceLocation)
        }
        return reply
    }

    // MARK: - Reading the analysts' views

    /// `purpose_id/lawful_basis -> status` for one user and regulation.
    func consents(user: String, regulation: String? = "gdpr") async throws -> [String: String] {
        var result: [String: String] = [:]
        let rows = try await db.query("""
            select purpose_id, lawful_basis, status from consent.current_consents
             where user_id = \(user) and regulation is not distinct from \(regulation)
            """)
        for try await (purpose, basis, status) in rows.decode((String, String, String).self) {
            result[basis == "consent" ? purpose : "\(purpose)/\(basis)"] = status
        }
        return result
    }

    /// `purpose_id/preference_id -> value_ids` for one user and regulation.
    func preferences(user: String, regulation: String? = "gdpr") async throws -> [String: [String]] {
        var result: [String: [String]] = [:]
        let rows = try await db.query("""
            select coalesce(purpose_id, ''), preference_id, value_ids from consent.current_preferences
             where user_id = \(user) and regulation is not distinct from \(regulation)
            """)
        for try await (purpose, preference, values) in rows.decode((String, String, [String]).self) {
            result["\(purpose)/\(preference)"] = values
        }
        return result
    }

    func scalar<T: PostgresDecodable & Sendable>(_ query: PostgresQuery, as type: T.Type = T.self) async throws -> T? {
        for try await value in try await db.query(query).decode(T.self) { return value }
        return nil
    }

    func count(_ query: PostgresQuery) async throws -> Int {
        try await scalar(query, as: Int.self) ?? 0
    }
}

/// Fixture user ids.
enum Users {
    static let alice = "6f1c2a9e-3b7d-4c11-9e0a-5d2f8b7c1a40"
    static let bob = "2d9e4b71-0c5a-4f83-a6d2-71be39c0f5e2"
    static let carol = "a4c7f0d2-8e19-4b5c-93fa-0d6e2b18c7a9"
    static let dave = "5be01c3f-77a2-4e9d-b0c4-e8f2136a9d05"
}

/// Builds Didomi payloads for sequences the fixtures do not cover.
enum Didomi {
    static func user(
        _ type: String = "user.updated", id: String = "u-1", version: Int, updatedAt: String,
        purposes: String, regulation: String? = nil, vendors: String? = nil, ouid: String = "u1@example.com"
    ) -> String {
        let reg = regulation.map { ", \"regulation\": \"\($0)\"" } ?? ""
        let vendorPart = vendors.map { ", \"vendors\": \($0)" } ?? ""
        let key = type == "user.updated" ? "new_entity" : "entity"
        return """
            {"type": "\(type)", "parameters": {"\(key)": {"id": "\(id)", "organization_id": "org-t",
             "organization_user_id": "\(ouid)", "version": \(version), "created_at": "2025-01-01T00:00:00Z",
             "updated_at": "\(updatedAt)"\(reg), "consents": {"purposes": \(purposes)\(vendorPart)}}}}
            """
    }

    static func event(
        _ type: String = "event.created", id: String, user: String = "u-1", createdAt: String,
        updatedAt: String? = nil, status: String = "confirmed", oldStatus: String? = nil,
        purposes: String, regulation: String = "gdpr"
    ) -> String {
        let updated = updatedAt ?? createdAt
        let entity = """
            {"id": "\(id)", "organization_id": "org-t", "created_at": "\(createdAt)", "updated_at": "\(updated)",
             "status": "\(status)", "regulation": "\(regulation)", "user": {"id": "\(user)"},
             "consents": {"purposes": \(purposes)}}
            """
        if type == "event.updated" {
            let old = """
                {"id": "\(id)", "organization_id": "org-t", "created_at": "\(createdAt)", "updated_at": "\(createdAt)",
                 "status": "\(oldStatus ?? "pending_approval")", "regulation": "\(regulation)", "user": {"id": "\(user)"},
                 "consents": {"purposes": \(purposes)}}
                """
            return "{\"type\": \"event.updated\", \"parameters\": {\"old_entity\": \(old), \"new_entity\": \(entity)}}"
        }
        return "{\"type\": \"\(type)\", \"parameters\": {\"entity\": \(entity)}}"
    }

    static func deleted(id: String = "u-1", version: Int, updatedAt: String) -> String {
        """
        {"type": "user.deleted", "parameters": {"entity": {"id": "\(id)", "organization_id": "org-t",
         "organization_user_id": "gone@example.com", "version": \(version), "created_at": "2025-01-01T00:00:00Z",
         "updated_at": "\(updatedAt)", "consents": {"purposes": []}}}}
        """
    }
}
