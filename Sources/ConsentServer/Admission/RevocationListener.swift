import ConsentStore
import Logging
import PostgresNIO
import ServiceLifecycle

/// Keeps the token cache honest: listens for client revocations (notified by the database whoever
/// revokes, see `OAuthRepository.revocationChannel`) and drops the client's cached tokens at once.
///
/// While it is not listening (no database connection), notifications can be missed: each time it
/// starts listening again it empties the cache, and meanwhile the cache's TTL bounds the staleness.
struct RevocationListener: Service {
    let client: PostgresClient
    let cache: TokenCache
    let logger: Logger
    var retryDelay: Duration = .seconds(1)

    func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                do {
                    try await listen()
                } catch {
                    guard !Task.isCancelled else { return }
                    logger.warning("not listening for OAuth client revocations; cached tokens expire by their TTL meanwhile",
                                   metadata: ["error": "\(String(reflecting: error))"])
                }
                try? await Task.sleep(for: retryDelay)
            }
        }
    }

    private func listen() async throws {
        let cache = self.cache
        let logger = self.logger
        try await client.withConnection { connection in
            try await connection.listen(on: OAuthRepository.revocationChannel) { notifications in
                await cache.clear()
                for try await notification in notifications {
                    logger.info("OAuth client revoked: its cached tokens are dropped",
                                metadata: ["client_id": "\(notification.payload)"])
                    await cache.revoke(clientID: notification.payload)
                }
            }
        }
    }
}
