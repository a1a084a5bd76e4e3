import Logging
import PostgresNIO

// A statement's execution error reaches the client only when its result is read: a statement whose
// rows are not consumed would fail silently (and a later COMMIT of the aborted transaction would
// quietly roll back). `perform` runs a statement and reads its result to the end.

extension PostgresConnection {
    /// Runs a statement to completion, surfacing its errors.
    public func perform(_ query: PostgresQuery, logger: Logger) async throws {
        _ = try await self.query(query, logger: logger).collect()
    }
}

extension PostgresClient {
    /// Runs a statement to completion, surfacing its errors.
    public func perform(_ query: PostgresQuery, logger: Logger) async throws {
        _ = try await self.query(query, logger: logger).collect()
    }
}
