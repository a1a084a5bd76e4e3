import ConsentCore
import Foundation
import Logging
import NIOCore
import PostgresNIO

/// What happened to one delivery.
public enum DeliveryOutcome: String, Sendable, Codable {
    case applied, duplicate, stale, stored, failed
}

/// One delivery's result, as committed.
public struct ApplyResult: Sendable, Equatable {
    public var deliveryID: Int64
    public var outcome: DeliveryOutcome
    public var reason: String?
}

/// A decoded delivery waiting to be applied, with its exact body.
public struct PendingDelivery: Sendable {
    public var change: ChangeSet
    public var body: ByteBuffer

    public init(change: ChangeSet, body: ByteBuffer) {
        self.change = change
        self.body = body
    }
}

/// PostgreSQL could not be reached (or did not answer in time): nothing was written.
public struct DatabaseUnavailable: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// PostgreSQL refused the batch (an SQL error, not a connection problem): nothing was written.
public struct DatabaseRejected: Error, CustomStringConvertible {
    public var sqlState: String?
    public var message: String
    public var description: String { "database rejected the delivery (\(sqlState ?? "?")): \(message)" }
}

/// The SQL side of the apply path: one round trip per batch (`consent.apply_batch`).
public struct ConsentStore: Sendable {
    public let client: PostgresClient
    public let logger: Logger
    /// Bound on one batch round trip; beyond it the batch is answered as unavailable.
    public let timeout: Duration

    public init(client: PostgresClient, logger: Logger, timeout: Duration = .milliseconds(500)) {
        self.client = client
        self.logger = logger
        self.timeout = timeout
    }

    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.withoutEscapingSlashes]
        return encoder
    }()

    /// Applies a batch in one transaction; results are in batch order.
    public func apply(_ batch: [PendingDelivery]) async throws -> [ApplyResult] {
        let json = String(decoding: try Self.encoder.encode(batch.map(\.change)), as: UTF8.self)
        let bodies = batch.map(\.body)
        let client = self.client
        let logger = self.logger
        return try await withDeadline(timeout) {
            do {
                var results: [ApplyResult] = []
                results.reserveCapacity(batch.count)
                let rows = try await client.query(
                    "select delivery_id, outcome, reason from consent.apply_batch(\(json)::jsonb, \(bodies))",
                    logger: logger)
                for try await (id, outcome, reason) in rows.decode((Int64, String, String?).self) {
                    results.append(.init(deliveryID: id, outcome: DeliveryOutcome(rawValue: outcome) ?? .failed, reason: reason))
                }
                return results
            } catch let error as PSQLError {
                throw Self.classify(error)
            }
        }
    }

    /// `select 1` within the deadline.
    public func ping() async throws {
        let client = self.client
        let logger = self.logger
        try await withDeadline(timeout) {
            do {
                try await client.query("select 1", logger: logger)
            } catch let error as PSQLError {
                throw Self.classify(error)
            }
        }
    }

    /// Server-side SQL errors are the batch's fault; connection-level ones are the database's.
    static func classify(_ error: PSQLError) -> any Error {
        guard let state = error.serverInfo?[.sqlState] else {
            return DatabaseUnavailable("database connection failed: \(error.code)")
        }
        // 08: connection exception, 53: insufficient resources, 57P0x: shutdown / cannot connect now.
        if state.hasPrefix("08") || state.hasPrefix("53") || state.hasPrefix("57P") {
            return DatabaseUnavailable("database unavailable (\(state))")
        }
        return DatabaseRejected(sqlState: state, message: error.serverInfo?[.message] ?? "\(error.code)")
    }
}

/// Runs `operation`, giving up with `DatabaseUnavailable` after `limit` (the operation is cancelled:
/// a request still waiting for a connection never reaches the database).
func withDeadline<T: Sendable>(
    _ limit: Duration, _ operation: @escaping @Sendable () async throws -> T
) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await operation() }
        group.addTask {
            try await Task.sleep(for: limit)
            throw DatabaseUnavailable("database did not answer within \(limit)")
        }
        defer { group.cancelAll() }
        return try await group.next()!
    }
}
