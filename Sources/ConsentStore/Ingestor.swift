import Atomics
import ConsentCore
import Foundation
import Logging
import Metrics
import ServiceLifecycle

/// Group commit for webhook deliveries.
///
/// Requests enqueue their decoded delivery and wait. A few workers each take everything queued (up
/// to `maxBatch`), apply it with one `consent.apply_batch` call — one transaction, one commit — and
/// answer every request of the batch. Nothing is acknowledged before its transaction committed; under
/// load batches grow by themselves (whatever arrived while the previous commit was in flight), with no
/// added delay when idle. The queue is bounded: when it is full, `submit` fails at once and the sender
/// gets 503 + Retry-After.
public actor Ingestor: Service {
    public struct Configuration: Sendable {
        /// Deliveries applied in one transaction at most.
        public var maxBatch: Int = 128
        /// Concurrent batches (each holds one database connection while it commits): one per core, at
        /// least 2, at most 8. A batch is CPU work in PostgreSQL with a fixed cost of its own; more
        /// batches at once than cores only makes each one smaller without applying more (on 2 cores,
        /// 2 workers apply ~10 % more per CPU second than 4; bench/ingest.sh).
        public var workers: Int = min(8, max(2, ProcessInfo.processInfo.activeProcessorCount))
        /// Deliveries waiting at most; beyond that requests are refused with 503.
        public var queueCapacity: Int = 4096
        /// How long a batch may take in all (connection wait, statement, commit) before its requests are
        /// answered 503 and the worker moves on: a server that stopped answering must not hold them
        /// (`Agent` sets it to the connection wait plus `ConsentStore.answerDeadline`).
        public var batchDeadline: Duration = .seconds(6)

        public init() {}
    }

    /// The queue is full: the caller should answer 503 and ask the sender to retry.
    public struct Overloaded: Error, CustomStringConvertible {
        public var description: String { "too many deliveries waiting to be applied" }
    }

    struct Waiting {
        var delivery: PendingDelivery
        var continuation: CheckedContinuation<ApplyResult, any Error>
    }

    private let store: ConsentStore
    private let configuration: Configuration
    private let logger: Logger
    private var queue: [Waiting] = []
    private var queueHead = 0
    private var idleWorkers: [CheckedContinuation<Void, Never>] = []
    private var stopped = false
    private let batchSize = Recorder(label: "consent_sync_apply_batch_size")
    private let queueDepth = Gauge(label: "consent_sync_apply_queue_depth")

    public init(store: ConsentStore, configuration: Configuration = .init(), logger: Logger) {
        self.store = store
        self.configuration = configuration
        self.logger = logger
    }

    /// Applies one delivery as part of the next batch; returns once its transaction committed.
    public func submit(_ delivery: PendingDelivery) async throws -> ApplyResult {
        guard !stopped else { throw DatabaseUnavailable("the agent is shutting down") }
        guard queue.count - queueHead < configuration.queueCapacity else { throw Overloaded() }
        return try await withCheckedThrowingContinuation { continuation in
            queue.append(Waiting(delivery: delivery, continuation: continuation))
            if let worker = idleWorkers.popLast() { worker.resume() }
        }
    }

    /// Runs the workers until graceful shutdown; what is queued by then is still applied.
    public func run() async throws {
        await withTaskCancellationHandler {
            await withTaskGroup(of: Void.self) { group in
                for _ in 0..<max(1, configuration.workers) {
                    group.addTask { await self.work() }
                }
                await withGracefulShutdownHandler {
                    await group.waitForAll()
                } onGracefulShutdown: {
                    Task { await self.stop() }
                }
            }
        } onCancel: {
            Task { await self.stop() }
        }
    }

    private func stop() {
        stopped = true
        for worker in idleWorkers { worker.resume() }
        idleWorkers.removeAll()
    }

    private func work() async {
        while true {
            guard let batch = await nextBatch() else { return }
            await apply(batch)
        }
    }

    private func nextBatch() async -> [Waiting]? {
        while queue.count == queueHead {
            if stopped { return nil }
            await withCheckedContinuation { idleWorkers.append($0) }
        }
        let end = min(queue.count, queueHead + configuration.maxBatch)
        let batch = Array(queue[queueHead..<end])
        queueHead = end
        if queueHead == queue.count {
            queue.removeAll(keepingCapacity: true)
            queueHead = 0
        } else if queueHead > 4096 {
            queue.removeFirst(queueHead)
            queueHead = 0
        }
        queueDepth.record(queue.count - queueHead)
        return batch
    }

    private nonisolated func apply(_ batch: [Waiting]) async {
        batchSize.record(batch.count)
        do {
            let store = self.store
            let deliveries = batch.map(\.delivery)
            let results = try await firstWithin(configuration.batchDeadline, logger: logger) { try await store.apply(deliveries) }
            for (waiting, result) in zip(batch, results) { waiting.continuation.resume(returning: result) }
        } catch let error as DatabaseRejected where batch.count > 1 {
            // One delivery must not fail its neighbours: apply each on its own.
            logger.warning("batch rejected, applying its deliveries one by one",
                           metadata: ["error": "\(error)", "batch": "\(batch.count)"])
            for waiting in batch { await apply([waiting]) }
        } catch let error as DatabaseRejected {
            await keepFailed(batch[0], error: error)
        } catch {
            for waiting in batch { waiting.continuation.resume(throwing: error) }
        }
    }

    /// A delivery the database refused is kept (raw bytes and reason) so that it can be replayed.
    private nonisolated func keepFailed(_ waiting: Waiting, error: DatabaseRejected) async {
        logger.error("delivery could not be applied; kept for replay",
                     metadata: ["error": "\(error)", "endpoint": "\(waiting.delivery.change.endpoint)"])
        // Keep only the raw bytes and the request context: the decoded values are what the database refused.
        let original = waiting.delivery.change
        var change = ChangeSet.rejected(endpoint: original.endpoint, source: original.source, reason: error.description)
        change.type = original.type
        change.requestID = original.requestID
        change.remoteAddress = original.remoteAddress
        change.headers = original.headers
        change.receivedAt = original.receivedAt
        let kept = PendingDelivery(change: change, body: waiting.delivery.body)
        do {
            let store = self.store
            var result = try await firstWithin(configuration.batchDeadline, logger: logger) { try await store.apply([kept]) }.first!
            result.outcome = .failed
            waiting.continuation.resume(throwing: DeliveryKept(result: result, error: error))
        } catch {
            waiting.continuation.resume(throwing: error)
        }
    }
}

/// The database refused a delivery; it was kept as `failed` (see `result`) for replay.
public struct DeliveryKept: Error, CustomStringConvertible {
    public var result: ApplyResult
    public var error: DatabaseRejected
    public var description: String { "\(error) (kept as delivery \(result.deliveryID))" }
}

/// The result of `operation`, or `DatabaseUnavailable` once `limit` has passed, whichever comes first,
/// without waiting for an operation that never ends: it is cancelled and left to finish on its own.
///
/// A worker of the ingestor must never hang: if a batch outlived every bound of its own (a driver or
/// network fault), its requests are answered 503 and the next batch goes on. A sender that retries a
/// delivery whose transaction did commit after all is answered `duplicate`, so nothing is lost or
/// applied twice.
public func firstWithin<T: Sendable>(
    _ limit: Duration, logger: Logger, _ operation: @escaping @Sendable () async throws -> T
) async throws -> T {
    let settled = ManagedAtomic(false)
    let work = WorkSlot()
    return try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
        let deadline = Task {
            do { try await Task.sleep(for: limit) } catch { return }
            guard settled.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else {
                return
            }
            logger.error("a database operation outlived its deadline; answered as unavailable",
                         metadata: ["deadline": "\(limit)"])
            continuation.resume(throwing: DatabaseUnavailable("the database did not answer within \(limit)", outcomeUnknown: true))
            work.cancel()
        }
        work.set(Task {
            let result: Result<T, any Error>
            do { result = .success(try await operation()) } catch { result = .failure(error) }
            deadline.cancel()
            if settled.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged {
                continuation.resume(with: result)
            }
        })
    }
}

/// The task of `firstWithin`'s operation, cancelled by its deadline (even before it is stored).
private final class WorkSlot: @unchecked Sendable {
    private let lock = NSLock()
    private var task: Task<Void, Never>?
    private var cancelled = false

    func set(_ task: Task<Void, Never>) {
        let cancel = lock.withLock { () -> Bool in self.task = task; return cancelled }
        if cancel { task.cancel() }
    }

    func cancel() {
        let task = lock.withLock { () -> Task<Void, Never>? in cancelled = true; return self.task }
        task?.cancel()
    }
}
