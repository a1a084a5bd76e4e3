import Logging
import NIOConcurrencyHelpers

/// Keeps every log line of a test with its merged metadata, as plain strings.
struct RecordingLogHandler: LogHandler {
    struct Line: Sendable {
        var level: Logger.Level
        var message: String
        var metadata: [String: String]
    }

    final class Storage: Sendable {
        let lines = NIOLockedValueBox<[Line]>([])

        /// The lines with this message.
        func lines(_ message: String) -> [Line] { lines.withLockedValue { $0.filter { $0.message == message } } }

        /// Every line as text: level, message and metadata.
        var text: String {
            lines.withLockedValue { $0.map { "\($0.level) \($0.message) \($0.metadata)" }.joined(separator: "\n") }
        }
    }

    let storage: Storage
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let merged = metadata.merging(event.metadata ?? [:]) { _, new in new }.mapValues { "\($0)" }
        storage.lines.withLockedValue { $0.append(Line(level: event.level, message: "\(event.message)", metadata: merged)) }
    }

    /// A logger at trace level whose lines end up in the returned storage.
    static func logger() -> (Logger, Storage) {
        let storage = Storage()
        var logger = Logger(label: "recording") { _ in RecordingLogHandler(storage: storage) }
        logger.logLevel = .trace
        return (logger, storage)
    }
}
