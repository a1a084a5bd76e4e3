import Crypto
import CryptoExtras
import Foundation
import Logging
import PostgresNIO

/// OAuth clients and tokens in PostgreSQL (shared by every agent instance).
///
/// Revoking a client notifies `OAuthRepository.revocationChannel` (a trigger does, whoever revokes), so
/// that agents drop the client's tokens from their caches at once.
public struct OAuthRepository: Sendable {
    /// The channel a revocation is notified on; the payload is the client id.
    public static let revocationChannel = "consent_sync_oauth_revoked"

    public struct Client: Sendable, Equatable {
        public var clientID: String
        public var name: String
        public var createdAt: Date
        public var revokedAt: Date?
    }

    public let client: PostgresClient
    public let logger: Logger
    /// How long a request waits for a connection before the database counts as unavailable.
    public let timeout: Duration
    /// How long it then waits for the answer to its statements (`ConsentStore.answerDeadline`).
    public let answerTimeout: Duration

    public init(client: PostgresClient, logger: Logger, timeout: Duration = .milliseconds(500),
                answerTimeout: Duration = ConsentStore.answerDeadline) {
        self.client = client
        self.logger = logger
        self.timeout = timeout
        self.answerTimeout = answerTimeout
    }

    /// Creates a client; returns its id and the secret (shown once, only its hash is stored).
    public func createClient(name: String) async throws -> (clientID: String, secret: String) {
        let clientID = "cs-" + Secrets.randomHex(8)
        let secret = Secrets.randomToken(32)
        let hash = SecretHash.make(secret)
        try await client.perform("""
            insert into consent.oauth_clients (client_id, name, secret_hash) values (\(clientID), \(name), \(hash))
            """, logger: logger)
        return (clientID, secret)
    }

    public func listClients() async throws -> [Client] {
        var clients: [Client] = []
        let rows = try await client.query(
            "select client_id, name, created_at, revoked_at from consent.oauth_clients order by created_at", logger: logger)
        for try await (id, name, created, revoked) in rows.decode((String, String, Date, Date?).self) {
            clients.append(Client(clientID: id, name: name, createdAt: created, revokedAt: revoked))
        }
        return clients
    }

    /// Revokes a client and deletes its tokens. Returns false when no such active client exists.
    public func revokeClient(_ clientID: String) async throws -> Bool {
        let rows = try await client.query("""
            with revoked as (
                update consent.oauth_clients set revoked_at = now() where client_id = \(clientID) and revoked_at is null
                returning client_id),
            dropped as (delete from consent.oauth_tokens where client_id in (select client_id from revoked))
            select count(*)::int from revoked
            """, logger: logger).collect()
        return try (rows.first?.decode(Int.self) ?? 0) > 0
    }

    /// Checks a client's secret (constant-time); nil when unknown, revoked or wrong.
    public func authenticate(clientID: String, secret: String) async throws -> Bool {
        let logger = self.logger
        let stored = try await withAnsweringConnection(client: client, within: timeout, answerWithin: answerTimeout, logger: logger) { connection in
            try await connection.query("""
                select secret_hash from consent.oauth_clients where client_id = \(clientID) and revoked_at is null
                """, logger: logger).collect().first?.decode(String.self)
        }
        guard let stored else {
            _ = SecretHash.verify(secret, against: SecretHash.placeholder)  // same work whether or not the client exists
            return false
        }
        // A hash made by an earlier version (PBKDF2) is checked as it is and never rewritten: instances of
        // that version may share the database during a rolling upgrade, and a downgrade must keep working.
        return SecretHash.verify(secret, against: stored)
    }

    /// Issues a token valid for `lifetime` seconds.
    public func issueToken(clientID: String, lifetime: Int) async throws -> String {
        let token = Secrets.randomToken(32)
        let digest = Secrets.sha256(token)
        let logger = self.logger
        try await withAnsweringConnection(client: client, within: timeout, answerWithin: answerTimeout, logger: logger) { connection in
            try await connection.perform("""
                insert into consent.oauth_tokens (token_hash, client_id, expires_at)
                values (\(digest), \(clientID), now() + make_interval(secs => \(Double(lifetime))))
                """, logger: logger)
            // Expired tokens are useless: prune a few on the way.
            try await connection.perform("""
                delete from consent.oauth_tokens where token_hash in (
                    select token_hash from consent.oauth_tokens where expires_at < now() - interval '1 day' limit 100)
                """, logger: logger)
        }
        return token
    }

    /// The client a token belongs to and when it expires, if it is valid now.
    public func validate(token: String) async throws -> (clientID: String, expiresAt: Date)? {
        let digest = Secrets.sha256(token)
        let logger = self.logger
        return try await withAnsweringConnection(client: client, within: timeout, answerWithin: answerTimeout, logger: logger) { connection in
            let rows = try await connection.query("""
                select t.client_id, t.expires_at from consent.oauth_tokens t
                  join consent.oauth_clients c using (client_id)
                 where t.token_hash = \(digest) and t.expires_at > now() and c.revoked_at is null
                """, logger: logger).collect()
            guard let row = rows.first else { return nil }
            let (clientID, expiresAt) = try row.decode((String, Date).self)
            return (clientID, expiresAt)
        }
    }
}

/// Random secrets and digests.
public enum Secrets {
    public static func randomToken(_ bytes: Int) -> String {
        var generator = SystemRandomNumberGenerator()
        let data = Data((0..<bytes).map { _ in UInt8.random(in: .min ... .max, using: &generator) })
        return data.base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    public static func randomHex(_ bytes: Int) -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<bytes).map { _ in String(format: "%02x", UInt8.random(in: .min ... .max, using: &generator)) }.joined()
    }

    public static func sha256(_ text: String) -> ByteBuffer {
        ByteBuffer(bytes: Array(SHA256.hash(data: Data(text.utf8))))
    }

    /// Compares two secrets in time independent of where they differ (digests of equal length).
    public static func constantTimeEquals(_ a: String, _ b: String) -> Bool {
        let x = Array(SHA256.hash(data: Data(a.utf8)))
        let y = Array(SHA256.hash(data: Data(b.utf8)))
        var difference: UInt8 = 0
        for index in 0..<x.count { difference |= x[index] ^ y[index] }
        return difference == 0
    }
}

/// Client secrets are 256 random bits (`Secrets.randomToken(32)`), so a fast salted hash protects them
/// as well as a slow one would, and checking one costs a caller nothing it could turn against the
/// agent's CPU: `sha256$<salt>$<hash>`. Clients created by earlier versions carry
/// `pbkdf2-sha512$<rounds>$<salt>$<hash>` (210,000 rounds), still checked, and replaced on their next
/// successful token request.
public enum SecretHash {
    /// A hash no secret matches, checked when a client id is unknown.
    static let placeholder = "sha256$" + Data(repeating: 0, count: 16).base64EncodedString() + "$"
        + Data(repeating: 0, count: 32).base64EncodedString()

    public static func make(_ secret: String) -> String {
        let salt = Data(Secrets.randomToken(16).utf8)
        return "sha256$\(salt.base64EncodedString())$\(digest(secret, salt: salt).base64EncodedString())"
    }

    public static func verify(_ secret: String, against stored: String) -> Bool {
        let parts = stored.split(separator: "$").map(String.init)
        let actual: Data?, expected: Data?
        switch (parts.first, parts.count) {
        case ("sha256", 3):
            expected = Data(base64Encoded: parts[2])
            actual = Data(base64Encoded: parts[1]).map { digest(secret, salt: $0) }
        case ("pbkdf2-sha512", 4):
            expected = Data(base64Encoded: parts[3])
            actual = Int(parts[1]).flatMap { rounds in
                Data(base64Encoded: parts[2]).flatMap { try? pbkdf2(secret, salt: $0, rounds: rounds) }
            }
        default:
            return false
        }
        guard let actual, let expected, actual.count == expected.count else { return false }
        var difference: UInt8 = 0
        for (a, b) in zip(actual, expected) { difference |= a ^ b }
        return difference == 0
    }

    private static func digest(_ secret: String, salt: Data) -> Data {
        var hasher = SHA256()
        hasher.update(data: salt)
        hasher.update(data: Data(secret.utf8))
        return Data(hasher.finalize())
    }

    /// The hash of earlier versions (checked only; never made any more).
    public static func pbkdf2(_ secret: String, salt: Data, rounds: Int) throws -> Data {
        let key = try KDF.Insecure.PBKDF2.deriveKey(
            from: Data(secret.utf8), salt: salt, using: .sha512, outputByteCount: 32, rounds: rounds)
        return key.withUnsafeBytes { Data($0) }
    }
}
