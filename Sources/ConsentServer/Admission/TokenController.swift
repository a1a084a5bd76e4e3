import ConsentStore
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore

/// `POST /oauth/token`: the OAuth 2.0 client-credentials grant (RFC 6749 §4.4) for callers that fetch
/// a token from us before posting (Didomi). Client authentication by HTTP Basic or by body fields;
/// form-encoded or JSON bodies; errors as RFC 6749 §5.2.
struct TokenController: Sendable {
    let oauth: OAuthRepository
    let authenticator: Authenticator
    let lifetime: Int
    let logger: Logger

    struct Issued: Encodable {
        var access_token: String
        var token_type = "Bearer"
        var expires_in: Int
    }

    /// RFC 6749 §5.2 fields, plus `message` like every other error body of the agent.
    struct OAuthError: Encodable {
        var error: String
        var error_description: String
        var message: String
    }

    func addRoutes(to router: Router<AgentRequestContext>) {
        router.post("/oauth/token") { request, context in
            await self.token(request, context)
        }
    }

    static let noStore: HTTPFields = [.cacheControl: "no-store", .pragma: "no-cache"]

    /// RFC 6749 §5.2: a 401 (invalid_client) always carries the Basic challenge.
    func failure(_ status: HTTPResponse.Status, _ code: String, _ description: String) -> Response {
        var headers = Self.noStore
        if status == .unauthorized {
            headers[.wwwAuthenticate] = #"Basic realm="consent-sync""#
        }
        return JSONResponse.make(status, OAuthError(error: code, error_description: description, message: description), headers: headers)
    }

    func token(_ request: Request, _ context: AgentRequestContext) async -> Response {
        if let refusal = authenticator.checkAddress(authenticator.settings.didomiAllow, request, context) { return refusal }
        var request = request
        let body: ByteBuffer
        do {
            body = try await request.collectBody(upTo: 16 << 10)
        } catch is NIOTooManyBytesError {
            return failure(.contentTooLarge, "invalid_request", "request body over 16 KiB")
        } catch {
            return failure(.badRequest, "invalid_request", "the request body could not be read whole")
        }
        let fields: [String: String]
        let type = request.headers[.contentType]?.lowercased() ?? ""
        if type.hasPrefix("application/json") {
            guard let object = try? JSONSerialization.jsonObject(with: Data(buffer: body)) as? [String: Any] else {
                return failure(.badRequest, "invalid_request", "body is not a JSON object")
            }
            fields = object.compactMapValues { $0 as? String }
        } else if type.isEmpty || type.hasPrefix("application/x-www-form-urlencoded") {
            guard let form = Self.parseForm(String(buffer: body)) else {
                return failure(.badRequest, "invalid_request", "a parameter is given more than once")
            }
            fields = form
        } else {
            return failure(.unsupportedMediaType, "invalid_request",
                           "Content-Type \(type) is not accepted: use application/x-www-form-urlencoded or application/json")
        }

        guard let grant = fields["grant_type"] else {
            return failure(.badRequest, "invalid_request", "grant_type is missing")
        }
        guard grant == "client_credentials" else {
            return failure(.badRequest, "unsupported_grant_type", "only client_credentials is supported")
        }

        let basic = Self.basicCredentials(request.headers)
        let bodyCredentials = fields["client_id"].map { ($0, fields["client_secret"] ?? "") }
        if basic != nil, fields["client_secret"] != nil {
            return failure(.badRequest, "invalid_request", "use one client authentication method, not two")
        }
        guard let (clientID, secret) = basic ?? bodyCredentials, !clientID.isEmpty else {
            return failure(.unauthorized, "invalid_client", "client authentication is missing")
        }
        // No client id or secret holds a NUL (PostgreSQL text cannot): such a pair is simply wrong.
        guard !clientID.utf8.contains(0), !secret.utf8.contains(0) else {
            return failure(.unauthorized, "invalid_client", "client authentication failed")
        }
        do {
            guard try await oauth.authenticate(clientID: clientID, secret: secret) else {
                logger.notice("token refused: client authentication failed", metadata: ["client_id": "\(clientID)"])
                return failure(.unauthorized, "invalid_client", "client authentication failed")
            }
            let token = try await oauth.issueToken(clientID: clientID, lifetime: lifetime)
            logger.info("token issued", metadata: ["client_id": "\(clientID)"])
            return JSONResponse.make(.ok, Issued(access_token: token, expires_in: lifetime), headers: Self.noStore)
        } catch {
            return JSONResponse.problem(.serviceUnavailable, "temporarily_unavailable",
                                        "the database is unavailable; retry later", headers: [.retryAfter: "5"])
        }
    }

    /// `Authorization: Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 §2.3.1).
    static func basicCredentials(_ headers: HTTPFields) -> (String, String)? {
        guard let value = headers[.authorization] else { return nil }
        let parts = value.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "basic",
              let decoded = Data(base64Encoded: String(parts[1]).trimmingCharacters(in: .whitespaces)),
              let text = String(data: decoded, encoding: .utf8),
              let colon = text.firstIndex(of: ":") else { return nil }
        let id = String(text[..<colon]).removingPercentEncoding ?? String(text[..<colon])
        let secretPart = String(text[text.index(after: colon)...])
        return (id, secretPart.removingPercentEncoding ?? secretPart)
    }

    /// The fields of a form body; nil when one is given twice (RFC 6749 §3.2: parameters must not be
    /// included more than once).
    static func parseForm(_ text: String) -> [String: String]? {
        var fields: [String: String] = [:]
        for pair in text.split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1).map {
                String($0).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? String($0)
            }
            guard let key = kv.first else { continue }
            if fields.updateValue(kv.count > 1 ? kv[1] : "", forKey: key) != nil { return nil }
        }
        return fields
    }
}

extension HTTPField.Name {
    static let pragma = Self("Pragma")!
}
