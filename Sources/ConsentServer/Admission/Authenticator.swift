import AsyncHTTPClient
import ConsentCore
import ConsentStore
import Crypto
import Foundation
import HTTPTypes
import Hummingbird
import JWTKit
import Logging
import NIOCore

/// Admission: the caller's address (403) and credentials (401), before any body is read and before
/// anything is written.
public struct Authenticator: Sendable {
    let settings: AuthSettings
    let oauth: OAuthRepository
    let resolver: ClientAddressResolver
    let tokenCache: TokenCache
    let jwt: JWTVerifier?
    let logger: Logger

    init(settings: AuthSettings, oauth: OAuthRepository, logger: Logger) {
        self.settings = settings
        self.oauth = oauth
        self.resolver = ClientAddressResolver(trustedProxies: settings.trustedProxies)
        self.tokenCache = TokenCache(ttl: .seconds(settings.tokenCacheSeconds))
        self.jwt = settings.jwt.map { JWTVerifier(settings: $0, logger: logger) }
        self.logger = logger
    }

    /// The admitted caller, or the response that refuses it.
    enum Admission {
        case admitted(principal: String, address: String?)
        case refused(Response)
    }

    func clientAddress(_ request: Request, _ context: AgentRequestContext) -> String? {
        resolver.resolve(peer: context.remoteAddress?.ipAddress, headers: request.headers)
    }

    /// Address check only (the token endpoint authenticates the client itself).
    func checkAddress(_ allow: [IPNetwork], _ request: Request, _ context: AgentRequestContext) -> Response? {
        guard !allow.isEmpty else { return nil }
        let address = clientAddress(request, context)
        if let address, allow.contains(where: { $0.contains(address) }) { return nil }
        return JSONResponse.problem(.forbidden, "forbidden", "caller address \(address ?? "unknown") is not allowed on this endpoint")
    }

    func admitDidomi(_ request: Request, _ context: AgentRequestContext) async -> Admission {
        if let refusal = checkAddress(settings.didomiAllow, request, context) { return .refused(refusal) }
        let address = clientAddress(request, context)
        if settings.disabled { return .admitted(principal: "auth-disabled", address: address) }
        guard let token = Self.bearer(request.headers) else {
            return .refused(Self.unauthorized("missing bearer token (Authorization: Bearer <token> from POST /oauth/token)", invalid: false))
        }
        if let clientID = await tokenCache.lookup(token) {
            return .admitted(principal: "oauth:\(clientID)", address: address)
        }
        if let jwt, token.split(separator: ".").count == 3 {
            do {
                let subject = try await jwt.verify(token)
                return .admitted(principal: "jwt:\(subject)", address: address)
            } catch let error as JWTVerifier.KeysUnavailable {
                // The token was not judged: the sender should retry, not fetch a new token.
                return .refused(JSONResponse.problem(.serviceUnavailable, "keys_unavailable",
                                                     "cannot check the token: \(error)",
                                                     headers: [.retryAfter: "5"]))
            } catch {
                return .refused(Self.unauthorized("invalid bearer token: \(error)", invalid: true))
            }
        }
        do {
            guard let (clientID, expiresAt) = try await oauth.validate(token: token) else {
                return .refused(Self.unauthorized("invalid, expired or revoked bearer token", invalid: true))
            }
            await tokenCache.store(token, clientID: clientID, expiresAt: expiresAt)
            return .admitted(principal: "oauth:\(clientID)", address: address)
        } catch {
            return .refused(JSONResponse.problem(.serviceUnavailable, "database_unavailable",
                                                 "cannot check the token: the database is unavailable",
                                                 headers: [.retryAfter: "5"]))
        }
    }

    func admitDataGuard(_ kind: DataGuardDecoder.Kind, _ request: Request, _ context: AgentRequestContext) -> Admission {
        let credentials = settings.dataguard[kind] ?? .init()
        if let refusal = checkAddress(credentials.allow, request, context) { return .refused(refusal) }
        let address = clientAddress(request, context)
        if settings.disabled { return .admitted(principal: "auth-disabled", address: address) }
        var presented: [String] = []
        if credentials.keyLocation != .query, let name = HTTPField.Name(credentials.keyName),
           let value = request.headers[name] {
            presented.append(value)
        }
        if credentials.keyLocation != .header, let value = request.uri.queryParameters[Substring(credentials.keyName)] {
            presented.append(String(value))
        }
        for value in presented {
            if let index = Self.match(value, in: credentials.apiKeys) {
                return .admitted(principal: "dataguard:api-key#\(index + 1)", address: address)
            }
        }
        let bearer = Self.bearer(request.headers)
        if let bearer, let index = Self.match(bearer, in: credentials.bearerTokens) {
            return .admitted(principal: "dataguard:bearer#\(index + 1)", address: address)
        }
        let invalid = !presented.isEmpty || bearer != nil
        let what = invalid ? "invalid or expired credentials" : "missing credentials (\(credentials.keyName) or Authorization: Bearer)"
        return .refused(Self.unauthorized(what, invalid: invalid))
    }

    /// Constant-time match against every configured secret (no early exit).
    static func match(_ presented: String, in secrets: [String]) -> Int? {
        var found: Int?
        for (index, secret) in secrets.enumerated() where Secrets.constantTimeEquals(presented, secret) {
            if found == nil { found = index }
        }
        return found
    }

    static func bearer(_ headers: HTTPFields) -> String? {
        guard let value = headers[.authorization] else { return nil }
        let parts = value.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else { return nil }
        let token = parts[1].trimmingHTTPWhitespace
        return token.isEmpty ? nil : String(token)
    }

    static func unauthorized(_ message: String, invalid: Bool) -> Response {
        let challenge = invalid
            ? #"Bearer realm="consent-sync", error="invalid_token""#
            : #"Bearer realm="consent-sync""#
        return JSONResponse.problem(.unauthorized, "unauthorized", message, headers: [.wwwAuthenticate: challenge])
    }
}

/// Tokens this instance validated recently (bounded). A revocation empties it at once through
/// `RevocationListener`; should that notification be missed (no database connection), the TTL bounds
/// how long a revoked client's token is still accepted.
actor TokenCache {
    /// A token's SHA-256 digest: the token itself is never kept.
    struct Key: Hashable {
        let w0, w1, w2, w3: UInt64
    }

    private var entries: [Key: (clientID: String, until: ContinuousClock.Instant)] = [:]
    private let ttl: Duration

    init(ttl: Duration) { self.ttl = ttl }

    func lookup(_ token: String) -> String? {
        guard ttl > .zero else { return nil }
        let key = Self.key(token)
        guard let entry = entries[key] else { return nil }
        if entry.until < .now { entries[key] = nil; return nil }
        return entry.clientID
    }

    /// A revoked client's tokens are forgotten (the database refuses them from now on).
    func revoke(clientID: String) {
        entries = entries.filter { $0.value.clientID != clientID }
    }

    /// Forgets everything (revocations may have been missed).
    func clear() {
        entries.removeAll()
    }

    func store(_ token: String, clientID: String, expiresAt: Date) {
        guard ttl > .zero else { return }
        if entries.count > 10_000 { entries.removeAll() }
        let remaining = Duration.seconds(max(0, expiresAt.timeIntervalSinceNow))
        entries[Self.key(token)] = (clientID, .now + min(ttl, remaining))
    }

    static func key(_ token: String) -> Key {
        var hash = SHA256()
        var token = token
        token.withUTF8 { hash.update(bufferPointer: UnsafeRawBufferPointer($0)) }
        return hash.finalize().withUnsafeBytes { digest in
            Key(w0: digest.loadUnaligned(fromByteOffset: 0, as: UInt64.self),
                w1: digest.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
                w2: digest.loadUnaligned(fromByteOffset: 16, as: UInt64.self),
                w3: digest.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        }
    }
}

/// Verifies JWT bearer tokens against a JWKS (fetched, cached, refetched on an unknown key id).
actor JWTVerifier {
    struct Claims: JWTPayload {
        var sub: SubjectClaim?
        var iss: IssuerClaim?
        var aud: AudienceClaim?
        var exp: ExpirationClaim?
        var nbf: NotBeforeClaim?
        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }

    struct Rejected: Error, CustomStringConvertible {
        var description: String
    }

    /// The authorization server's keys could not be fetched: no verdict on the token.
    struct KeysUnavailable: Error, CustomStringConvertible {
        var description: String
    }

    let settings: AuthSettings.JWTSettings
    let logger: Logger
    private var keys: JWTKeyCollection?
    private var knownKeyIDs: Set<String> = []
    private var fetchedAt: ContinuousClock.Instant?
    /// The last failed fetch: another is tried 5 s later at the earliest, so that an unreachable
    /// authorization server does not cost every delivery a fetch timeout.
    private var failure: (at: ContinuousClock.Instant, reason: String)?

    init(settings: AuthSettings.JWTSettings, logger: Logger) {
        self.settings = settings
        self.logger = logger
    }

    /// The token's subject when it is valid.
    func verify(_ token: String) async throws -> String {
        var collection = try await currentKeys(refresh: false)
        // Signed with a key the loaded set lacks: the server has rotated its keys, so the JWKS is fetched
        // again (at most every 5 s). The key collection itself would quietly try its default key instead.
        let kid = Self.keyID(of: token)
        if let kid, !knownKeyIDs.contains(kid) {
            collection = try await currentKeys(refresh: true)
        }
        let claims: Claims
        do {
            claims = try await collection.verify(token, as: Claims.self)
        } catch let error as JWTError where kid == nil && error.errorType == .signatureVerificationFailed {
            // A token naming no key is checked with the set's key without `kid`, which may have been
            // replaced since the set was loaded: once more with a fresh set (same 5 s pause). The token
            // was already refused, so a fetch that fails leaves it refused (401), not unjudged (503).
            guard let fresh = try? await currentKeys(refresh: true), fresh !== collection,
                  let again = try? await fresh.verify(token, as: Claims.self) else {
                throw Rejected(description: "signature or format rejected (\(error.errorType))")
            }
            claims = again
        } catch let error as JWTError {
            throw Rejected(description: "signature or format rejected (\(error.errorType))")
        }
        let leeway = TimeInterval(settings.leewaySeconds)
        guard let exp = claims.exp else { throw Rejected(description: "no exp claim") }
        guard exp.value.addingTimeInterval(leeway) > Date() else { throw Rejected(description: "token expired") }
        if let nbf = claims.nbf, nbf.value.addingTimeInterval(-leeway) > Date() {
            throw Rejected(description: "token not yet valid")
        }
        if let issuer = settings.issuer, claims.iss?.value != issuer {
            throw Rejected(description: "wrong issuer")
        }
        if let audience = settings.audience, !(claims.aud?.value.contains(audience) ?? false) {
            throw Rejected(description: "wrong audience")
        }
        return claims.sub?.value ?? "unknown"
    }

    private func currentKeys(refresh: Bool) async throws -> JWTKeyCollection {
        if let keys, !refresh { return keys }
        if refresh, let keys, let fetchedAt, ContinuousClock.now - fetchedAt < .seconds(5) { return keys }
        if let failure, ContinuousClock.now - failure.at < .seconds(5) {
            throw KeysUnavailable(description: failure.reason)
        }
        do {
            let (collection, ids) = try await fetch()
            keys = collection
            knownKeyIDs = ids
            fetchedAt = .now
            failure = nil
            return collection
        } catch {
            let reason = "the JWKS at auth.jwt.jwks_url cannot be used: \(error)"
            failure = (.now, reason)
            logger.warning("JWKS fetch failed", metadata: ["reason": "\(error)"])
            throw KeysUnavailable(description: reason)
        }
    }

    /// The `kid` of a compact JWS's header, when it has one (the signature is checked afterwards).
    static func keyID(of token: String) -> String? {
        guard let header = token.split(separator: ".", maxSplits: 1).first, header.utf8.count <= 4096 else { return nil }
        var base64 = header.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        base64 += String(repeating: "=", count: (4 - base64.utf8.count % 4) % 4)
        struct Header: Decodable { var kid: String? }
        guard let data = Data(base64Encoded: base64) else { return nil }
        return (try? JSONDecoder().decode(Header.self, from: data))?.kid
    }

    private func fetch() async throws -> (JWTKeyCollection, Set<String>) {
        var request = HTTPClientRequest(url: settings.jwksURL)
        request.method = .GET
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(3))
        guard response.status == .ok else {
            throw Rejected(description: "it answered \(response.status.code)")
        }
        let body = try await response.body.collect(upTo: 1 << 20)
        let jwks = try JSONDecoder().decode(JWKS.self, from: Data(buffer: body))
        let collection = JWTKeyCollection()
        var ids: Set<String> = []
        for (index, var key) in jwks.keys.enumerated() {
            if let kid = key.keyIdentifier {
                ids.insert(kid.string)
                try await collection.add(jwk: key)
            } else {
                // A `kid` is optional in a JWKS: a key without one checks the tokens that name none.
                key.keyIdentifier = JWKIdentifier(string: "unnamed-\(index)")
                try await collection.add(jwk: key, isDefault: true)
            }
        }
        logger.info("JWKS loaded", metadata: ["keys": "\(jwks.keys.count)"])
        return (collection, ids)
    }
}
