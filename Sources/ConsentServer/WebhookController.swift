import ConsentCore
import ConsentStore
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import Metrics
import NIOCore

/// Receives webhook deliveries: admission (content type, size), decoding (pure), then the batched
/// apply path. Answers only after the delivery's transaction committed.
struct WebhookController: Sendable {
    typealias Decode = @Sendable (Data, Date) -> ChangeSet

    let ingestor: Ingestor
    let authenticator: Authenticator
    let maxBodyBytes: Int
    let logger: Logger

    /// Who a route admits.
    enum Caller: Sendable {
        case didomi
        case dataguard(DataGuardDecoder.Kind)
    }

    func addRoutes(to router: Router<AgentRequestContext>) {
        router.post("/webhooks/didomi") { request, context in
            await self.receive(endpoint: DidomiDecoder.endpoint, caller: .didomi, request: request, context: context,
                               decode: DidomiDecoder.decode)
        }
        for kind in DataGuardDecoder.Kind.allCases {
            router.post("/webhooks/dataguard/\(kind.rawValue)") { request, context in
                await self.receive(endpoint: kind.endpoint, caller: .dataguard(kind), request: request, context: context) {
                    body, receivedAt in
                    DataGuardDecoder.decode(kind, body, receivedAt: receivedAt)
                }
            }
        }
    }

    struct Accepted: Encodable {
        var status: String
        var delivery_id: Int64
        var reason: String?
    }

    func receive(
        endpoint: String, caller: Caller, request: Request, context: AgentRequestContext, decode: Decode
    ) async -> Response {
        let started = ContinuousClock.now
        let requestID = request.headers[.xRequestID] ?? UUID().uuidString.lowercased()
        // The request's log fields, passed with each line: setting them on the logger would re-render
        // the handler's metadata on every change.
        var metadata: Logger.Metadata = ["request_id": "\(requestID)", "endpoint": "\(endpoint)"]

        let admission: Authenticator.Admission
        switch caller {
        case .didomi: admission = await authenticator.admitDidomi(request, context)
        case .dataguard(let kind): admission = authenticator.admitDataGuard(kind, request, context)
        }
        let response: Response
        switch admission {
        case .refused(let refusal):
            count(endpoint, refusal.status == .forbidden ? "forbidden" : refusal.status == .unauthorized ? "unauthorized" : "unavailable")
            logger.notice("delivery refused at admission",
                          metadata: metadata.merging(["status": "\(refusal.status.code)"]) { $1 })
            response = refusal
        case .admitted(let principal, let address):
            metadata["principal"] = "\(principal)"
            response = await handle(endpoint: endpoint, request: request, principal: principal, address: address,
                                    requestID: requestID, decode: decode, metadata: &metadata)
        }
        let elapsed = ContinuousClock.now - started
        Timer(label: "consent_sync_delivery_duration_seconds", dimensions: [("endpoint", endpoint)])
            .recordNanoseconds(elapsed.nanoseconds)
        metadata["status"] = "\(response.status.code)"
        metadata["ms"] = "\(elapsed.milliseconds)"
        logger.info("delivery", metadata: metadata)
        var headers = response.headers
        headers[.xRequestID] = requestID
        return Response(status: response.status, headers: headers, body: response.body)
    }

    private func handle(
        endpoint: String, request: Request, principal: String, address: String?, requestID: String, decode: Decode,
        metadata: inout Logger.Metadata
    ) async -> Response {
        var request = request
        if let type = request.headers[.contentType], !Self.isJSON(type) {
            count(endpoint, "unsupported_media_type")
            return JSONResponse.problem(.unsupportedMediaType, "unsupported_media_type",
                                        "Content-Type must be application/json, got '\(type.prefix(100))'")
        }
        // A compressed body is not taken apart (neither platform compresses): say so, rather than call the
        // bytes invalid JSON.
        if let encoding = request.headers[.contentEncoding],
           !encoding.split(separator: ",").allSatisfy({ $0.trimmingHTTPWhitespace.lowercased() == "identity" }) {
            count(endpoint, "unsupported_media_type")
            return JSONResponse.problem(.unsupportedMediaType, "unsupported_media_type",
                                        "Content-Encoding '\(encoding.prefix(40))' is not supported: send the JSON body uncompressed")
        }
        let body: ByteBuffer
        do {
            body = try await request.collectBody(upTo: maxBodyBytes)
        } catch is NIOTooManyBytesError {
            count(endpoint, "too_large")
            return JSONResponse.problem(.contentTooLarge, "payload_too_large",
                                        "body is larger than the limit of \(maxBodyBytes) bytes")
        } catch {
            // The body ended before its Content-Length, or its chunks were malformed.
            count(endpoint, "bad_request")
            return JSONResponse.problem(.badRequest, "bad_request", "the body could not be read whole: \(error)")
        }

        let receivedAt = Date()
        var change = decode(Data(buffer: body), receivedAt)
        change.requestID = requestID
        change.remoteAddress = address
        change.principal = principal
        change.headers = RedactedHeaders.make(request.headers, secretNames: authenticator.settings.secretParameterNames)
        change.receivedAt = Timestamp.format(receivedAt)

        let result: ApplyResult
        do {
            result = try await ingestor.submit(PendingDelivery(change: change, body: body))
        } catch let kept as DeliveryKept {
            count(endpoint, "failed")
            logger.error("delivery kept as failed",
                         metadata: metadata.merging(["delivery_id": "\(kept.result.deliveryID)"]) { $1 })
            // PRODUCT §2: an authenticated delivery that cannot be applied is kept, and answered 400.
            return JSONResponse.problem(.badRequest, "not_applied",
                                        "the delivery could not be applied (\(kept.error.description.prefix(300))); kept for replay as delivery \(kept.result.deliveryID)",
                                        deliveryID: kept.result.deliveryID)
        } catch is Ingestor.Overloaded {
            count(endpoint, "overloaded")
            logger.warning("apply queue full, asking the sender to retry", metadata: metadata)
            return JSONResponse.problem(.serviceUnavailable, "overloaded",
                                        "too many deliveries in flight; retry later",
                                        headers: [.retryAfter: "1"])
        } catch {
            count(endpoint, "unavailable")
            logger.warning("database unavailable", metadata: metadata.merging(["error": "\(error)"]) { $1 })
            let unknown = (error as? DatabaseUnavailable)?.outcomeUnknown == true
            return JSONResponse.problem(.serviceUnavailable, "database_unavailable",
                                        unknown ? "the database did not answer in time; retry later (if the delivery was stored after all, the retry is answered duplicate)"
                                                : "the database is unavailable; nothing was stored, retry later",
                                        headers: [.retryAfter: "5"])
        }

        metadata["delivery_id"] = "\(result.deliveryID)"
        metadata["outcome"] = "\(result.outcome.rawValue)"
        count(endpoint, result.outcome.rawValue)
        switch result.outcome {
        case .failed:
            return JSONResponse.problem(.badRequest, "bad_request", result.reason ?? "the body cannot be applied",
                                        deliveryID: result.deliveryID)
        case .stored:
            logger.warning("delivery stored, not applied",
                           metadata: metadata.merging(["reason": "\(result.reason ?? "")"]) { $1 })
            return JSONResponse.make(.ok, Accepted(status: "stored", delivery_id: result.deliveryID, reason: result.reason))
        default:
            return JSONResponse.make(.ok, Accepted(status: result.outcome.rawValue, delivery_id: result.deliveryID,
                                                   reason: result.reason))
        }
    }

    private func count(_ endpoint: String, _ outcome: String) {
        Counter(label: "consent_sync_deliveries_total", dimensions: [("endpoint", endpoint), ("outcome", outcome)])
            .increment()
    }

    static func isJSON(_ contentType: String) -> Bool {
        let media = contentType.split(separator: ";").first.map { $0.trimmingHTTPWhitespace.lowercased() } ?? ""
        return media == "application/json" || (media.hasPrefix("application/") && media.hasSuffix("+json"))
    }
}

/// Request headers as stored with a delivery: credentials never leave the process.
enum RedactedHeaders {
    static let sensitive: Set<String> = ["authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"]

    static func make(_ fields: HTTPFields, secretNames: Set<String> = []) -> [String: String] {
        var headers: [String: String] = [:]
        for field in fields {
            let name = field.name.canonicalName
            let secret = sensitive.contains(name) || secretNames.contains(name) || name.contains("key") || name.contains("token")
                || name.contains("secret") || name.contains("signature")
            headers[name] = secret ? "[redacted]" : field.value
        }
        return headers
    }
}

extension Substring {
    /// Without leading and trailing optional whitespace of HTTP (space, tab); header values are ASCII
    /// framing around their tokens, so no Unicode-aware trimming is needed on the request path.
    var trimmingHTTPWhitespace: Substring {
        var text = self
        while let first = text.first, first == " " || first == "\t" { text.removeFirst() }
        while let last = text.last, last == " " || last == "\t" { text.removeLast() }
        return text
    }
}

extension HTTPField.Name {
    static let xRequestID = Self("X-Request-Id")!
}

extension Duration {
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
    var milliseconds: Double { Double(nanoseconds) / 1_000_000 }
}
