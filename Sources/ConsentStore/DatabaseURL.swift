import Foundation
import Logging
import NIOSSL
import PostgresNIO

/// Parses `DATABASE_URL` (`postgres://user:password@host:port/db`, `?host=/socket/dir` for a unix
/// socket, `?sslmode=…` as libpq reads it, `?sslrootcert=PATH`) into a client configuration.
public enum DatabaseURL {
    public struct InvalidURL: Error, CustomStringConvertible {
        public var description: String
    }

    public struct ConnectionFailed: Error, CustomStringConvertible {
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
        // As libpq: no user named means the operating-system user the agent runs as (peer
        // authentication over a unix socket then works for a service user), and no database named
        // means the database of that user's name.
        let username = components.percentEncodedUser?.removingPercentEncoding.flatMap { $0.isEmpty ? nil : $0 }
            ?? query["user"].flatMap { $0.isEmpty ? nil : $0 } ?? operatingSystemUser
        let password = components.percentEncodedPassword?.removingPercentEncoding ?? query["password"]
        var database = String(components.percentEncodedPath.drop(while: { $0 == "/" })).removingPercentEncoding
        if database?.isEmpty ?? true { database = query["dbname"] ?? username }
        let port = components.port ?? Int(query["port"] ?? "") ?? 5432

        let urlHost = components.host.flatMap { $0.isEmpty ? nil : $0 }
        // A host that is a path is a socket directory. No host at all is, as in Debian's libpq, the
        // local server's socket in /var/run/postgresql when there is one, else localhost over TCP.
        var socketDirectory = query["host"].flatMap { $0.hasPrefix("/") ? $0 : nil }
        if socketDirectory == nil, urlHost == nil, query["host"]?.isEmpty ?? true,
           FileManager.default.fileExists(atPath: "\(defaultSocketDirectory)/.s.PGSQL.\(port)") {
            socketDirectory = defaultSocketDirectory
        }
        if let socketDirectory {
            return .init(unixSocketPath: "\(socketDirectory)/.s.PGSQL.\(port)", username: username,
                         password: password, database: database)
        }
        let host = urlHost ?? query["host"].flatMap { $0.isEmpty ? nil : $0 } ?? "localhost"
        let tls: PostgresClient.Configuration.TLS
        switch try encryption(query) {
        case .disable: tls = .disable
        case .prefer(let settings): tls = .prefer(settings)
        case .require(let settings): tls = .require(settings)
        }
        return .init(host: host, port: port, username: username, password: password, database: database, tls: tls)
    }

    enum Encryption {
        case disable, prefer(TLSConfiguration), require(TLSConfiguration)
    }

    /// As libpq: prefer and require encrypt without checking the certificate (a server's self-signed
    /// certificate is fine); verify-ca checks the chain, verify-full the chain and the host name.
    static func encryption(_ query: [String: String]) throws -> Encryption {
        var unverified = TLSConfiguration.makeClientConfiguration()
        unverified.certificateVerification = .none
        var verified = TLSConfiguration.makeClientConfiguration()
        if let roots = query["sslrootcert"], !roots.isEmpty { verified.trustRoots = .file(roots) }
        switch query["sslmode"] ?? "prefer" {
        case "disable": return .disable
        case "allow", "prefer": return .prefer(unverified)
        case "require": return .require(unverified)
        case "verify-ca":
            verified.certificateVerification = .noHostnameVerification
            return .require(verified)
        case "verify-full": return .require(verified)
        case let mode:
            throw InvalidURL(description: "DATABASE_URL: sslmode must be disable, allow, prefer, require, verify-ca or verify-full, not '\(mode.prefix(20))'")
        }
    }

    /// Opens one connection as the pool of `client` would (same server, login and encryption as the URL
    /// says) and closes it: an unreachable server, a refused login or a missing database is reported at
    /// once with its cause, where the pool retries for as long as its callers wait and then reports only
    /// that it gave up.
    public static func checkConnection(url: String, client: PostgresClient.Configuration, timeout: Duration = .seconds(10),
                                       logger: Logger) async throws {
        guard let components = URLComponents(string: url) else { throw InvalidURL(description: "DATABASE_URL is not a URL") }
        let query = Dictionary(
            (components.queryItems ?? []).map { ($0.name, $0.value ?? "") }, uniquingKeysWith: { _, last in last })
        var configuration: PostgresConnection.Configuration
        if let socket = client.unixSocketPath {
            configuration = .init(unixSocketPath: socket, username: client.username, password: client.password,
                                  database: client.database)
        } else {
            let tls: PostgresConnection.Configuration.TLS
            switch try encryption(query) {
            case .disable: tls = .disable
            case .prefer(let settings): tls = .prefer(try NIOSSLContext(configuration: settings))
            case .require(let settings): tls = .require(try NIOSSLContext(configuration: settings))
            }
            configuration = .init(host: client.host ?? "localhost", port: client.port ?? 5432, username: client.username,
                                  password: client.password, database: client.database, tls: tls)
        }
        configuration.options.connectTimeout = .init(timeout)
        let target = client.unixSocketPath ?? "\(client.host ?? "localhost"):\(client.port ?? 5432)"
        do {
            let connection = try await PostgresConnection.connect(configuration: configuration, id: 0, logger: logger)
            try await connection.close()
        } catch let error as PSQLError {
            let reason = error.serverInfo?[.message] ?? "\(error.code)" + (error.underlying.map { ": \($0)" } ?? "")
            throw ConnectionFailed(description: "cannot connect to the database at \(target) as \(client.username): \(reason)")
        } catch {
            throw ConnectionFailed(description: "cannot connect to the database at \(target) as \(client.username): \(error)")
        }
    }

    /// Where Debian's libpq looks for the local server when a URL names no host.
    public static let defaultSocketDirectory = "/var/run/postgresql"

    /// The name of the operating-system user the process runs as (libpq's default user name).
    public static var operatingSystemUser: String {
        if let entry = getpwuid(geteuid()), let name = entry.pointee.pw_name, let user = String(validatingCString: name),
           !user.isEmpty {
            return user
        }
        return ProcessInfo.processInfo.environment["USER"].flatMap { $0.isEmpty ? nil : $0 } ?? "postgres"
    }

    /// The URL without its password (in the authority or as a `password` query parameter), for logs.
    public static func redacted(_ text: String) -> String {
        guard var components = URLComponents(string: text) else { return "(unparseable)" }
        if components.password != nil { components.password = "***" }
        components.queryItems = components.queryItems?.map { item in
            item.name == "password" ? URLQueryItem(name: item.name, value: "***") : item
        }
        return components.string ?? "(unparseable)"
    }
}
