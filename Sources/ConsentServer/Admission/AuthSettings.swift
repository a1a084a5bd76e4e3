import ConsentCore
import Foundation

/// Who may call which endpoint (PRODUCT §3). Secrets are held here only; they are never logged.
public struct AuthSettings: Sendable {
    /// Development only: no credentials checked (logged as a warning at every start).
    public var disabled = false
    /// Lifetime of the access tokens `POST /oauth/token` issues.
    public var tokenLifetime = 3600
    /// How long one instance trusts a token it already validated (bounds how late a revocation bites).
    public var tokenCacheSeconds = 5
    /// Optional: JWT bearer tokens from the company's own authorization server (Didomi endpoint).
    public var jwt: JWTSettings?
    /// DataGuard credentials per endpoint.
    public var dataguard: [DataGuardDecoder.Kind: DataGuardCredentials] =
        Dictionary(uniqueKeysWithValues: DataGuardDecoder.Kind.allCases.map { ($0, DataGuardCredentials()) })
    /// Didomi's allowlist (empty = any address); it also covers /oauth/token. DataGuard's are per
    /// endpoint, in `dataguard`.
    public var didomiAllow: [IPNetwork] = []
    /// Peers whose X-Forwarded-For / Forwarded headers are believed.
    public var trustedProxies: [IPNetwork] = []

    public init() {}

    public struct JWTSettings: Sendable {
        public var jwksURL: String
        public var issuer: String?
        public var audience: String?
        public var leewaySeconds: Int = 60

        public init(jwksURL: String, issuer: String?, audience: String?, leewaySeconds: Int = 60) {
            self.jwksURL = jwksURL
            self.issuer = issuer
            self.audience = audience
            self.leewaySeconds = leewaySeconds
        }
    }

    public struct DataGuardCredentials: Sendable {
        public enum Location: String, Sendable { case header, query, both }
        /// Header or query parameter name carrying the API key.
        public var keyName = "X-API-Key"
        public var keyLocation: Location = .both
        /// Valid API keys (several at once, for rotation).
        public var apiKeys: [String] = []
        /// Valid static bearer tokens.
        public var bearerTokens: [String] = []
        /// Addresses allowed to call this endpoint (empty = any).
        public var allow: [IPNetwork] = []

        public init() {}

        public var isConfigured: Bool { !apiKeys.isEmpty || !bearerTokens.isEmpty }
    }

    /// Names of the headers/query parameters that carry DataGuard keys (redacted wherever they appear).
    public var secretParameterNames: Set<String> {
        Set(dataguard.values.map { $0.keyName.lowercased() })
    }
}
