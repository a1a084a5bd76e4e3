import HTTPTypes
import Hummingbird

/// Errors raised outside the handlers (no such path, a method a path does not take) answer with the same
/// JSON body as every other error: `{error, message}`.
struct JSONErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let error as HTTPError {
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
}
