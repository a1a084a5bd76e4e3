import AsyncHTTPClient
import ConsentCore
import Foundation
import Logging
import NIOCore
import NIOHTTP1

/// HTTP with retries: 429 and 503 honour `Retry-After`; other 5xx and transport errors back off
/// exponentially; after `attempts` the last failure is thrown.
struct Fetcher: Sendable {
    var attempts = 6
    var maxWait: Duration = .seconds(60)
    let logger: Logger

    struct Reply: Sendable {
        var status: Int
        var body: ByteBuffer
    }

    func send(_ make: @Sendable () -> HTTPClientRequest) async throws -> Reply {
        var delay: Duration = .milliseconds(200)
        var lastError = "no attempt"
        for attempt in 1...attempts {
            do {
                let response = try await HTTPClient.shared.execute(make(), timeout: .seconds(60))
                let body = try await response.body.collect(upTo: 64 << 20)
                let status = Int(response.status.code)
                if status == 429 || status >= 500 {
                    lastError = "HTTP \(status)"
                    var wait = delay
                    if let header = response.headers.first(name: "Retry-After"), let seconds = Int(header) {
                        wait = .seconds(seconds)
                    }
                    logger.warning("snapshot source answered \(status); retrying", metadata: ["attempt": "\(attempt)", "wait": "\(wait)"])
                    try await Task.sleep(for: min(wait, maxWait))
                    delay = min(delay * 2, .seconds(10))
                    continue
                }
                return Reply(status: status, body: body)
            } catch let error as HTTPClientError {
                lastError = "\(error)"
                logger.warning("snapshot source unreachable; retrying", metadata: ["attempt": "\(attempt)", "error": "\(error)"])
                try await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(10))
            }
        }
        throw SnapshotError("snapshot source failed after \(attempts) attempts: \(lastError)")
    }
}

/// Didomi Consents API: `POST /sessions` (key + secret → token), then `GET /consents/users` in cursor
/// pages for every configured regulation.
public struct DidomiAPISource: SnapshotSource {
    public struct Settings: Sendable {
        public var baseURL = "https://api.didomi.io/v1"
        public var organizationID: String
        public var apiKey: String
        public var apiSecret: String
        public var regulations = ["gdpr"]
        public var pageSize = 100

        public init(organizationID: String, apiKey: String, apiSecret: String) {
            self.organizationID = organizationID
            self.apiKey = apiKey
            self.apiSecret = apiSecret
        }
    }

    public let settings: Settings
    public let snapshotTime: Date
    public var writtenBefore: Date? { snapshotTime }
    let fetcher: Fetcher
    public var name: String { "didomi-api" }

    public init(settings: Settings, logger: Logger) {
        self.settings = settings
        self.snapshotTime = Date()
        self.fetcher = Fetcher(logger: logger)
    }

    func session() async throws -> String {
        let payload = try JSONSerialization.data(withJSONObject: ["type": "api-key", "key": settings.apiKey, "secret": settings.apiSecret])
        let url = settings.baseURL + "/sessions"
        let reply = try await fetcher.send {
            var request = HTTPClientRequest(url: url)
            request.method = .POST
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: payload))
            return request
        }
        guard reply.status == 200 || reply.status == 201,
              let object = try? JSONSerialization.jsonObject(with: Data(buffer: reply.body)) as? [String: Any],
              let token = object["access_token"] as? String else {
            throw SnapshotError("Didomi session refused (HTTP \(reply.status)): check the API key and secret")
        }
        return token
    }

    public func read(_ consume: ([ChangeSet]) async throws -> Void) async throws {
        var token = try await session()
        for regulation in settings.regulations {
            var cursor: String?
            repeat {
                var components = URLComponents(string: settings.baseURL + "/consents/users")!
                var query = [URLQueryItem(name: "organization_id", value: settings.organizationID),
                             URLQueryItem(name: "regulation", value: regulation),
                             URLQueryItem(name: "$limit", value: String(settings.pageSize))]
                if let cursor { query.append(URLQueryItem(name: "$cursor", value: cursor)) }
                components.queryItems = query
                let url = components.url!.absoluteString
                var reply = try await get(url, token: token)
                if reply.status == 401 {  // the session expired during a long scan
                    token = try await session()
                    reply = try await get(url, token: token)
                }
                guard reply.status == 200 else { throw SnapshotError("Didomi GET /consents/users answered HTTP \(reply.status)") }
                let page = try parsePage(reply.body, what: "Didomi GET /consents/users")
                guard case .array(let users)? = page["data"] else {
                    throw SnapshotError("Didomi GET /consents/users: no 'data' array in the page")
                }
                let batch = try users.enumerated().map { index, user in
                    do { return try DidomiDecoder.apiUser(user, regulation: regulation) } catch let error as PayloadError {
                        throw SnapshotError("Didomi user \(index) of a page: \(error.message)")
                    }
                }
                if !batch.isEmpty { try await consume(batch) }
                if case .string(let next)? = page["cursor"], !next.isEmpty, !users.isEmpty { cursor = next } else { cursor = nil }
            } while cursor != nil
        }
    }

    private func get(_ url: String, token: String) async throws -> Fetcher.Reply {
        try await fetcher.send {
            var request = HTTPClientRequest(url: url)
            request.headers.add(name: "Authorization", value: "Bearer \(token)")
            return request
        }
    }
}

/// DataGuard "Permissions and Preferences Store": limit/offset pages of at most 100,
/// `includeTotal=false`, `X-API-Key`. The path is configurable (the public docs do not show it).
public struct DataGuardAPISource: SnapshotSource {
    public struct Settings: Sendable {
        public var baseURL = "https://api.consentric.io"
        public var path = "/v1/permissions/store"
        public var applicationID: String
        public var apiKey: String
        public var pageSize = 100

        public init(applicationID: String, apiKey: String) {
            self.applicationID = applicationID
            self.apiKey = apiKey
        }
    }

    public let settings: Settings
    public let snapshotTime: Date
    public var writtenBefore: Date? { snapshotTime }
    let fetcher: Fetcher
    public var name: String { "dataguard-api" }

    public init(settings: Settings, logger: Logger) {
        self.settings = settings
        self.snapshotTime = Date()
        self.fetcher = Fetcher(logger: logger)
    }

    public func read(_ consume: ([ChangeSet]) async throws -> Void) async throws {
        var offset = 0
        let limit = min(100, max(1, settings.pageSize))
        while true {
            var components = URLComponents(string: settings.baseURL + settings.path)!
            components.queryItems = [URLQueryItem(name: "applicationId", value: settings.applicationID),
                                     URLQueryItem(name: "limit", value: String(limit)),
                                     URLQueryItem(name: "offset", value: String(offset)),
                                     URLQueryItem(name: "includeTotal", value: "false")]
            let url = components.url!.absoluteString
            let key = settings.apiKey
            let reply = try await fetcher.send {
                var request = HTTPClientRequest(url: url)
                request.headers.add(name: "X-API-Key", value: key)
                return request
            }
            guard reply.status == 200 else { throw SnapshotError("DataGuard store answered HTTP \(reply.status)") }
            let page = try parsePage(reply.body, what: "DataGuard store page")
            let items: [JSONValue]
            switch page {
            case .array(let elements): items = elements
            case .object(let members):
                guard case .array(let elements)? = members["data"] ?? members["items"] ?? members["results"] else {
                    throw SnapshotError("DataGuard store page has no data/items array")
                }
                items = elements
            default: throw SnapshotError("DataGuard store page is not JSON array or object")
            }
            let batch = try items.map { item -> ChangeSet in
                var item = item
                if case .object(var members) = item, members["applicationId"] == nil {
                    members["applicationId"] = .string(settings.applicationID)
                    item = .object(members)
                }
                do { return try DataGuardDecoder.effectivePermissions(item) } catch let error as PayloadError {
                    throw SnapshotError("DataGuard store item at offset \(offset): \(error.message)")
                }
            }
            if !batch.isEmpty { try await consume(batch) }
            if items.count < limit { return }
            offset += items.count
        }
    }
}

/// A page of an API reply, parsed in place; a syntax error names the request.
func parsePage(_ body: ByteBuffer, what: String) throws -> JSONValue {
    do {
        return try body.withUnsafeReadableBytes { try JSONParser.parse($0) }
    } catch let error as PayloadError {
        throw SnapshotError("\(what): \(error.message)")
    }
}
