import Foundation
import PostgresNIO

/// Parses `DATABASE_URL` (`postgres://user:password@host:port/db`, `?host=/socket/dir` for a unix
/// socket, `?sslmode=disable|prefer|require`) into a client configuration.
public enum DatabaseURL {
    public struct InvalidURL: Error, CustomStringConvertible {
        public var description: String
    }

    public static func configuration(_ text: String) throws -> PostgresClient.Configuration {
        guard let components = URLComponents(string: text),
              let scheme = components.scheme, ["postgres", "postgresql"].contains(scheme)
        else {
            throw InvalidURL(description: "DATABASE_URL must look like postgres://user:password@host:port/db")
        }
        let query = Dictionary(
            (components.queryItems ?? []).map { ($0.name, $0.value ?? "") }, uniquingKeysWith: { _, last in last })
        let username = components.percentEncodedUser?.removingPercentEncoding ?? query["user"] ?? "postgres"
        let password = components.percentEncodedPassword?.removingPercentEncoding ?? query["password"]
        var database = String(components.percentEncodedPath.drop(while: { $0 == "/" })).removingPercentEncoding
        if database?.isEmpty ?? true { database = query["dbname"] ?? username }
        let port = components.port ?? Int(query["port"] ?? "") ?? 5432

        if let socketDirectory = query["host"], socketDirectory.hasPrefix("/") {
            return .init(unixSocketPath: "\(socketDirectory)/.s.PGSQL.\(port)", username: username,
                         password: password, database: database)
        }
        let host = components.host.flatMap { $0.isEmpty ? nil : $0 } ?? "localhost"
        let tls: PostgresClient.Configuration.TLS
        switch query["sslmode"] ?? "prefer" {
        case "disable": tls = .disable
        case "require", "verify-ca", "verify-full": tls = .require(.makeClientConfiguration())
        default: tls = .prefer(.makeClientConfiguration())
        }
        return .init(host: host, port: port, username: username, password: password, database: database, tls: tls)
    }

    /// The URL without its password, for logs.
    public static func redacted(_ text: String) -> String {
        guard var components = URLComponents(string: text) else { return "(unparseable)" }
        if components.password != nil { components.password = "***" }
        return components.string ?? "(unparseable)"
    }
}
