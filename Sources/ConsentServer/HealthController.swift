import ConsentStore
import Foundation
import Metrics
import PostgresNIO
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

    /// Gauges read from the database at scrape time (so every instance reports the shared truth).
    func refreshDatabaseGauges() async {
        do {
            try await withAnsweringConnection(client: store.client, within: .milliseconds(500), answerWithin: .seconds(1),
                                              logger: store.logger) { connection in
                let kept = try await connection.query("""
                    select count(*)::bigint from consent.deliveries
                     where \(unescaped: Replayer.kept)
                    """, logger: store.logger).collect().first?.decode(Int64.self) ?? 0
                Gauge(label: "consent_sync_kept_deliveries").record(kept)
                let rows = try await connection.query("""
                    select coalesce(extract(epoch from finished_at), 0)::float8, drift_counts::text
                      from consent.reconciliation_runs where finished_at is not null order by id desc limit 1
                    """, logger: store.logger).collect()
                // No run yet: time 0 and no drift. Every kind is set on each scrape, so a kind the latest run
                // no longer found reads 0, not the count of an older run.
                var finished = 0.0
                var counts: [String: Int] = [:]
                if let row = rows.first {
                    let (time, drift) = try row.decode((Double, String?).self)
                    finished = time
                    counts = (try? JSONSerialization.jsonObject(with: Data((drift ?? "{}").utf8))) as? [String: Int] ?? [:]
                }
                Gauge(label: "consent_sync_last_reconciliation_timestamp_seconds").record(finished)
                for kind in Set(AgentMetrics.driftKinds).union(counts.keys) {
                    Gauge(label: "consent_sync_last_reconciliation_drift", dimensions: [("kind", kind)]).record(counts[kind, default: 0])
                }
            }
        } catch {
            store.logger.debug("metrics: database gauges not refreshed", metadata: ["error": "\(error)"])
        }
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
                await refreshDatabaseGauges()
                return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                         body: .init(byteBuffer: ByteBuffer(bytes: registry.emitToBuffer())))
            }
        }
    }
}
