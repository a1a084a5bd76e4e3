import ConsentCore
import Foundation

/// A full snapshot of one platform, read as a stream of users (one change set per user and
/// regulation), never held in memory whole.
public protocol SnapshotSource: Sendable {
    /// `file`, `didomi-api`, `dataguard-api`.
    var name: String { get }
    /// When the snapshot's state was taken (the fetch start, or the file's modification time), compared
    /// with the source-side times of stored rows: rows changed after it are newer and are not drift.
    var snapshotTime: Date { get }
    /// Set when `snapshotTime` is the agent's own clock at the start of the fetch: rows the agent wrote
    /// after it are newer than the snapshot too, whatever the source's clock says. `nil` when the time is
    /// given (`--snapshot-time`, a file's modification time): only source-side times count then.
    var writtenBefore: Date? { get }
    /// Calls `consume` with batches of users, in order; returns when the whole snapshot was read.
    func read(_ consume: ([ChangeSet]) async throws -> Void) async throws
}

/// Why a snapshot could not be read.
public struct SnapshotError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// One line of an NDJSON snapshot: a Didomi user object or a DataGuard effective-permissions object.
enum SnapshotLine {
    static func decode(_ line: Substring, number: Int) throws -> ChangeSet {
        let value: JSONValue
        do {
            value = try JSONParser.parse(line)
        } catch {
            throw SnapshotError("line \(number): not valid JSON")
        }
        do {
            if value["citizenId"] != nil || value["permissions"] != nil {
                return try DataGuardDecoder.effectivePermissions(value)
            }
            return try DidomiDecoder.apiUser(value, regulation: nil)
        } catch let error as PayloadError {
            throw SnapshotError("line \(number): \(error.message)")
        }
    }
}

/// An NDJSON file (`.gz` accepted) or standard input (`-`), read line by line.
public struct NDJSONSource: SnapshotSource {
    public let path: String
    public let snapshotTime: Date
    public let writtenBefore: Date?
    public let batchSize: Int
    public var name: String { "file" }

    public init(path: String, snapshotTime: Date?, batchSize: Int = 2000) throws {
        self.path = path
        self.batchSize = batchSize
        if let snapshotTime {
            self.snapshotTime = snapshotTime
            self.writtenBefore = nil
        } else if path == "-" {
            self.snapshotTime = Date()
            self.writtenBefore = self.snapshotTime
        } else {
            guard let attributes = try? FileManager.default.attributesOfItem(atPath: path),
                  let modified = attributes[.modificationDate] as? Date else {
                throw SnapshotError("cannot read \(path)")
            }
            if attributes[.type] as? FileAttributeType == .typeDirectory {
                throw SnapshotError("\(path) is a directory, not an NDJSON file")
            }
            self.snapshotTime = modified
            self.writtenBefore = nil
        }
    }

    /// The file begins with gzip's magic bytes (1f 8b).
    static func startsLikeGzip(_ path: String) -> Bool {
        guard let file = FileHandle(forReadingAtPath: path) else { return false }
        defer { try? file.close() }
        return (try? file.read(upToCount: 2)) == Data([0x1f, 0x8b])
    }

    public func read(_ consume: ([ChangeSet]) async throws -> Void) async throws {
        var decompressor: Process?
        let handle: FileHandle
        // gzip is recognised by its content, not only by a `.gz` name: a compressed stream on standard
        // input goes through `gzip -dcf`, which passes plain input through unchanged.
        if path == "-" || path.hasSuffix(".gz") || Self.startsLikeGzip(path) {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/bin/gzip")
            process.arguments = path == "-" ? ["-dcf"] : ["-dc", path]
            if path == "-" { process.standardInput = FileHandle.standardInput }
            let pipe = Pipe()
            process.standardOutput = pipe
            process.standardError = FileHandle.nullDevice
            try process.run()
            decompressor = process
            handle = pipe.fileHandleForReading
        } else {
            guard let file = FileHandle(forReadingAtPath: path) else { throw SnapshotError("cannot open \(path)") }
            handle = file
        }
        defer { if let decompressor, decompressor.isRunning { decompressor.terminate() } }

        var pending = Data()
        var batch: [ChangeSet] = []
        batch.reserveCapacity(batchSize)
        var number = 0
        while true {
            let chunk: Data
            do {
                guard let read = try handle.read(upToCount: 1 << 20), !read.isEmpty else { break }
                chunk = read
            } catch {
                throw SnapshotError("cannot read \(path == "-" ? "standard input" : path): \(error.localizedDescription)")
            }
            pending.append(chunk)
            var start = pending.startIndex
            while let newline = pending[start...].firstIndex(of: UInt8(ascii: "\n")) {
                number += 1
                var line = String(decoding: pending[start..<newline], as: UTF8.self)
                if number == 1, line.hasPrefix("\u{FEFF}") { line.removeFirst() }  // a byte-order mark
                start = pending.index(after: newline)
                let trimmed = line.trimmingCharacters(in: .whitespaces)
                if trimmed.isEmpty { continue }
                batch.append(try SnapshotLine.decode(Substring(trimmed), number: number))
                if batch.count >= batchSize {
                    try await consume(batch)
                    batch.removeAll(keepingCapacity: true)
                }
            }
            pending.removeSubrange(pending.startIndex..<start)
        }
        var last = String(decoding: pending, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        if number == 0, last.hasPrefix("\u{FEFF}") { last.removeFirst() }
        if !last.isEmpty {
            number += 1
            batch.append(try SnapshotLine.decode(Substring(last), number: number))
        }
        if !batch.isEmpty { try await consume(batch) }
        if let decompressor {
            while decompressor.isRunning { try await Task.sleep(for: .milliseconds(10)) }
            guard decompressor.terminationStatus == 0 else { throw SnapshotError("\(path == "-" ? "standard input" : path): gzip failed (truncated or corrupt)") }
        }
    }
}
