import Hummingbird
import Logging
import NIOCore

/// Per-request context: the caller's address and a request id for the logs.
public struct AgentRequestContext: RequestContext, RemoteAddressRequestContext {
    public var coreContext: CoreRequestContextStorage
    public let remoteAddress: SocketAddress?

    public init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.remoteAddress = source.channel.remoteAddress
    }

    /// Bodies are collected explicitly with the configured limit.
    public var maxUploadSize: Int { 64 << 20 }
}
