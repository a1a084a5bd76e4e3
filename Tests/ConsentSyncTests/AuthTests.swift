import ConsentServer
import ConsentStore
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import JWTKit
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Testing

/// PRODUCT §3: who may call. Every refusal writes nothing.
@Suite("Authentication and admission")
struct AuthTests {
    static let body = Didomi.user(version: 1, updatedAt: "2025-03-01T00:00:00Z", purposes: #"[{"id":"a","enabled":true}]"#)

    static func enabled(_ configure: @escaping @Sendable (inout AgentConfiguration) -> Void = { _ in })
        -> @Sendable (inout AgentConfiguration) -> Void
    {
        { configuration in
            configuration.authDisabled = false
            configuration.auth.tokenCacheSeconds = 0
            configure(&configuration)
        }
    }

    func request(_ agent: AgentHarness, _ path: String, body: String, headers: HTTPFields) async throws -> AgentHarness.Reply {
        let response = try await agent.client.execute(uri: path, method: .post, headers: headers, body: ByteBuffer(string: body))
        let json = (try? JSONSerialization.jsonObject(with: Data(buffer: response.body))) as? [String: Any] ?? [:]
        return AgentHarness.Reply(status: response.status, headers: response.headers, json: json)
    }

    func createClient(_ agent: AgentHarness) async throws -> (String, String) {
        try await OAuthRepository(client: agent.db, logger: TestDatabase.logger).createClient(name: "didomi-test")
    }

    func token(_ agent: AgentHarness, id: String, secret: String, style: String = "basic") async throws -> AgentHarness.Reply {
        switch style {
        case "basic":
            let basic = Data("\(id):\(secret)".utf8).base64EncodedString()
            return try await request(agent, "/oauth/token", body: "grant_type=client_credentials",
                                     headers: [.authorization: "Basic \(basic)", .contentType: "application/x-www-form-urlencoded"])
        case "form":
            return try await request(agent, "/oauth/token", body: "grant_type=client_credentials&client_id=\(id)&client_secret=\(secret)",
                                     headers: [.contentType: "application/x-www-form-urlencoded"])
        default:
            return try await request(agent, "/oauth/token",
                                     body: #"{"grant_type": "client_credentials", "client_id": "\#(id)", "client_secret": "\#(secret)"}"#,
                                     headers: [.contentType: "application/json"])
        }
    }

    func postDidomi(_ agent: AgentHarness, bearer: String?, headers extra: HTTPFields = [:]) async throws -> AgentHarness.Reply {
        var headers: HTTPFields = [.contentType: "application/json"]
        if let bearer { headers[.authorization] = "Bearer \(bearer)" }
        headers.append(contentsOf: extra)
        return try await request(agent, "/webhooks/didomi", body: Self.body, headers: headers)
    }

    func deliveries(_ agent: AgentHarness) async throws -> Int {
        try await agent.count("select count(*)::int from consent.deliveries")
    }

    @Test("client credentials end to end: token by Basic, by form fields, by JSON; the webhook is applied")
    func clientCredentialsFlow() async throws {
        try await AgentHarness.run(configure: Self.enabled()) { agent in
            let (id, secret) = try await createClient(agent)
            for style in ["basic", "form", "json"] {
                let issued = try await token(agent, id: id, secret: secret, style: style)
                #expect(issued.status == .ok, "\(style): \(issued.json)")
                #expect(issued.json["token_type"] as? String == "Bearer")
                #expect((issued.json["expires_in"] as? Int) == 3600)
                #expect(issued.headers[.cacheControl] == "no-store")
                let token = try #require(issued.json["access_token"] as? String)
                let reply = try await postDidomi(agent, bearer: token)
                #expect(reply.status == .ok)
            }
            #expect(try await agent.consents(user: "u-1") == ["a": "granted"])
            let principal = try await agent.scalar("select auth_principal from consent.deliveries order by id limit 1", as: String.self)
            #expect(principal == "oauth:\(id)")
            // Only the hash of the secret and of the token is stored.
            let leaked = try await agent.count("""
                select count(*)::int from consent.oauth_clients where secret_hash like \("%" + secret + "%")
                """)
            #expect(leaked == 0)
        }
    }

    @Test("client secrets are stored as salted SHA-256; a client with an earlier PBKDF2 hash still gets tokens and is upgraded")
    func secretHashes() async throws {
        try await AgentHarness.run(configure: Self.enabled()) { agent in
            let (id, secret) = try await createClient(agent)
            let stored = try await agent.scalar("select secret_hash from consent.oauth_clients where client_id = \(id)", as: String.self)
            #expect(stored?.hasPrefix("sha256$") == true, "\(stored ?? "")")
            #expect(SecretHash.verify(secret, against: try #require(stored)))
            #expect(!SecretHash.verify(secret + "x", against: try #require(stored)))

            // A client created by an earlier version (PBKDF2-SHA512, 210,000 rounds).
            let legacySecret = Secrets.randomToken(32)
            let salt = Data("legacy-salt-1234".utf8)
            let legacy = "pbkdf2-sha512$210000$\(salt.base64EncodedString())$\(try SecretHash.pbkdf2(legacySecret, salt: salt, rounds: 210_000).base64EncodedString())"
            try await agent.db.query("""
                insert into consent.oauth_clients (client_id, name, secret_hash) values ('cs-legacy', 'old', \(legacy))
                """)
            #expect(try await token(agent, id: "cs-legacy", secret: "wrong").status == .unauthorized)
            #expect(try await agent.scalar("select secret_hash from consent.oauth_clients where client_id = 'cs-legacy'", as: String.self) == legacy)
            let issued = try await token(agent, id: "cs-legacy", secret: legacySecret)
            #expect(issued.status == .ok, "\(issued.json)")
            // Its hash is left as it is: an instance of the earlier version sharing the database (a rolling
            // upgrade) or a downgrade must still take this client's secret.
            #expect(try await agent.scalar("select secret_hash from consent.oauth_clients where client_id = 'cs-legacy'", as: String.self) == legacy)
            #expect(try await token(agent, id: "cs-legacy", secret: legacySecret).status == .ok)
            #expect(try await token(agent, id: "cs-unknown", secret: legacySecret).status == .unauthorized)
        }
    }

    @Test("token endpoint errors follow RFC 6749 §5.2")
    func tokenErrors() async throws {
        try await AgentHarness.run(configure: Self.enabled()) { agent in
            let (id, secret) = try await createClient(agent)
            let wrong = try await token(agent, id: id, secret: secret + "x")
            #expect(wrong.status == .unauthorized)
            #expect(wrong.json["error"] as? String == "invalid_client")
            #expect(wrong.headers[.wwwAuthenticate] != nil)
            #expect((wrong.json["message"] as? String)?.isEmpty == false)  // like every other error body
            let unknown = try await token(agent, id: "nobody", secret: secret, style: "form")
            #expect(unknown.json["error"] as? String == "invalid_client")
            let grant = try await request(agent, "/oauth/token", body: "grant_type=password&client_id=\(id)&client_secret=\(secret)",
                                          headers: [.contentType: "application/x-www-form-urlencoded"])
            #expect(grant.status == .badRequest)
            #expect(grant.json["error"] as? String == "unsupported_grant_type")
            let missing = try await request(agent, "/oauth/token", body: "client_id=\(id)", headers: [.contentType: "application/x-www-form-urlencoded"])
            #expect(missing.json["error"] as? String == "invalid_request")
            let xml = try await request(agent, "/oauth/token", body: "<grant/>", headers: [.contentType: "application/xml"])
            #expect(xml.status == .unsupportedMediaType)
            #expect(xml.json["error"] as? String == "invalid_request")
            #expect((xml.json["message"] as? String)?.contains("application/xml") == true, "\(xml.json)")
            let huge = try await request(agent, "/oauth/token", body: "grant_type=client_credentials&pad=" + String(repeating: "x", count: 20_000),
                                         headers: [.contentType: "application/x-www-form-urlencoded"])
            #expect(huge.status == .contentTooLarge)
            #expect(huge.json["error"] as? String == "invalid_request")
            // RFC 6749 §3.2: a parameter must not be given twice.
            let twice = try await request(agent, "/oauth/token",
                                          body: "grant_type=client_credentials&grant_type=client_credentials&client_id=\(id)&client_secret=\(secret)",
                                          headers: [.contentType: "application/x-www-form-urlencoded"])
            #expect(twice.status == .badRequest)
            #expect(twice.json["error"] as? String == "invalid_request")
            let nul = try await request(agent, "/oauth/token", body: "grant_type=client_credentials&client_id=\(id)%00&client_secret=\(secret)",
                                        headers: [.contentType: "application/x-www-form-urlencoded"])
            #expect(nul.status == .unauthorized)
            #expect(nul.json["error"] as? String == "invalid_client")
            #expect(try await agent.count("select count(*)::int from consent.oauth_tokens") == 0)
        }
    }

    @Test("no token, a wrong token, an expired token and a revoked client get 401 with WWW-Authenticate; nothing is written")
    func bearerRefusals() async throws {
        try await AgentHarness.run(configure: Self.enabled { $0.auth.tokenLifetime = 1 }) { agent in
            let (id, secret) = try await createClient(agent)
            let none = try await postDidomi(agent, bearer: nil)
            #expect(none.status == .unauthorized)
            #expect(none.headers[.wwwAuthenticate]?.hasPrefix("Bearer") == true)
            let garbage = try await postDidomi(agent, bearer: "not-a-token")
            #expect(garbage.status == .unauthorized)
            #expect(garbage.headers[.wwwAuthenticate]?.contains("invalid_token") == true)

            let expiring = try #require(try await token(agent, id: id, secret: secret).json["access_token"] as? String)
            try await Task.sleep(for: .milliseconds(1500))
            #expect(try await postDidomi(agent, bearer: expiring).status == .unauthorized)

            #expect(try await deliveries(agent) == 0)
        }
        try await AgentHarness.run(configure: Self.enabled()) { agent in
            let (id, secret) = try await createClient(agent)
            let valid = try #require(try await token(agent, id: id, secret: secret).json["access_token"] as? String)
            #expect(try await OAuthRepository(client: agent.db, logger: TestDatabase.logger).revokeClient(id))
            #expect(try await postDidomi(agent, bearer: valid).status == .unauthorized)
            #expect(try await token(agent, id: id, secret: secret).status == .unauthorized)
            #expect(try await deliveries(agent) == 0)
        }
    }

    @Test("revoking a client refuses its cached tokens at once, well within the cache lifetime (CLI or plain SQL)")
    func revocationReachesTheCache() async throws {
        try await AgentHarness.run(configure: Self.enabled { $0.auth.tokenCacheSeconds = 300 }) { agent in
            let repository = OAuthRepository(client: agent.db, logger: TestDatabase.logger)
            for how in ["repository", "sql"] {
                let (id, secret) = try await createClient(agent)
                let valid = try #require(try await token(agent, id: id, secret: secret).json["access_token"] as? String)
                // Accepted, and now cached for five minutes.
                #expect(try await postDidomi(agent, bearer: valid).status == .ok)
                #expect(try await postDidomi(agent, bearer: valid).status == .ok)

                if how == "repository" {
                    #expect(try await repository.revokeClient(id))
                } else {
                    try await agent.db.query("update consent.oauth_clients set revoked_at = now() where client_id = \(id)")
                }
                // The notification goes out at commit; allow it a moment to arrive, far below the TTL.
                let revokedAt = ContinuousClock.now
                var status = try await postDidomi(agent, bearer: valid).status
                while status == .ok, ContinuousClock.now - revokedAt < .seconds(2) {
                    try await Task.sleep(for: .milliseconds(20))
                    status = try await postDidomi(agent, bearer: valid).status
                }
                #expect(status == .unauthorized, "\(how): still accepted \(ContinuousClock.now - revokedAt) after revocation")
                #expect(try await postDidomi(agent, bearer: valid).status == .unauthorized, "\(how)")
            }
        }
    }

    @Test("stored deliveries keep the request headers with every credential redacted")
    func storedHeadersRedacted() async throws {
        let configure = Self.enabled {
            $0.auth.dataguard[.effectivePermissions]?.keyName = "X-Consent-Pass"
            $0.auth.dataguard[.effectivePermissions]?.apiKeys = ["dg-secret-4444"]
        }
        try await AgentHarness.run(configure: configure) { agent in
            let (id, secret) = try await createClient(agent)
            let token = try #require(try await token(agent, id: id, secret: secret).json["access_token"] as? String)
            let trace = HTTPField.Name("X-Trace-Id")!
            #expect(try await postDidomi(agent, bearer: token, headers: [trace: "trace-1"]).status == .ok)
            let body = DataGuard.body(permissions: [DataGuard.permission("o1", transaction: "t1", obtainedAt: "2025-03-01T00:00:00Z")],
                                      sentAt: "2025-03-01T00:00:05Z")
            #expect(try await request(agent, "/webhooks/dataguard/effective-permissions", body: body,
                                      headers: [.contentType: "application/json", HTTPField.Name("X-Consent-Pass")!: "dg-secret-4444",
                                                .cookie: "session=cookie-5555", trace: "trace-2"]).status == .ok)
            let rows = try await agent.db.query("""
                select endpoint, headers->>'authorization', headers->>'x-consent-pass', headers->>'cookie',
                       headers->>'x-trace-id', headers::text
                  from consent.deliveries order by id
                """).collect().map { try $0.decode((String, String?, String?, String?, String?, String).self) }
            #expect(rows.count == 2)
            #expect(rows.first?.1 == "[redacted]")
            #expect(rows.first?.4 == "trace-1")
            #expect(rows.last?.2 == "[redacted]")
            #expect(rows.last?.3 == "[redacted]")
            #expect(rows.last?.4 == "trace-2")
            for row in rows {
                for secretText in [token, "dg-secret-4444", "cookie-5555"] {
                    #expect(!row.5.contains(secretText), "\(row.0) stores a credential: \(row.5)")
                }
            }
        }
    }

    @Test("DataGuard: API key in a header or in the query (configurable name), several keys for rotation, static bearer")
    func dataGuardKeys() async throws {
        let configure = Self.enabled {
            $0.auth.dataguard[.effectivePermissions]?.keyName = "X-Consent-Key"
            $0.auth.dataguard[.effectivePermissions]?.apiKeys = ["old-key-1111", "new-key-2222"]
            $0.auth.dataguard[.effectivePermissions]?.bearerTokens = ["static-bearer-3333"]
        }
        try await AgentHarness.run(configure: configure) { agent in
            let path = "/webhooks/dataguard/effective-permissions"
            func body(_ n: Int) -> String {
                DataGuard.body(permissions: [DataGuard.permission("o\(n)", transaction: "t\(n)", obtainedAt: "2025-03-01T00:00:00Z")],
                               sentAt: "2025-03-01T00:00:05Z")
            }
            let header = HTTPField.Name("X-Consent-Key")!
            #expect(try await request(agent, path, body: body(1), headers: [.contentType: "application/json", header: "old-key-1111"]).status == .ok)
            #expect(try await request(agent, path, body: body(2), headers: [.contentType: "application/json", header: "new-key-2222"]).status == .ok)
            #expect(try await request(agent, path + "?X-Consent-Key=new-key-2222", body: body(3), headers: [.contentType: "application/json"]).status == .ok)
            #expect(try await request(agent, path, body: body(4), headers: [.contentType: "application/json", .authorization: "Bearer static-bearer-3333"]).status == .ok)
            let wrong = try await request(agent, path, body: body(5), headers: [.contentType: "application/json", header: "old-key-111"])
            #expect(wrong.status == .unauthorized)
            #expect(wrong.headers[.wwwAuthenticate] != nil)
            #expect(try await request(agent, path, body: body(6), headers: [.contentType: "application/json"]).status == .unauthorized)
            let badBearer = try await request(agent, path, body: body(8), headers: [.contentType: "application/json", .authorization: "Bearer expired-0000"])
            #expect(badBearer.status == .unauthorized)
            #expect(badBearer.headers[.wwwAuthenticate]?.contains(#"error="invalid_token""#) == true, "\(badBearer.headers)")
            // Another endpoint has no credentials configured: it refuses.
            #expect(try await request(agent, "/webhooks/dataguard/consent-receipts", body: body(7),
                                      headers: [.contentType: "application/json", header: "old-key-1111"]).status == .unauthorized)
            #expect(try await deliveries(agent) == 4)
            let stored = try await agent.db.query("select headers::text from consent.deliveries").collect().map { try $0.decode(String.self) }
            #expect(stored.allSatisfy { !$0.contains("key-1111") && !$0.contains("key-2222") && !$0.contains("bearer-3333") })
            let principals = try await agent.db.query("select auth_principal from consent.deliveries order by id").collect().map { try $0.decode(String.self) }
            #expect(principals == ["dataguard:api-key#1", "dataguard:api-key#2", "dataguard:api-key#2", "dataguard:bearer#1"])
        }
    }

    @Test("allowlists: 403 for other addresses; X-Forwarded-For counts only from a trusted proxy")
    func allowlists() async throws {
        try await AgentHarness.run(configure: Self.enabled {
            $0.auth.disabled = true
            $0.auth.didomiAllow = [IPNetwork("35.159.1.63")!]
        }) { agent in
            let direct = try await postDidomi(agent, bearer: nil)
            #expect(direct.status == .forbidden)
            #expect(direct.message?.contains("127.0.0.1") == true)
            let spoofed = try await postDidomi(agent, bearer: nil, headers: [HTTPField.Name("X-Forwarded-For")!: "35.159.1.63"])
            #expect(spoofed.status == .forbidden)
            #expect(try await deliveries(agent) == 0)
        }
        try await AgentHarness.run(configure: Self.enabled {
            $0.auth.disabled = true
            $0.auth.didomiAllow = [IPNetwork("35.159.1.63")!]
            $0.auth.trustedProxies = [IPNetwork("127.0.0.0/8")!]
        }) { agent in
            let proxied = try await postDidomi(agent, bearer: nil, headers: [HTTPField.Name("X-Forwarded-For")!: "35.159.1.63"])
            #expect(proxied.status == .ok)
            let forwarded = try await postDidomi(agent, bearer: nil, headers: [HTTPField.Name("Forwarded")!: "for=10.1.2.3"])
            #expect(forwarded.status == .forbidden)
            let stored = try await agent.scalar("select remote_addr from consent.deliveries", as: String.self)
            #expect(stored == "35.159.1.63")
        }
        // DataGuard's endpoints each have their own allowlist.
        try await AgentHarness.run(configure: Self.enabled {
            $0.auth.disabled = true
            $0.auth.dataguard[.effectivePermissions]?.allow = [IPNetwork("127.0.0.0/8")!]
            $0.auth.dataguard[.consentReceipts]?.allow = [IPNetwork("10.0.0.0/8")!]
        }) { agent in
            let body = DataGuard.body(permissions: [DataGuard.permission("o1", transaction: "t1", obtainedAt: "2025-03-01T00:00:00Z")],
                                      sentAt: "2025-03-01T00:00:05Z")
            let json: HTTPFields = [.contentType: "application/json"]
            #expect(try await request(agent, "/webhooks/dataguard/effective-permissions", body: body, headers: json).status == .ok)
            let refused = try await request(agent, "/webhooks/dataguard/consent-receipts", body: body, headers: json)
            #expect(refused.status == .forbidden)
            #expect(refused.message?.contains("127.0.0.1") == true)
            #expect(try await deliveries(agent) == 1)
        }
    }

    struct TestClaims: JWTPayload {
        var sub: SubjectClaim
        var iss: IssuerClaim
        var aud: AudienceClaim
        var exp: ExpirationClaim
        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }

    @Test("JWT bearer tokens from the company's authorization server: valid, expired, wrong audience, unknown key")
    func jwtBearer() async throws {
        let key = ES256PrivateKey()
        let signer = JWTKeyCollection()
        await signer.add(ecdsa: key, kid: "k1")
        let stranger = JWTKeyCollection()
        await stranger.add(ecdsa: ES256PrivateKey(), kid: "k2")
        let parameters = try #require(key.publicKey.parameters)
        let jwks = #"{"keys":[{"kty":"EC","crv":"P-256","alg":"ES256","kid":"k1","x":"\#(parameters.x)","y":"\#(parameters.y)"}]}"#

        try await StaticJSONServer.run(path: "/jwks", json: jwks) { url in
            try await AgentHarness.run(configure: Self.enabled {
                $0.auth.jwt = .init(jwksURL: url, issuer: "https://auth.example.com", audience: "consent-sync", leewaySeconds: 0)
            }) { agent in
                func token(_ keys: JWTKeyCollection, aud: String = "consent-sync", expiresIn: TimeInterval = 300) async throws -> String {
                    try await keys.sign(TestClaims(sub: "didomi", iss: "https://auth.example.com", aud: .init(value: [aud]),
                                                   exp: .init(value: Date().addingTimeInterval(expiresIn))))
                }
                let valid = try await postDidomi(agent, bearer: try await token(signer))
                let expired = try await postDidomi(agent, bearer: try await token(signer, expiresIn: -30))
                let audience = try await postDidomi(agent, bearer: try await token(signer, aud: "someone-else"))
                let unknownKey = try await postDidomi(agent, bearer: try await token(stranger))
                #expect(valid.status == .ok)
                #expect(expired.status == .unauthorized)
                #expect(audience.status == .unauthorized)
                #expect(unknownKey.status == .unauthorized)
                let count = try await deliveries(agent)
                #expect(count == 1)
                let principal = try await agent.scalar("select auth_principal from consent.deliveries", as: String.self)
                #expect(principal == "jwt:didomi")
            }
        }
        // The authorization server unreachable: no verdict on the token, so 503 + Retry-After (a 401
        // would send Didomi after a new token from the same unreachable server); nothing is stored.
        try await AgentHarness.run(configure: Self.enabled {
            $0.auth.jwt = .init(jwksURL: "http://127.0.0.1:1/jwks", issuer: nil, audience: nil)
        }) { agent in
            let bearer = try await signer.sign(TestClaims(sub: "didomi", iss: "https://auth.example.com", aud: .init(value: ["consent-sync"]),
                                                          exp: .init(value: Date().addingTimeInterval(300))))
            for _ in 0..<2 {
                let reply = try await postDidomi(agent, bearer: bearer)
                #expect(reply.status == .serviceUnavailable)
                #expect(reply.headers[.retryAfter] != nil)
                #expect(reply.message?.contains("auth.jwt.jwks_url") == true, "\(reply.json)")
            }
            #expect(try await deliveries(agent) == 0)
        }
    }

    @Test("JWT: a rotated signing key is fetched when a token names it; a key without kid checks tokens that name none")
    func jwtRotation() async throws {
        func jwk(_ key: ES256PrivateKey, kid: String?) throws -> String {
            let parameters = try #require(key.publicKey.parameters)
            let id = kid.map { #""kid":"\#($0)","# } ?? ""
            return #"{"kty":"EC","crv":"P-256","alg":"ES256",\#(id)"x":"\#(parameters.x)","y":"\#(parameters.y)"}"#
        }
        let old = ES256PrivateKey(), new = ES256PrivateKey(), plain = ES256PrivateKey()
        let oldSigner = JWTKeyCollection(), newSigner = JWTKeyCollection(), plainSigner = JWTKeyCollection()
        await oldSigner.add(ecdsa: old, kid: "2025-01")
        await newSigner.add(ecdsa: new, kid: "2025-02")
        await plainSigner.add(ecdsa: plain)
        let document = NIOLockedValueBox(#"{"keys":[\#(try jwk(old, kid: "2025-01"))]}"#)
        let rotated = #"{"keys":[\#(try jwk(old, kid: "2025-01")),\#(try jwk(new, kid: "2025-02")),\#(try jwk(plain, kid: nil))]}"#
        let plain2 = ES256PrivateKey(), plainSigner2 = JWTKeyCollection()
        await plainSigner2.add(ecdsa: plain2)
        let replaced = #"{"keys":[\#(try jwk(new, kid: "2025-02")),\#(try jwk(plain2, kid: nil))]}"#
        try await StaticJSONServer.run(path: "/jwks", document: document) { url in
            try await AgentHarness.run(configure: Self.enabled {
                $0.auth.jwt = .init(jwksURL: url, issuer: nil, audience: "consent-sync", leewaySeconds: 0)
            }) { agent in
                func token(_ keys: JWTKeyCollection, kid: String?) async throws -> String {
                    try await keys.sign(TestClaims(sub: "didomi", iss: "https://auth.example.com", aud: .init(value: ["consent-sync"]),
                                                   exp: .init(value: Date().addingTimeInterval(300))),
                                        kid: kid.map { JWKIdentifier(string: $0) })
                }
                #expect(try await postDidomi(agent, bearer: try await token(oldSigner, kid: "2025-01")).status == .ok)
                #expect(try await postDidomi(agent, bearer: try await token(newSigner, kid: "2025-02")).status == .unauthorized)
                // The server rotates: the next token names the new key (within the refetch pause the
                // loaded set stands, so the wait lets it pass).
                document.withLockedValue { $0 = rotated }
                try await Task.sleep(for: .seconds(5.5))
                #expect(try await postDidomi(agent, bearer: try await token(newSigner, kid: "2025-02")).status == .ok)
                #expect(try await postDidomi(agent, bearer: try await token(oldSigner, kid: "2025-01")).status == .ok)
                #expect(try await postDidomi(agent, bearer: try await token(plainSigner, kid: nil)).status == .ok)
                #expect(try await postDidomi(agent, bearer: try await token(newSigner, kid: nil)).status == .unauthorized)
                // Junk in the shape of a JWT is refused, never answered "retry later".
                #expect(try await postDidomi(agent, bearer: "a.b.c").status == .unauthorized)
                // The key without kid is replaced: a token naming no key fails on the loaded set, and is
                // checked once more against a fresh one.
                document.withLockedValue { $0 = replaced }
                try await Task.sleep(for: .seconds(5.5))
                #expect(try await postDidomi(agent, bearer: try await token(plainSigner2, kid: nil)).status == .ok)
            }
        }
    }

    @Test("no secret given to the server appears in its log output")
    func secretsNeverLogged() async throws {
        let (logger, capture) = RecordingLogHandler.logger()
        try await AgentHarness.run(configure: Self.enabled {
            $0.auth.dataguard[.consentReceipts]?.apiKeys = ["dg-secret-key-9876"]
            $0.auth.dataguard[.consentReceipts]?.bearerTokens = ["dg-secret-bearer-5432"]
        }, logger: logger) { agent in
            let (id, secret) = try await createClient(agent)
            let issued = try await token(agent, id: id, secret: secret)
            let access = try #require(issued.json["access_token"] as? String)
            _ = try await postDidomi(agent, bearer: access)
            _ = try await postDidomi(agent, bearer: access + "x")
            _ = try await token(agent, id: id, secret: "wrong-\(secret)")
            let body = DataGuard.body(permissions: [], sentAt: "2025-03-01T00:00:05Z")
            _ = try await request(agent, "/webhooks/dataguard/consent-receipts?X-API-Key=dg-secret-key-9876", body: body, headers: [.contentType: "application/json"])
            _ = try await request(agent, "/webhooks/dataguard/consent-receipts", body: body,
                                  headers: [.contentType: "application/json", .authorization: "Bearer dg-secret-bearer-5432"])
            let log = capture.text
            #expect(!log.isEmpty)
            for secretValue in [secret, access, "dg-secret-key-9876", "dg-secret-bearer-5432"] {
                #expect(!log.contains(secretValue), "a secret appears in the log")
            }
        }
    }
}

/// A tiny HTTP server answering one path with a JSON document (a JWKS endpoint for the tests).
enum StaticJSONServer {
    static func run(path: String, json: String, _ body: @escaping @Sendable (String) async throws -> Void) async throws {
        try await run(path: path, document: NIOLockedValueBox(json), body)
    }

    /// Answers whatever `document` holds at the time of each request (a JWKS that rotates).
    static func run(path: String, document: NIOLockedValueBox<String>,
                    _ body: @escaping @Sendable (String) async throws -> Void) async throws {
        let router = Router()
        router.get(RouterPath(path)) { _, _ in
            Response(status: .ok, headers: [.contentType: "application/json"],
                     body: .init(byteBuffer: ByteBuffer(string: document.withLockedValue { $0 })))
        }
        let app = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)),
                              logger: TestDatabase.logger)
        try await app.test(.live) { client in
            try await body("http://127.0.0.1:\(client.port!)\(path)")
        }
    }
}
