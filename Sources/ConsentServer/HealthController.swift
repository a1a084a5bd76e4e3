import ConsentStore
import Hummingbird
import Logging
import NIOCore
import Prometheus

/// `/healthz` (alive), `/readyz` (database reachable, migrations current), `/metrics` (Prometheus).
struct HealthController: Sendable {
    let store: ConsentStore
    let migrator: Migrator
    let registry: PrometheusCollectorRegistry?

    struct Status: Encodable {
        var status: String
    }

    func addRoutes(to router: Router<AgentRequestContext>) {
        router.get("/healthz") { _, _ in
            JSONResponse.make(.ok, Status(status: "ok"))
        }
        router.get("/readyz") { _, _ in
            do {
                try await store.ping()
            } catch {
                return JSONResponse.problem(.serviceUnavailable, "database_unavailable", "database unreachable: \(error)",
                                            headers: [.retryAfter: "5"])
            }
            do {
                let pending = try await migrator.pending(client: store.client, logger: store.logger)
                guard pending.isEmpty else {
                    return JSONResponse.problem(.serviceUnavailable, "migrations_pending",
                                                "migrations not applied: \(pending.map(\.name).joined(separator: ", ")); run consent-sync migrate")
                }
            } catch {
                return JSONResponse.problem(.serviceUnavailable, "migrations_unknown", "cannot check migrations: \(error)")
            }
            return JSONResponse.make(.ok, Status(status: "ready"))
        }
        if let registry {
            router.get("/metrics") { _, _ in
                Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                         body: .init(byteBuffer: ByteBuffer(bytes: registry.emitToBuffer())))
            }
        }
    }
}
