import ConsentCore
import Foundation
import Atomics
import Logging
import Metrics
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
    /// The statement was sent but no answer came in time: it may still commit (a retry of a delivery
    /// is then answered `duplicate`). Otherwise nothing was sent.
    public var outcomeUnknown: Bool
    public init(_ description: String, outcomeUnknown: Bool = false) {
        self.description = description
        self.outcomeUnknown = outcomeUnknown
    }
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

    /// The server-side bound of one statement on the agent's connections (`Agent` sets it).
    public static let statementTimeout: Duration = .seconds(30)

    /// How long a request waits by default for the answer to a statement already sent before it is
    /// answered 503 (`database.answer_timeout_ms`). A server that stopped answering (frozen, or cut off
    /// by the network without a reset) would otherwise hold each request until the statement timeout,
    /// which it cannot even enforce then.
    public static let answerDeadline: Duration = .seconds(5)

    /// Applies a batch in one transaction; results are in batch order.
    public func apply(_ batch: [PendingDelivery]) async throws -> [ApplyResult] {
        let statement = ApplyBatch(
            changes: JSONB(ChangeSet.jsonArray(batch.lazy.map(\.change), capacity: 2048 * batch.count)),
            bodies: batch.map(\.body))
        let client = self.client
        let logger = self.logger
        return try await withConnection(client: client, within: timeout) { connection in
            var results: [ApplyResult] = []
            results.reserveCapacity(batch.count)
            for try await (id, outcome, reason) in try await connection.execute(statement, logger: logger) {
                results.append(.init(deliveryID: id, outcome: DeliveryOutcome(rawValue: outcome) ?? .failed, reason: reason))
            }
            return results
        }
    }

    /// The apply call, prepared once per connection: a batch costs no parse or plan of its own.
    struct ApplyBatch: PostgresPreparedStatement {
        static let sql = "select delivery_id, outcome, reason from consent.apply_batch($1::jsonb, $2::bytea[])"
        typealias Row = (Int64, String, String?)

        var changes: JSONB
        var bodies: [ByteBuffer]

        func makeBindings() throws -> PostgresBindings {
            var bindings = PostgresBindings(capacity: 2)
            bindings.append(changes)
            bindings.append(bodies)
            return bindings
        }

        func decodeRow(_ row: PostgresRow) throws -> Row {
            try row.decode(Row.self)
        }
    }

    /// `select 1` within the deadline (a probe: answered within a second of the lease).
    public func ping() async throws {
        let client = self.client
        let logger = self.logger
        try await withAnsweringConnection(client: client, within: timeout, answerWithin: .seconds(1), logger: logger) { connection in
            try await connection.perform("select 1", logger: logger)
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

/// Leases a connection and runs `operation` on it. Only the wait for a connection is bounded by
/// `limit`: past it the request is withdrawn and `DatabaseUnavailable` thrown, so a 503 always means
/// "nothing was sent". Once a statement is on its way, its outcome is awaited (bounded by the
/// server's statement_timeout), so an answer never contradicts what was committed.
///
/// The lease and the deadline settle the race between them once, on one atomic: a connection that
/// arrives after the deadline won is handed back unused, and a deadline that finds the connection
/// leased stands down. So the statement's task is never cancelled while the statement runs (the
/// driver would then close the connection under it).
public func withConnection<T: Sendable>(
    client: PostgresClient, within limit: Duration,
    _ operation: @escaping @Sendable (PostgresConnection) async throws -> T
) async throws -> T {
    let waiting = 0, leased = 1, expired = 2
    let state = ManagedAtomic(waiting)
    let asked = ContinuousClock.now
    return try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask {
            do {
                return try await client.withConnection { connection in
                    guard state.compareExchange(expected: waiting, desired: leased, ordering: .acquiringAndReleasing).exchanged else {
                        throw DatabaseUnavailable("no database connection within \(limit)")
                    }
                    let waited = ContinuousClock.now - asked
                    Timer(label: "consent_sync_db_connection_wait_seconds").recordNanoseconds(
                        waited.components.seconds * 1_000_000_000 + waited.components.attoseconds / 1_000_000_000)
                    return try await operation(connection)
                }
            } catch let error as PSQLError {
                throw ConsentStore.classify(error)
            }
        }
        group.addTask {
            try await Task.sleep(for: limit)
            guard state.compareExchange(expected: waiting, desired: expired, ordering: .acquiringAndReleasing).exchanged else {
                return nil
            }
            throw DatabaseUnavailable("no database connection within \(limit)")
        }
        defer { group.cancelAll() }
        while let next = try await group.next() {
            if let value = next { return value }
        }
        throw DatabaseUnavailable("database operation ended without a result")
    }
}

/// `withConnection`, answered within `answerWithin` of the lease bound: past it `DatabaseUnavailable`
/// (outcome unknown), and the operation is left to end on its own, keeping its connection until then (so
/// a connection is never handed on with a statement still in flight).
public func withAnsweringConnection<T: Sendable>(
    client: PostgresClient, within limit: Duration, answerWithin answer: Duration = ConsentStore.answerDeadline,
    logger: Logger, _ operation: @escaping @Sendable (PostgresConnection) async throws -> T
) async throws -> T {
    try await firstWithin(limit + answer, logger: logger) {
        try await withConnection(client: client, within: limit, operation)
    }
}

/// JSON text bound as a `jsonb` parameter in binary format: the format's version byte, then the text
/// (no intermediate `String`, no server-side cast from text).
public struct JSONB: PostgresNonThrowingEncodable, Sendable {
    public var text: [UInt8]

    public init(_ text: [UInt8]) { self.text = text }

    public static var psqlType: PostgresDataType { .jsonb }
    public static var psqlFormat: PostgresFormat { .binary }

    public func encode<JSONEncoder: PostgresJSONEncoder>(
        into byteBuffer: inout ByteBuffer, context: PostgresEncodingContext<JSONEncoder>
    ) {
        byteBuffer.reserveCapacity(minimumWritableBytes: text.count + 1)
        byteBuffer.writeInteger(UInt8(1))
        byteBuffer.writeBytes(text)
    }
}
