import HTTPTypes
import Hummingbird

/// Errors raised outside the handlers (no such path, a method a path does not take) answer with the same
/// JSON body as every other error: `{error, message}`. A path the agent serves, asked with a method it does not take, is `405` with `Allow` (the router itself
/// answers 404 for any method it has no handler for).
struct JSONErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    /// The methods each served path takes.
    var allowed: [String: [HTTPRequest.Method]] = [:]

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let error as HTTPError where error.status == .notFound {
            let path = request.uri.path
            guard let methods = allowed[path], !methods.contains(request.method) else { return Self.problem(error, request) }
            var headers = HTTPFields()
            headers[.allow] = methods.map(\.rawValue).joined(separator: ", ")
            return Self.problem(HTTPError(.methodNotAllowed, headers: headers), request)
        } catch let error as HTTPError {
            return Self.problem(error, request)
        }
    }

    private static func problem(_ error: HTTPError, _ request: Request) -> Response {
        let code = error.status.reasonPhrase.lowercased().replacingOccurrences(of: " ", with: "_")
        let message: String
        switch error.status {
        case .notFound: message = "no route for \(request.method) \(request.uri.path)"
        case .methodNotAllowed: message = "\(request.method) is not allowed on \(request.uri.path)"
        default: message = error.body ?? error.status.reasonPhrase
        }
        return JSONResponse.problem(error.status, code, message, headers: error.headers)
    }
}
