import Crypto
import Foundation
import Logging
import PostgresNIO

/// Applies the numbered SQL files of `sql/` in order, each in its own transaction, recorded in
/// `consent.schema_migrations` with a checksum, serialised across processes by an advisory lock.
public struct Migrator: Sendable {
    public struct Migration: Sendable {
        public var version: Int
        public var name: String
        public var sql: String
        public var checksum: String
    }

    public struct MigrationError: Error, CustomStringConvertible {
        public var description: String
    }

    /// Advisory-lock key that serialises migrations ("consent-sync migrate").
    static let lockKey: Int64 = 0x636f_6e73_656e_7401

    public let migrations: [Migration]
    public let directory: String

    /// Loads every `NNN_name.sql` file of a directory.
    public init(directory: String) throws {
        self.directory = directory
        let names: [String]
        do {
            names = try FileManager.default.contentsOfDirectory(atPath: directory)
        } catch {
            throw MigrationError(description: "cannot read the migrations directory \(directory) (set database.migrations_dir)")
        }
        var migrations: [Migration] = []
        for name in names.sorted() where name.hasSuffix(".sql") {
            guard let version = Int(name.prefix(while: \.isNumber)) else { continue }
            let sql = try String(contentsOfFile: "\(directory)/\(name)", encoding: .utf8)
            let digest = SHA256.hash(data: Data(sql.utf8)).map { String(format: "%02x", $0) }.joined()
            migrations.append(.init(version: version, name: name, sql: sql, checksum: digest))
        }
        guard !migrations.isEmpty else {
            throw MigrationError(description: "no migrations (NNN_name.sql) found in \(directory)")
        }
        let versions = migrations.map(\.version)
        guard Set(versions).count == versions.count else {
            throw MigrationError(description: "two migrations in \(directory) share a version number")
        }
        self.migrations = migrations
    }

    /// Finds `sql/`: the configured directory, else beside the executable's install prefix, else the
    /// working directory or the source checkout.
    public static func locateDirectory(configured: String?) -> String {
        if let configured { return configured }
        let executable = URL(fileURLWithPath: CommandLine.arguments.first ?? "").resolvingSymlinksInPath()
        var candidates = [
            "/usr/share/consent-sync/sql",
            executable.deletingLastPathComponent().appendingPathComponent("../share/consent-sync/sql").path,
            FileManager.default.currentDirectoryPath + "/sql",
        ]
        // A debug or release build inside the checkout: .build/<triple>/<config>/consent-sync.
        var directory = executable.deletingLastPathComponent()
        for _ in 0..<5 {
            directory = directory.deletingLastPathComponent()
            candidates.append(directory.appendingPathComponent("sql").path)
        }
        return candidates.first { FileManager.default.fileExists(atPath: $0 + "/001_core.sql") }
            ?? FileManager.default.currentDirectoryPath + "/sql"
    }

    /// Applies what is pending. Returns the versions applied.
    @discardableResult
    public func migrate(client: PostgresClient, logger: Logger) async throws -> [Int] {
        try await client.withConnection { connection in
            try await connection.perform("select pg_advisory_lock(\(Self.lockKey))", logger: logger)
            do {
                let applied = try await self.apply(on: connection, logger: logger)
                try await connection.perform("select pg_advisory_unlock(\(Self.lockKey))", logger: logger)
                return applied
            } catch {
                _ = try? await connection.query("select pg_advisory_unlock(\(Self.lockKey))", logger: logger)
                throw error
            }
        }
    }

    /// Versions not yet applied (throws if an applied file was edited).
    public func pending(client: PostgresClient, logger: Logger) async throws -> [Migration] {
        try await client.withConnection { connection in
            try await self.pending(on: connection, logger: logger)
        }
    }

    private func pending(on connection: PostgresConnection, logger: Logger) async throws -> [Migration] {
        let exists = try await connection.query(
            "select to_regclass('consent.schema_migrations') is not null", logger: logger
        ).collect().first?.decode(Bool.self) ?? false
        guard exists else { return migrations }
        var recorded: [Int: String] = [:]
        for try await (version, checksum) in try await connection.query(
            "select version, checksum from consent.schema_migrations", logger: logger
        ).decode((Int, String).self) {
            recorded[version] = checksum
        }
        for migration in migrations {
            if let checksum = recorded[migration.version], checksum != migration.checksum {
                throw MigrationError(description:
                    "migration \(migration.name) was changed after it was applied; released migrations must never be edited")
            }
        }
        return migrations.filter { recorded[$0.version] == nil }
    }

    private func apply(on connection: PostgresConnection, logger: Logger) async throws -> [Int] {
        try await connection.perform("create schema if not exists consent", logger: logger)
        try await connection.perform("""
            create table if not exists consent.schema_migrations (
                version    integer primary key,
                name       text not null,
                checksum   text not null,
                applied_at timestamptz not null default now())
            """, logger: logger)
        for comment in [
            "comment on table consent.schema_migrations is 'Applied SQL migrations (sql/NNN_name.sql) with their checksums.'",
            "comment on column consent.schema_migrations.version is 'Migration number (NNN).'",
            "comment on column consent.schema_migrations.name is 'Migration file name.'",
            "comment on column consent.schema_migrations.checksum is 'SHA-256 of the file as applied; a released migration is never edited.'",
            "comment on column consent.schema_migrations.applied_at is 'When it was applied.'",
        ] {
            try await connection.perform(PostgresQuery(unsafeSQL: comment), logger: logger)
        }
        var applied: [Int] = []
        for migration in try await pending(on: connection, logger: logger) {
            logger.info("applying migration", metadata: ["migration": "\(migration.name)"])
            try await connection.perform("begin", logger: logger)
            do {
                // The extended protocol takes one statement per query: let the server run the whole
                // file as one dynamic command, quoted with a tag the file does not contain.
                var tag = "migration"
                while migration.sql.contains("$\(tag)") { tag += "_" }
                let body = "do $\(tag)$ begin execute $\(tag)_sql$\(migration.sql)$\(tag)_sql$; end $\(tag)$"
                try await connection.perform(PostgresQuery(unsafeSQL: body), logger: logger)
                try await connection.perform("""
                    insert into consent.schema_migrations (version, name, checksum)
                    values (\(migration.version), \(migration.name), \(migration.checksum))
                    """, logger: logger)
                try await connection.perform("commit", logger: logger)
            } catch {
                _ = try? await connection.query("rollback", logger: logger)
                var hint = ""
                if let error = error as? PSQLError, error.serverInfo?[.sqlState] == "42501",
                   error.serverInfo?[.message]?.contains("create role") == true {
                    hint = "; the database user may not create roles: have an administrator run "
                        + "'CREATE ROLE consent_analyst NOLOGIN' once, then migrate again"
                }
                throw MigrationError(description: "migration \(migration.name) failed: \(String(reflecting: error))\(hint)")
            }
            applied.append(migration.version)
        }
        return applied
    }
}
