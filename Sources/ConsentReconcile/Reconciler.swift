import ConsentCore
import ConsentStore
import Foundation
import Logging
import NIOCore
import PostgresNIO

#if canImport(Glibc)
import Glibc
#endif

/// `consent-sync reconcile`: streams a snapshot into staging (COPY), computes the drift in SQL,
/// repairs it unless asked only to check. One run at a time (a session-level advisory lock).
public struct Reconciler: Sendable {
    public struct Options: Sendable {
        /// Only report; change nothing.
        public var checkOnly = false
        /// Refuse to remove users missing at the source above this share of the stored users of the
        /// snapshot's tenants (a truncated API response must not wipe the table).
        public var maxRemovalShare = 0.05
        public init() {}
    }

    /// What a run found and did (printed, `--json`, and stored in consent.reconciliation_runs).
    public struct Report: Sendable, Encodable {
        public var run_id: Int64 = 0
        public var source: String
        public var mode: String
        public var snapshot_time: Date
        public var users_read: Int64 = 0
        /// Users whose snapshot carries a value this version does not know (a new DataGuard state, ...):
        /// their known items are compared and repaired, none of their stored items is removed.
        public var users_with_unknown_values: Int64 = 0
        public var complete = false
        public var drift: [String: Int64] = [:]
        public var repaired: [String: Int64] = [:]
        public var outcome = "error"
        public var error: String?
        public var seconds: Double = 0

        /// 0 in sync or repaired, 3 drift left (check), 1 error or refused.
        public var exitCode: Int32 {
            switch outcome {
            case "in_sync", "repaired": 0
            case "drift": 3
            default: 1
            }
        }
    }

    /// Another run holds the lock.
    public struct AlreadyRunning: Error, CustomStringConvertible {
        public var description: String { "another reconciliation is running (advisory lock held); not starting a second one" }
    }

    public static let lockKey: Int64 = 0x636f_6e73_656e_7402

    let client: PostgresClient
    let logger: Logger
    let progress: Progress

    public init(client: PostgresClient, logger: Logger, progressToTerminal: Bool = isatty(STDERR_FILENO) == 1) {
        self.client = client
        self.logger = logger
        self.progress = Progress(terminal: progressToTerminal, logger: logger)
    }

    public func run(_ source: some SnapshotSource, options: Options) async throws -> Report {
        let started = ContinuousClock.now
        var report = Report(source: source.name, mode: options.checkOnly ? "check" : "repair", snapshot_time: source.snapshotTime)
        let logger = self.logger
        let progress = self.progress
        report = try await client.withConnection { connection in
            var report = report
            let locked = try await connection.query("select pg_try_advisory_lock(\(Self.lockKey))", logger: logger)
                .collect().first?.decode(Bool.self) ?? false
            guard locked else { throw AlreadyRunning() }
            // Holding the lock, no other run is in progress: a run left without an outcome ended with its
            // process (killed, or stopped by systemd), and says so.
            try await connection.perform("""
                update consent.reconciliation_runs
                   set finished_at = coalesce(finished_at, now()), outcome = 'error',
                       error = 'interrupted: the process ended before the run finished'
                 where outcome is null
                """, logger: logger)
            // COPY names its table as one quoted identifier: stage into unqualified names via search_path.
            try await connection.perform("select set_config('search_path', 'consent, public', false)", logger: logger)
            // A full reconciliation is long by nature: no per-statement limit in this session.
            try await connection.perform("set statement_timeout = 0", logger: logger)

            report.run_id = try await connection.query("""
                insert into consent.reconciliation_runs (source, mode, snapshot_time)
                values (\(report.source), \(report.mode), \(report.snapshot_time)) returning id
                """, logger: logger).collect().first!.decode(Int64.self)
            var read: Int64 = 0
            do {
                try await connection.perform(
                    "truncate consent.staging_users, consent.staging_consents, consent.staging_preferences, consent.staging_incomplete",
                    logger: logger)
                try await source.read { batch in
                    try await Staging.write(batch, firstLine: read + 1, on: connection, logger: logger)
                    read += Int64(batch.count)
                    progress.update(read)
                }
                progress.finish(read)
                report.users_read = read
                report.complete = true
                let repeated = try await connection.query("select consent.reconcile_keep_newest_lines()", logger: logger)
                    .collect().first?.decode(Int64.self) ?? 0
                if repeated > 0 {
                    logger.notice("users listed more than once in the snapshot: only the newest listing of each is compared",
                                  metadata: ["older_listings": "\(repeated)"])
                }
                try await connection.perform("analyze consent.staging_users, consent.staging_consents, consent.staging_preferences", logger: logger)
                try await connection.perform("""
                    select consent.reconcile_diff(\(report.run_id), \(report.snapshot_time), \(source.writtenBefore))
                    """, logger: logger)
                try await connection.perform("analyze consent.reconciliation_drift", logger: logger)
                try await Self.spareLaterRemovals(connection, run: report.run_id, snapshot: report.snapshot_time,
                                                  writtenBefore: source.writtenBefore, logger: logger)
                report.users_with_unknown_values = try await Self.spareIncomplete(connection, run: report.run_id, logger: logger)
                try await Self.spareOtherRegulations(connection, run: report.run_id, logger: logger)
                try await connection.perform("analyze consent.reconciliation_drift", logger: logger)
                report.drift = try await Self.counts(connection, run: report.run_id, repairedOnly: false, logger: logger)

                if report.drift.isEmpty {
                    report.outcome = "in_sync"
                } else if options.checkOnly {
                    report.outcome = "drift"
                } else {
                    let missing = report.drift["user_missing_at_source", default: 0]
                    let stored = try await connection.query("""
                        select count(*)::bigint from consent.users u
                         where u.deleted_at is null
                           and (u.source, u.tenant_id) in (select distinct source, tenant_id from consent.staging_users)
                        """, logger: logger).collect().first?.decode(Int64.self) ?? 0
                    let share = stored == 0 ? 0 : Double(missing) / Double(stored)
                    let removeUsers = share <= options.maxRemovalShare
                    try await connection.perform("begin", logger: logger)
                    do {
                        // Again, just before the repair and under the users' locks (which webhooks take
                        // too): a removal or deletion that a webhook committed while the drift was being
                        // counted, or commits while the repair waits for its users, is not undone.
                        try await Self.lockDriftUsers(connection, run: report.run_id, logger: logger)
                        try await Self.spareLaterRemovals(connection, run: report.run_id, snapshot: report.snapshot_time,
                                                          writtenBefore: source.writtenBefore, logger: logger)
                        try await connection.perform("""
                            select consent.reconcile_repair(\(report.run_id), \(report.snapshot_time), \(removeUsers),
                                                           \(source.writtenBefore))
                            """, logger: logger)
                        try await connection.perform("commit", logger: logger)
                    } catch {
                        _ = try? await connection.query("rollback", logger: logger)
                        throw error
                    }
                    // What the last check spared is not drift either.
                    report.drift = try await Self.counts(connection, run: report.run_id, repairedOnly: false, logger: logger)
                    report.repaired = try await Self.counts(connection, run: report.run_id, repairedOnly: true, logger: logger)
                    if removeUsers {
                        report.outcome = report.drift.isEmpty ? "in_sync" : "repaired"
                    } else {
                        report.outcome = "refused"
                        report.error = String(format: "refused to remove %lld users missing at the source: %.1f %% of the %lld stored users of these tenants, above the limit of %.1f %% (reconcile.max_removal_share); the rest was repaired",
                                              missing, share * 100, stored, options.maxRemovalShare * 100)
                    }
                }
            } catch {
                report.users_read = read  // how far it got
                report.outcome = "error"
                report.error = (error as? PSQLError).map { String(reflecting: $0) } ?? "\(error)"
            }
            report.seconds = (ContinuousClock.now - started).seconds
            try await connection.perform("""
                update consent.reconciliation_runs
                   set finished_at = now(), users_read = \(report.users_read), complete = \(report.complete),
                       drift_counts = \(Self.json(report.drift))::jsonb, repaired_counts = \(Self.json(report.repaired))::jsonb,
                       outcome = \(report.outcome), error = \(report.error)
                 where id = \(report.run_id)
                """, logger: logger)
            try await connection.perform("select pg_advisory_unlock(\(Self.lockKey))", logger: logger)
            try await connection.perform("reset search_path", logger: logger)
            try await connection.perform("reset statement_timeout", logger: logger)
            return report
        }
        return report
    }

    /// Takes the transaction-scoped lock of every user with drift, as webhook batches take theirs (same
    /// keys, same global order, so neither waits on the other in a cycle): a batch in flight for one of
    /// them commits first, and one arriving later waits for the repair. `reconcile_repair` takes the same
    /// locks again (they are re-entrant) and, like it, a repair of more than `lockedRepairLimit` users takes
    /// none: the lock table is bounded, and such a repair relies on its per-row guards.
    static func lockDriftUsers(_ connection: PostgresConnection, run: Int64, logger: Logger) async throws {
        let users = try await connection.query("""
            select count(distinct (source, tenant_id, user_id))::bigint from consent.reconciliation_drift where run_id = \(run)
            """, logger: logger).collect().first?.decode(Int64.self) ?? 0
        guard users > 0, users <= lockedRepairLimit else { return }
        try await connection.perform("""
            select pg_advisory_xact_lock(s.k)
              from (select distinct consent.user_lock_key(source, tenant_id, user_id) as k
                      from consent.reconciliation_drift where run_id = \(run) order by 1) s
            """, logger: logger)
    }

    /// The most users a repair locks one by one (as `consent.reconcile_repair` does, sql/011).
    static let lockedRepairLimit: Int64 = 2000

    /// A user whose snapshot carried an unknown value lacks that item in staging: it is not gone at the
    /// source, so none of that user's stored items counts as extra (PRODUCT §2: kept, not applied).
    static func spareIncomplete(_ connection: PostgresConnection, run: Int64, logger: Logger) async throws -> Int64 {
        let rows = try await connection.query("""
            select count(distinct (source, tenant_id, user_id))::bigint, min(reason) from consent.staging_incomplete
            """, logger: logger).collect()
        guard let (users, example) = try rows.first?.decode((Int64, String?).self), users > 0 else { return 0 }
        try await connection.perform("""
            delete from consent.reconciliation_drift d using consent.staging_incomplete i
             where d.run_id = \(run)
               and (d.kind = 'consent_extra' or (d.kind = 'preference_different' and d.detail = 'extra'))
               and d.source = i.source and d.tenant_id = i.tenant_id and d.user_id = i.user_id
            """, logger: logger)
        logger.warning("snapshot users carry values this version does not know; their stored items are not removed",
                       metadata: ["users": "\(users)", "example": "\(example ?? "")"])
        return users
    }

    /// PRODUCT §6, never move a row backwards, for what is no longer stored: an item the snapshot has and
    /// we do not is not drift when it was removed after the snapshot (its history has a change later than
    /// the snapshot's time, or recorded after `writtenBefore`), nor when its user was deleted after it.
    static func spareLaterRemovals(_ connection: PostgresConnection, run: Int64, snapshot: Date, writtenBefore: Date?,
                                   logger: Logger) async throws {
        // Three set-based deletes (joins, not a subplan per drift row): users deleted after the snapshot,
        // consents and preferences whose history has a later change.
        var spared: Int64 = 0
        let statements: [PostgresQuery] = [
            """
            with spared as (
                delete from consent.reconciliation_drift d using consent.users u
                 where d.run_id = \(run)
                   and (d.kind = 'consent_missing' or (d.kind = 'preference_different' and d.detail = 'missing'))
                   and u.source = d.source and u.tenant_id = d.tenant_id and u.user_id = d.user_id
                   and u.deleted_at > \(snapshot)
                returning 1)
            select count(*)::bigint from spared
            """,
            """
            with spared as (
                delete from consent.reconciliation_drift d using consent.consent_history h
                 where d.run_id = \(run) and d.kind = 'consent_missing'
                   and h.source = d.source and h.tenant_id = d.tenant_id and h.user_id = d.user_id
                   and h.regulation = coalesce(d.regulation, '') and h.item_id = d.item_id
                   and h.item_kind = split_part(d.detail, ':', 1) and h.lawful_basis = split_part(d.detail, ':', 2)
                   and (greatest(h.changed_at, h.seen_at) > \(snapshot)
                        or h.recorded_at > coalesce(\(writtenBefore)::timestamptz, 'infinity'))
                returning 1)
            select count(*)::bigint from spared
            """,
            """
            with spared as (
                delete from consent.reconciliation_drift d using consent.preference_history h
                 where d.run_id = \(run) and d.kind = 'preference_different' and d.detail = 'missing'
                   and h.source = d.source and h.tenant_id = d.tenant_id and h.user_id = d.user_id
                   and h.regulation = coalesce(d.regulation, '') and d.item_id = h.purpose_id || '/' || h.preference_id
                   and (greatest(h.changed_at, h.seen_at) > \(snapshot)
                        or h.recorded_at > coalesce(\(writtenBefore)::timestamptz, 'infinity'))
                returning 1)
            select count(*)::bigint from spared
            """,
        ]
        for statement in statements {
            spared += try await connection.query(statement, logger: logger).collect().first?.decode(Int64.self) ?? 0
        }
        if spared > 0 {
            logger.notice("items removed after the snapshot's time stay removed: not drift",
                          metadata: ["items": "\(spared)"])
        }
    }

    /// A snapshot covers the regulations it carries (the Didomi API is read per configured regulation).
    /// A user absent from it who has state in another regulation is not known to be gone at the source:
    /// PRODUCT §4, a `cpra` event never touches `gdpr` state, and a `gdpr` scan never removes a `cpra` user.
    static func spareOtherRegulations(_ connection: PostgresConnection, run: Int64, logger: Logger) async throws {
        let spared = try await connection.query("""
            with covered as materialized (select distinct source, tenant_id, regulation from consent.staging_users),
            spared as (
                delete from consent.reconciliation_drift d
                 where d.run_id = \(run) and d.kind = 'user_missing_at_source'
                   and exists (
                       select 1
                         from (select c.regulation from consent.consents c
                                where (c.source, c.tenant_id, c.user_id) = (d.source, d.tenant_id, d.user_id)
                               union all
                               select p.regulation from consent.preferences p
                                where (p.source, p.tenant_id, p.user_id) = (d.source, d.tenant_id, d.user_id)
                               union all
                               select s.regulation from consent.user_snapshots s
                                where (s.source, s.tenant_id, s.user_id) = (d.source, d.tenant_id, d.user_id)) held
                        where not exists (select 1 from covered v
                                           where (v.source, v.tenant_id, v.regulation) = (d.source, d.tenant_id, held.regulation)))
                returning 1)
            select count(*)::bigint from spared
            """, logger: logger).collect().first?.decode(Int64.self) ?? 0
        if spared > 0 {
            logger.notice("users absent from the snapshot keep their state: they have state in a regulation the snapshot does not cover",
                          metadata: ["users": "\(spared)"])
        }
    }

    static func counts(_ connection: PostgresConnection, run: Int64, repairedOnly: Bool, logger: Logger) async throws -> [String: Int64] {
        var counts: [String: Int64] = [:]
        let rows = try await connection.query("""
            select kind, count(*)::bigint from consent.reconciliation_drift
             where run_id = \(run) and (not \(repairedOnly) or repaired) group by kind
            """, logger: logger)
        for try await (kind, count) in rows.decode((String, Int64).self) { counts[kind] = count }
        return counts
    }

    static func json(_ counts: [String: Int64]) -> String {
        let data = (try? JSONSerialization.data(withJSONObject: counts, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

/// Users read so far: a live line on a terminal, a log line every 10 s otherwise.
final class Progress: @unchecked Sendable {
    let terminal: Bool
    let logger: Logger
    let started = ContinuousClock.now
    var lastReport = ContinuousClock.now
    let lock = NSLock()

    init(terminal: Bool, logger: Logger) {
        self.terminal = terminal
        self.logger = logger
    }

    func update(_ read: Int64) {
        lock.withLock {
            let now = ContinuousClock.now
            let interval: Duration = terminal ? .milliseconds(250) : .seconds(10)
            guard now - lastReport >= interval else { return }
            lastReport = now
            let rate = Double(read) / max(0.001, (now - started).seconds)
            if terminal {
                FileHandle.standardError.write(Data(String(format: "\rread %lld users (%.0f/s)   ", read, rate).utf8))
            } else {
                logger.info("reconciliation progress", metadata: ["users_read": "\(read)", "per_second": "\(Int(rate))"])
            }
        }
    }

    func finish(_ read: Int64) {
        if terminal { FileHandle.standardError.write(Data(String(format: "\rread %lld users          \n", read).utf8)) }
    }
}

/// Rows of the snapshot for the staging tables, written with COPY (text format).
enum Staging {
    /// `firstLine`: the snapshot position of the batch's first user (staged with every row of it).
    static func write(_ batch: [ChangeSet], firstLine: Int64, on connection: PostgresConnection, logger: Logger) async throws {
        var users = ByteBuffer()
        var consents = ByteBuffer()
        var preferences = ByteBuffer()
        var incomplete = ByteBuffer()
        for (offset, change) in batch.enumerated() {
            guard let tenant = change.tenant, let user = change.user else { continue }
            let line = String(firstLine + Int64(offset))
            if change.action == .store { row(&incomplete, [change.source, tenant, user, change.reason, line]) }
            let regulation = change.regulation ?? ""
            let newest = change.source == "dataguard" ? (newestItemTime(change) ?? change.at)
                : change.at ?? change.items.compactMap(\.at).max() ?? change.prefs.compactMap(\.at).max()
            row(&users, [change.source, tenant, user, regulation, change.userInfo?.externalRef,
                         change.userInfo?.version.map(String.init), newest,
                         (change.replaces ?? []).contains("vendor") ? "t" : "f", line])
            for item in change.items {
                row(&consents, [change.source, tenant, user, regulation, item.kind, item.id, item.basis.rawValue,
                                item.status.rawValue, item.raw, item.optionType, item.validFrom, item.validUntil,
                                item.at ?? change.at, line])
            }
            for preference in change.prefs {
                row(&preferences, [change.source, tenant, user, regulation, preference.purpose ?? "", preference.pref,
                                   arrayLiteral(preference.values), preference.at ?? change.at, line])
            }
        }
        try await copy(users, into: "staging_users",
                       columns: ["source", "tenant_id", "user_id", "regulation", "external_ref", "version", "updated_at", "has_vendors", "line"],
                       connection: connection, logger: logger)
        try await copy(consents, into: "staging_consents",
                       columns: ["source", "tenant_id", "user_id", "regulation", "item_kind", "item_id", "lawful_basis",
                                 "status", "raw_status", "option_type", "valid_from", "valid_until", "changed_at", "line"],
                       connection: connection, logger: logger)
        try await copy(preferences, into: "staging_preferences",
                       columns: ["source", "tenant_id", "user_id", "regulation", "purpose_id", "preference_id", "value_ids", "changed_at", "line"],
                       connection: connection, logger: logger)
        try await copy(incomplete, into: "staging_incomplete", columns: ["source", "tenant_id", "user_id", "reason", "line"],
                       connection: connection, logger: logger)
    }

    /// A DataGuard user's time is its newest item (obtainedAt, recordedAt, preference updatedAt), as the
    /// webhooks judge it: its sentAt may be re-stamped on a retry, so it orders nothing.
    static func newestItemTime(_ change: ChangeSet) -> String? {
        let times = (change.items.flatMap { [$0.at, $0.at2] } + change.prefs.map(\.at)).compactMap { $0 }
        guard let first = times.first else { return nil }
        // Times written alike in UTC (the usual case) order as text; others are parsed.
        if times.allSatisfy({ $0.utf8.count == first.utf8.count && $0.hasSuffix("Z") }) { return times.max() }
        return times.compactMap(Timestamp.parse).max().map(Timestamp.format)
    }

    static func copy(_ buffer: ByteBuffer, into table: String, columns: [String], connection: PostgresConnection, logger: Logger) async throws {
        guard buffer.readableBytes > 0 else { return }
        try await connection.copyFrom(table: table, columns: columns, logger: logger) { writer in
            try await writer.write(buffer)
        }
    }

    /// One COPY text line: tab-separated, `\N` for NULL, backslash escapes.
    static func row(_ buffer: inout ByteBuffer, _ fields: [String?]) {
        for (index, field) in fields.enumerated() {
            if index > 0 { buffer.writeInteger(UInt8(ascii: "\t")) }
            guard let field else { buffer.writeString("\\N"); continue }
            for byte in field.utf8 {
                switch byte {
                case UInt8(ascii: "\\"): buffer.writeString("\\\\")
                case UInt8(ascii: "\t"): buffer.writeString("\\t")
                case UInt8(ascii: "\n"): buffer.writeString("\\n")
                case UInt8(ascii: "\r"): buffer.writeString("\\r")
                default: buffer.writeInteger(byte)
                }
            }
        }
        buffer.writeInteger(UInt8(ascii: "\n"))
    }

    /// A `text[]` literal: every element double-quoted.
    static func arrayLiteral(_ values: [String]) -> String {
        "{" + values.map { "\"" + $0.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\"" }
            .joined(separator: ",") + "}"
    }
}
