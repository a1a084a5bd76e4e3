import ConsentCore
import ConsentStore
import Foundation
import Hummingbird
import Logging
import PostgresNIO
import Prometheus
import ServiceLifecycle

/// Wires the agent: the PostgreSQL pool, the batched apply path and the HTTP routes.
public enum Agent {
    /// The parts `buildApplication` needs that the caller owns (so that tests can share a database).
    public struct Dependencies: Sendable {
        public var client: PostgresClient
        public var migrator: Migrator
        public var registry: PrometheusCollectorRegistry?

        public init(client: PostgresClient, migrator: Migrator, registry: PrometheusCollectorRegistry?) {
            self.client = client
            self.migrator = migrator
            self.registry = registry
        }
    }

    /// Builds the HTTP application. Its service group runs the pool and the ingestor; shutdown stops
    /// accepting first, then drains the queued deliveries, then closes the pool.
    public static func buildApplication(
        configuration: AgentConfiguration, dependencies: Dependencies, logger: Logger,
        onServerRunning: @escaping @Sendable (any Channel) async -> Void = { _ in }
    ) -> some ApplicationProtocol {
        let store = ConsentStore(client: dependencies.client, logger: logger, timeout: configuration.applyTimeout)
        var ingest = configuration.ingest
        ingest.batchDeadline = configuration.applyTimeout + configuration.answerTimeout
        let ingestor = Ingestor(store: store, configuration: ingest, logger: logger)

        let oauth = OAuthRepository(client: dependencies.client, logger: logger, timeout: configuration.applyTimeout,
                                    answerTimeout: configuration.answerTimeout)
        let authenticator = Authenticator(settings: configuration.auth, oauth: oauth, logger: logger)

        let router = Router(context: AgentRequestContext.self)
        if dependencies.registry != nil { AgentMetrics.registerDeliverySeries() }
        var allowed: [String: [HTTPRequest.Method]] = ["/webhooks/didomi": [.post], "/oauth/token": [.post],
                                                       "/healthz": [.get, .head], "/readyz": [.get, .head]]
        for kind in DataGuardDecoder.Kind.allCases { allowed["/webhooks/dataguard/\(kind.rawValue)"] = [.post] }
        if dependencies.registry != nil { allowed["/metrics"] = [.get, .head] }
        router.add(middleware: JSONErrorMiddleware(allowed: allowed))
        WebhookController(ingestor: ingestor, authenticator: authenticator, maxBodyBytes: configuration.maxBodyBytes,
                          logger: logger)
            .addRoutes(to: router)
        TokenController(oauth: oauth, authenticator: authenticator, lifetime: configuration.auth.tokenLifetime,
                        logger: logger)
            .addRoutes(to: router)
        HealthController(store: store, migrator: dependencies.migrator, registry: dependencies.registry)
            .addRoutes(to: router)

        var services: [any Service] = [
            PostgresClientService(client: dependencies.client), ingestor,
            RetentionService(client: dependencies.client, settings: configuration.retention, logger: logger),
        ]
        if !configuration.auth.disabled, configuration.auth.tokenCacheSeconds > 0 {
            services.append(RevocationListener(client: dependencies.client, cache: authenticator.tokenCache, logger: logger))
        }
        return Application(
            router: router,
            server: .http1(configuration: .init(idleTimeout: .seconds(Int64(configuration.idleTimeoutSeconds)))),
            configuration: .init(address: .hostname(configuration.host, port: configuration.port),
                                 serverName: "consent-sync"),
            services: services,
            onServerRunning: onServerRunning,
            logger: logger
        )
    }

    /// Client configuration for a database URL, with the agent's pool settings.
    public static func clientConfiguration(url: String, configuration: AgentConfiguration) throws -> PostgresClient.Configuration {
        var config = try DatabaseURL.configuration(url)
        // The password kept apart (key, file, credential) completes a URL without one; a URL that
        // carries its own (DATABASE_URL overrides the configuration) keeps it.
        if config.password?.isEmpty ?? true, let password = configuration.databasePassword { config.password = password }
        config.options.maximumConnections = configuration.databaseMaxConnections
        config.options.connectTimeout = .seconds(2)
        // Bounds a statement that was sent (the wait for a connection is bounded separately).
        config.options.additionalStartupParameters = [
            ("statement_timeout", "\(ConsentStore.statementTimeout.components.seconds)s")
        ]
        return config
    }
}

/// Runs a `PostgresClient` in a service group (the pool must run before the first query).
public struct PostgresClientService: Service {
    public let client: PostgresClient
    public init(client: PostgresClient) { self.client = client }
    public func run() async throws {
        await cancelWhenGracefulShutdown { await client.run() }
    }
}
