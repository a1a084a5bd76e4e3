import ConsentCore
import ConsentReconcile
import ConsentStore
import Foundation
import Logging
import Metrics
import NIOCore
import PostgresNIO
import ServiceLifecycle

/// Decodes a kept body again, by the endpoint that received it.
public enum Decoders {
    public static func decode(endpoint: String, body: Data, receivedAt: Date) -> ChangeSet? {
        if endpoint == DidomiDecoder.endpoint { return DidomiDecoder.decode(body, receivedAt: receivedAt) }
        for kind in DataGuardDecoder.Kind.allCases where kind.endpoint == endpoint {
            return DataGuardDecoder.decode(kind, body, receivedAt: receivedAt)
        }
        return nil
    }
}

/// `consent-sync replay`: re-applies kept deliveries (failed, or stored because a value was unknown)
/// with the current decoders. One that still cannot be applied stays kept, untouched.
public struct Replayer: Sendable {
    public struct Selection: Sendable {
        public var ids: [Int64] = []
        public var since: Date?
        public var until: Date?
        public init() {}
    }

    public struct Result: Sendable, Encodable {
        public var delivery_id: Int64
        public var endpoint: String
        public var outcome: String
        public var replayed_as: Int64?
        public var reason: String?
    }

    let store: ConsentStore

    public init(store: ConsentStore) { self.store = store }

    /// The deliveries kept for replay, as an SQL condition on consent.deliveries. The rule itself (failed
    /// ones, whatever their endpoint, and stored ones except citizen e-mails, which are stored for the
    /// mailer) lives in the database, where retention asks it too (sql/021).
    public static let kept = "consent.kept_for_replay(outcome, replayed_at, endpoint)"

    public func replay(_ selection: Selection) async throws -> [Result] {
        let ids = selection.ids
        let since = selection.since ?? Date(timeIntervalSince1970: 0)
        let until = selection.until ?? Date.distantFuture
        let rows = try await store.client.query("""
            select id, endpoint, body, received_at, coalesce(request_id, ''), coalesce(remote_addr, ''),
                   coalesce(auth_principal, '')
              from consent.deliveries
             where \(unescaped: Replayer.kept)
               and (cardinality(\(ids)::bigint[]) = 0 or id = any(\(ids)::bigint[]))
               and received_at >= \(since) and received_at < \(until)
             order by id
            """, logger: store.logger).collect()
        var results: [Result] = []
        for row in rows {
            let (id, endpoint, body, receivedAt, requestID, remote, principal) =
                try row.decode((Int64, String, ByteBuffer, Date, String, String, String).self)
            guard var change = Decoders.decode(endpoint: endpoint, body: Data(buffer: body), receivedAt: receivedAt) else {
                results.append(.init(delivery_id: id, endpoint: endpoint, outcome: "skipped", reason: "unknown endpoint"))
                continue
            }
            if change.action == .reject || change.action == .store {
                results.append(.init(delivery_id: id, endpoint: endpoint, outcome: "still_\(change.action == .reject ? "failed" : "stored")",
                                     reason: change.reason))
                continue
            }
            change.receivedAt = Timestamp.format(receivedAt)
            change.requestID = requestID.isEmpty ? nil : requestID
            change.remoteAddress = remote.isEmpty ? nil : remote
            change.principal = "replay:\(id)" + (principal.isEmpty ? "" : " of \(principal)")
            let applied = try await store.apply([PendingDelivery(change: change, body: body)])[0]
            if applied.outcome == .failed {
                results.append(.init(delivery_id: id, endpoint: endpoint, outcome: "still_failed", reason: applied.reason))
                continue
            }
            try await store.client.perform("""
                update consent.deliveries set replayed_at = now(), replayed_as = \(applied.deliveryID) where id = \(id)
                """, logger: store.logger)
            results.append(.init(delivery_id: id, endpoint: endpoint, outcome: applied.outcome.rawValue,
                                 replayed_as: applied.deliveryID, reason: applied.reason))
        }
        return results
    }
}

/// Periodic retention inside `serve` (and `consent-sync prune`).
public struct RetentionService: Service {
    public struct Settings: Sendable {
        /// Raw deliveries (and idempotency keys) older than this are removed; failed ones stay until replayed.
        public var deliveriesDays = 30
        /// History older than this is removed; nil = kept (the default: it is the audit trail).
        public var historyDays: Int?
        public var interval: Duration = .seconds(3600)
        public init() {}
    }

    let client: PostgresClient
    let settings: Settings
    let logger: Logger

    public init(client: PostgresClient, settings: Settings, logger: Logger) {
        self.client = client
        self.settings = settings
        self.logger = logger
    }

    /// One pass: prunes in chunks until nothing is left to prune. Returns the rows removed per kind.
    public static func prune(client: PostgresClient, settings: Settings, logger: Logger) async throws -> [String: Int64] {
        var totals: [String: Int64] = [:]
        let deliveries = "\(settings.deliveriesDays) days"
        let history = settings.historyDays.map { "\($0) days" }
        while true {
            var removed: Int64 = 0
            let rows = try await client.query(
                "select kind, removed from consent.prune(\(deliveries)::interval, \(history)::interval)", logger: logger)
            for try await (kind, count) in rows.decode((String, Int64).self) {
                totals[kind, default: 0] += count
                removed += count
            }
            if removed == 0 { return totals }
        }
    }

    public func run() async throws {
        try? await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                do {
                    let totals = try await Self.prune(client: client, settings: settings, logger: logger)
                    if totals.values.contains(where: { $0 > 0 }) {
                        logger.info("retention pruned", metadata: totals.mapValues { "\($0)" })
                    }
                } catch {
                    logger.warning("retention pass failed", metadata: ["error": "\(String(reflecting: error))"])
                }
                try await Task.sleep(for: settings.interval)
            }
        }
    }
}

/// `consent-sync status`: what is stored, recent failures, the last reconciliation.
public struct StatusReport: Sendable, Encodable {
    public struct Count: Sendable, Encodable {
        public var source: String
        public var users: Int64
        public var deleted_users: Int64
        public var consents: Int64
        public var preferences: Int64
    }

    public struct Kept: Sendable, Encodable {
        public var delivery_id: Int64
        public var received_at: Date
        public var endpoint: String
        public var outcome: String
        public var reason: String?
    }

    public var stored: [Count] = []
    public var deliveries_24h: [String: Int64] = [:]
    public var kept_not_replayed: Int64 = 0
    public var recent_kept: [Kept] = []
    public var last_reconciliation: String?

    public static func load(client: PostgresClient, logger: Logger) async throws -> StatusReport {
        var report = StatusReport()
        let counts = try await client.query("""
            select u.source, count(*)::bigint, count(u.deleted_at)::bigint,
                   (select count(*) from consent.consents c where c.source = u.source)::bigint,
                   (select count(*) from consent.preferences p where p.source = u.source)::bigint
              from consent.users u group by u.source order by u.source
            """, logger: logger)
        for try await (source, users, deleted, consents, preferences) in counts.decode((String, Int64, Int64, Int64, Int64).self) {
            report.stored.append(.init(source: source, users: users, deleted_users: deleted, consents: consents, preferences: preferences))
        }
        let outcomes = try await client.query("""
            select outcome, count(*)::bigint from consent.deliveries where received_at > now() - interval '24 hours' group by outcome
            """, logger: logger)
        for try await (outcome, count) in outcomes.decode((String, Int64).self) { report.deliveries_24h[outcome] = count }
        report.kept_not_replayed = try await client.query("""
            select count(*)::bigint from consent.deliveries
             where \(unescaped: Replayer.kept)
            """, logger: logger).collect().first?.decode(Int64.self) ?? 0
        let kept = try await client.query("""
            select id, received_at, endpoint, outcome, reason from consent.deliveries
             where \(unescaped: Replayer.kept)
             order by id desc limit 10
            """, logger: logger)
        for try await (id, at, endpoint, outcome, reason) in kept.decode((Int64, Date, String, String, String?).self) {
            report.recent_kept.append(.init(delivery_id: id, received_at: at, endpoint: endpoint, outcome: outcome, reason: reason))
        }
        // A run without an outcome is running while some session holds the reconciliation lock; else its
        // process ended before it finished (the next run records that).
        let lockHigh = Int64(Reconciler.lockKey >> 32), lockLow = Int64(Reconciler.lockKey & 0xffff_ffff)
        let runs = try await client.query("""
            select id, source, mode,
                   coalesce(outcome, case when exists (select 1 from pg_locks l
                                                        where l.locktype = 'advisory' and l.granted and l.objsubid = 1
                                                          and l.database = (select oid from pg_database where datname = current_database())
                                                          and l.classid::bigint = \(lockHigh) and l.objid::bigint = \(lockLow))
                                          then 'running' else 'interrupted' end),
                   started_at, drift_counts::text, error
              from consent.reconciliation_runs order by id desc limit 1
            """, logger: logger)
        for try await (id, source, mode, outcome, started, drift, error) in runs.decode((Int64, String, String, String, Date, String, String?).self) {
            report.last_reconciliation = "#\(id) \(source) \(mode) started \(started.formatted(.iso8601)): \(outcome), drift \(drift)"
                + (error.map { " (\($0))" } ?? "")
        }
        return report
    }
}
