import ConsentCore
import Metrics
import Prometheus

/// The agent's Prometheus metrics (PRODUCT §7). Every series a dashboard or an alert expects exists from
/// the first scrape, at zero, rather than appearing with the first delivery or the first reconciliation.
public enum AgentMetrics {
    /// Batch sizes are small integers up to `ingest.max_batch`: powers of two, not the default buckets
    /// (which start at 5 and would put every batch of 1 to 4 in one bucket).
    public static let batchSizeBuckets: [Double] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]

    /// Drift kinds of a reconciliation run (consent.reconciliation_drift.kind).
    public static let driftKinds = ["user_missing_here", "user_missing_at_source", "consent_missing",
                                    "consent_extra", "consent_different", "preference_different"]

    /// The webhook endpoints, as the `endpoint` label names them.
    static let endpoints = [DidomiDecoder.endpoint] + DataGuardDecoder.Kind.allCases.map(\.endpoint)

    /// Delivery outcomes counted on every endpoint from the start (refusals appear when they happen).
    static let outcomes = ["applied", "duplicate", "stale", "stored", "failed"]

    /// A metrics factory writing to `registry`, with the agent's histogram buckets.
    public static func factory(registry: PrometheusCollectorRegistry) -> PrometheusMetricsFactory {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.valueHistogramBuckets["consent_sync_apply_batch_size"] = batchSizeBuckets
        return factory
    }

    /// Creates the per-endpoint series at zero.
    static func registerDeliverySeries() {
        for endpoint in endpoints {
            _ = Timer(label: "consent_sync_delivery_duration_seconds", dimensions: [("endpoint", endpoint)])
            for outcome in outcomes {
                _ = Counter(label: "consent_sync_deliveries_total", dimensions: [("endpoint", endpoint), ("outcome", outcome)])
            }
        }
    }
}
