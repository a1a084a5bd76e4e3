import Foundation

/// A strict RFC 8259 JSON parser that builds a `JSONValue` straight from UTF-8 bytes.
///
/// - Whitespace is only space, tab, line feed and carriage return; no byte order mark, no comments.
/// - Objects keep the last value of a repeated key.
/// - Strings: every escape including `\uXXXX` and surrogate pairs; unpaired surrogates, raw control
///   characters (< 0x20) and invalid UTF-8 are errors.
/// - Numbers follow the JSON grammar (no leading zeros, `+`, bare `.`, `NaN`, `Infinity`) and become
///   `Double`s; a number too large for a `Double` is an error.
/// - Nesting deeper than `maxDepth` is an error, as is anything but whitespace after the value.
///
/// Errors are `PayloadError`s naming the problem and its byte offset (0-based); they never quote the
/// input beyond the single offending character.
public enum JSONParser {
    /// Objects and arrays nested deeper than this are refused.
    public static let maxDepth = 512

    public static func parse(_ data: Data) throws -> JSONValue {
        try data.withUnsafeBytes { try parse($0) }
    }

    public static func parse(_ bytes: [UInt8]) throws -> JSONValue {
        try bytes.withUnsafeBufferPointer { try parse($0) }
    }

    /// For byte containers of other modules (a NIO `ByteBuffer` via `withUnsafeReadableBytes`).
    public static func parse(_ buffer: UnsafeRawBufferPointer) throws -> JSONValue {
        try parse(buffer.assumingMemoryBound(to: UInt8.self))
    }

    public static func parse(_ buffer: UnsafeBufferPointer<UInt8>) throws -> JSONValue {
        var reader = Reader(buffer)
        return try reader.document()
    }

    /// Any byte collection; contiguous ones are read in place.
    public static func parse(_ bytes: some Collection<UInt8>) throws -> JSONValue {
        if let value = try bytes.withContiguousStorageIfAvailable({ try parse($0) }) { return value }
        return try parse(Array(bytes))
    }

    /// The UTF-8 of a string (an NDJSON line, say).
    public static func parse(_ text: some StringProtocol) throws -> JSONValue {
        if let value = try text.utf8.withContiguousStorageIfAvailable({ try parse($0) }) { return value }
        return try parse(Array(text.utf8))
    }
}

private enum Byte {
    static let space = UInt8(ascii: " ")
    static let tab = UInt8(ascii: "\t")
    static let lineFeed = UInt8(ascii: "\n")
    static let carriageReturn = UInt8(ascii: "\r")
    static let quote = UInt8(ascii: "\"")
    static let backslash = UInt8(ascii: "\\")
    static let slash = UInt8(ascii: "/")
    static let comma = UInt8(ascii: ",")
    static let colon = UInt8(ascii: ":")
    static let openBrace = UInt8(ascii: "{")
    static let closeBrace = UInt8(ascii: "}")
    static let openBracket = UInt8(ascii: "[")
    static let closeBracket = UInt8(ascii: "]")
    static let minus = UInt8(ascii: "-")
    static let plus = UInt8(ascii: "+")
    static let dot = UInt8(ascii: ".")
    static let zero = UInt8(ascii: "0")
    static let nine = UInt8(ascii: "9")
    static let lowerE = UInt8(ascii: "e")
    static let upperE = UInt8(ascii: "E")
}

/// Exact powers of ten as `Double`s (10^22 is the largest one representable exactly).
private let exactPowersOfTen: [Double] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
]

private struct Reader {
    let bytes: UnsafeBufferPointer<UInt8>
    let count: Int
    var index = 0
    var depth = 0
    /// Reused for strings that contain escapes.
    var scratch: [UInt8] = []

    init(_ bytes: UnsafeBufferPointer<UInt8>) {
        self.bytes = bytes
        self.count = bytes.count
    }

    mutating func document() throws -> JSONValue {
        skipWhitespace()
        let value = try value()
        skipWhitespace()
        if index < count { throw unexpected(at: index, expected: "the end of the document") }
        return value
    }

    // MARK: Errors

    func failure(_ problem: String, at offset: Int) -> PayloadError {
        PayloadError("body is not valid JSON: \(problem) at byte \(offset)")
    }

    /// An unexpected byte (or the end of the input) at `offset`.
    func unexpected(at offset: Int, expected: String? = nil) -> PayloadError {
        let suffix = expected.map { "; expected \($0)" } ?? ""
        guard offset < count else {
            return PayloadError("body is not valid JSON: unexpected end of input at byte \(offset)\(suffix)")
        }
        let byte = bytes[offset]
        let what = (0x21...0x7E).contains(byte)
            ? "character '\(Character(Unicode.Scalar(byte)))'" : "byte 0x\(Self.hex(byte))"
        return PayloadError("body is not valid JSON: unexpected \(what) at byte \(offset)\(suffix)")
    }

    static func hex(_ byte: UInt8) -> String {
        let digits = Array("0123456789ABCDEF")
        return String([digits[Int(byte >> 4)], digits[Int(byte & 0x0F)]])
    }

    // MARK: Structure

    @inline(__always)
    mutating func skipWhitespace() {
        while index < count {
            switch bytes[index] {
            case Byte.space, Byte.lineFeed, Byte.carriageReturn, Byte.tab: index += 1
            default: return
            }
        }
    }

    mutating func value() throws -> JSONValue {
        guard index < count else { throw unexpected(at: index, expected: "a value") }
        switch bytes[index] {
        case Byte.openBrace: return try object()
        case Byte.openBracket: return try array()
        case Byte.quote: return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case Byte.minus, Byte.zero...Byte.nine: return .number(try number())
        default: throw unexpected(at: index, expected: "a value")
        }
    }

    mutating func enter() throws {
        depth += 1
        if depth > JSONParser.maxDepth {
            throw failure("nesting deeper than \(JSONParser.maxDepth) levels", at: index)
        }
    }

    mutating func object() throws -> JSONValue {
        try enter()
        index += 1
        var members: [String: JSONValue] = [:]
        skipWhitespace()
        if index < count, bytes[index] == Byte.closeBrace {
            index += 1
            depth -= 1
            return .object(members)
        }
        while true {
            guard index < count, bytes[index] == Byte.quote else {
                throw unexpected(at: index, expected: "a string key")
            }
            let key = try string()
            skipWhitespace()
            guard index < count, bytes[index] == Byte.colon else { throw unexpected(at: index, expected: "':'") }
            index += 1
            skipWhitespace()
            members[key] = try value()
            if try closes(with: Byte.closeBrace, expected: "',' or '}'") { return .object(members) }
        }
    }

    mutating func array() throws -> JSONValue {
        try enter()
        index += 1
        var elements: [JSONValue] = []
        skipWhitespace()
        if index < count, bytes[index] == Byte.closeBracket {
            index += 1
            depth -= 1
            return .array(elements)
        }
        while true {
            elements.append(try value())
            if try closes(with: Byte.closeBracket, expected: "',' or ']'") { return .array(elements) }
        }
    }

    /// After a member or an element: a comma (consumed, whitespace skipped; false) or the closing byte
    /// of the container (consumed, the container left; true).
    mutating func closes(with close: UInt8, expected: String) throws -> Bool {
        skipWhitespace()
        guard index < count else { throw unexpected(at: index, expected: expected) }
        switch bytes[index] {
        case Byte.comma:
            index += 1
            skipWhitespace()
            return false
        case close:
            index += 1
            depth -= 1
            return true
        default:
            throw unexpected(at: index, expected: expected)
        }
    }

    mutating func literal(_ word: StaticString) throws {
        let length = word.utf8CodeUnitCount
        let expected = word.utf8Start
        for offset in 0..<length {
            guard index + offset < count, bytes[index + offset] == expected[offset] else {
                throw unexpected(at: index + offset, expected: "'\(word)'")
            }
        }
        index += length
    }

    // MARK: Strings

    /// A string starting at the opening quote under `index`.
    mutating func string() throws -> String {
        let start = index + 1
        var position = start
        while position < count {
            let byte = bytes[position]
            if byte == Byte.quote {
                index = position + 1
                return String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self)
            }
            if byte == Byte.backslash { return try escapedString(start: start, escape: position) }
            if byte < 0x20 { throw controlCharacter(at: position) }
            position = byte < 0x80 ? position + 1 : try utf8Sequence(at: position)
        }
        throw unexpected(at: count, expected: "'\"' closing the string")
    }

    func controlCharacter(at offset: Int) -> PayloadError {
        failure("unescaped control character 0x\(Self.hex(bytes[offset])) in a string", at: offset)
    }

    /// The rest of a string that has escapes: `start` is its first byte, `escape` its first backslash.
    mutating func escapedString(start: Int, escape: Int) throws -> String {
        scratch.removeAll(keepingCapacity: true)
        var run = start
        var position = escape
        while position < count {
            let byte = bytes[position]
            if byte == Byte.quote {
                scratch.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[run..<position]))
                index = position + 1
                return String(decoding: scratch, as: UTF8.self)
            }
            if byte == Byte.backslash {
                scratch.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[run..<position]))
                position = try unescape(at: position)
                run = position
                continue
            }
            if byte < 0x20 { throw controlCharacter(at: position) }
            position = byte < 0x80 ? position + 1 : try utf8Sequence(at: position)
        }
        throw unexpected(at: count, expected: "'\"' closing the string")
    }

    /// Appends the escape at `offset` (a backslash) to `scratch`; returns the offset after it.
    mutating func unescape(at offset: Int) throws -> Int {
        guard offset + 1 < count else { throw unexpected(at: count, expected: "an escape") }
        let decoded: UInt8
        switch bytes[offset + 1] {
        case Byte.quote: decoded = Byte.quote
        case Byte.backslash: decoded = Byte.backslash
        case Byte.slash: decoded = Byte.slash
        case UInt8(ascii: "b"): decoded = 0x08
        case UInt8(ascii: "f"): decoded = 0x0C
        case UInt8(ascii: "n"): decoded = 0x0A
        case UInt8(ascii: "r"): decoded = 0x0D
        case UInt8(ascii: "t"): decoded = 0x09
        case UInt8(ascii: "u"): return try unicodeEscape(at: offset)
        default: throw failure("invalid escape sequence", at: offset)
        }
        scratch.append(decoded)
        return offset + 2
    }

    /// `\uXXXX` at `offset`, or a surrogate pair `\uD8xx\uDCxx`.
    mutating func unicodeEscape(at offset: Int) throws -> Int {
        let high = try hexQuad(at: offset + 2, escape: offset)
        var scalar = UInt32(high)
        var next = offset + 6
        switch high {
        case 0xD800...0xDBFF:
            guard next + 1 < count, bytes[next] == Byte.backslash, bytes[next + 1] == UInt8(ascii: "u") else {
                throw failure("unpaired UTF-16 surrogate in a \\u escape", at: offset)
            }
            let low = try hexQuad(at: next + 2, escape: next)
            guard (0xDC00...0xDFFF).contains(low) else {
                throw failure("unpaired UTF-16 surrogate in a \\u escape", at: offset)
            }
            scalar = 0x10000 + ((UInt32(high) - 0xD800) << 10) + (UInt32(low) - 0xDC00)
            next += 6
        case 0xDC00...0xDFFF:
            throw failure("unpaired UTF-16 surrogate in a \\u escape", at: offset)
        default:
            break
        }
        appendUTF8(scalar)
        return next
    }

    func hexQuad(at offset: Int, escape: Int) throws -> UInt16 {
        var value: UInt16 = 0
        for position in offset..<(offset + 4) {
            guard position < count else { throw unexpected(at: count, expected: "four hex digits") }
            let byte = bytes[position]
            let digit: UInt8
            switch byte {
            case Byte.zero...Byte.nine: digit = byte - Byte.zero
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: throw failure("invalid \\u escape (expected four hex digits)", at: escape)
            }
            value = value << 4 | UInt16(digit)
        }
        return value
    }

    mutating func appendUTF8(_ scalar: UInt32) {
        switch scalar {
        case 0..<0x80:
            scratch.append(UInt8(scalar))
        case 0x80..<0x800:
            scratch.append(UInt8(0xC0 | scalar >> 6))
            scratch.append(UInt8(0x80 | scalar & 0x3F))
        case 0x800..<0x10000:
            scratch.append(UInt8(0xE0 | scalar >> 12))
            scratch.append(UInt8(0x80 | scalar >> 6 & 0x3F))
            scratch.append(UInt8(0x80 | scalar & 0x3F))
        default:
            scratch.append(UInt8(0xF0 | scalar >> 18))
            scratch.append(UInt8(0x80 | scalar >> 12 & 0x3F))
            scratch.append(UInt8(0x80 | scalar >> 6 & 0x3F))
            scratch.append(UInt8(0x80 | scalar & 0x3F))
        }
    }

    /// Validates the multi-byte UTF-8 sequence starting at `offset` (Unicode 15, table 3-7: no
    /// overlong forms, no surrogates, nothing above U+10FFFF); returns the offset after it.
    @inline(__always)
    func utf8Sequence(at offset: Int) throws -> Int {
        let lead = bytes[offset]
        let length: Int
        var secondRange: ClosedRange<UInt8> = 0x80...0xBF
        switch lead {
        case 0xC2...0xDF: length = 2
        case 0xE0: length = 3; secondRange = 0xA0...0xBF
        case 0xE1...0xEC, 0xEE...0xEF: length = 3
        case 0xED: length = 3; secondRange = 0x80...0x9F
        case 0xF0: length = 4; secondRange = 0x90...0xBF
        case 0xF1...0xF3: length = 4
        case 0xF4: length = 4; secondRange = 0x80...0x8F
        default: throw failure("invalid UTF-8 in a string", at: offset)
        }
        guard offset + length <= count else { throw failure("invalid UTF-8 in a string", at: offset) }
        guard secondRange.contains(bytes[offset + 1]) else { throw failure("invalid UTF-8 in a string", at: offset) }
        for position in (offset + 2)..<(offset + length) where bytes[position] & 0xC0 != 0x80 {
            throw failure("invalid UTF-8 in a string", at: offset)
        }
        return offset + length
    }

    // MARK: Numbers

    mutating func number() throws -> Double {
        let start = index
        var position = index
        let negative = bytes[position] == Byte.minus
        if negative { position += 1 }

        // Significant digits (up to 19 fit a UInt64) and the power of ten they are scaled by.
        var mantissa: UInt64 = 0
        var significant = 0
        var scale = 0
        var exact = true

        @inline(__always)
        func isDigit(_ position: Int) -> Bool {
            position < count && bytes[position] >= Byte.zero && bytes[position] <= Byte.nine
        }
        @inline(__always)
        func accumulate(_ digit: UInt8, fraction: Bool) {
            if mantissa == 0 && digit == 0 {
                if fraction { scale -= 1 }
                return
            }
            if significant < 19 {
                mantissa = mantissa * 10 + UInt64(digit)
                significant += 1
                if fraction { scale -= 1 }
            } else {
                exact = false
                if !fraction { scale += 1 }
            }
        }

        guard isDigit(position) else { throw unexpected(at: position, expected: "a digit") }
        if bytes[position] == Byte.zero {
            position += 1
            if isDigit(position) { throw failure("leading zero in a number", at: start) }
        } else {
            while isDigit(position) {
                accumulate(bytes[position] - Byte.zero, fraction: false)
                position += 1
            }
        }
        if position < count, bytes[position] == Byte.dot {
            position += 1
            guard isDigit(position) else { throw unexpected(at: position, expected: "a digit after '.'") }
            while isDigit(position) {
                accumulate(bytes[position] - Byte.zero, fraction: true)
                position += 1
            }
        }
        var exponent = 0
        if position < count, bytes[position] == Byte.lowerE || bytes[position] == Byte.upperE {
            position += 1
            var exponentNegative = false
            if position < count, bytes[position] == Byte.minus || bytes[position] == Byte.plus {
                exponentNegative = bytes[position] == Byte.minus
                position += 1
            }
            guard isDigit(position) else { throw unexpected(at: position, expected: "a digit in the exponent") }
            while isDigit(position) {
                if exponent < 100_000 { exponent = exponent * 10 + Int(bytes[position] - Byte.zero) }
                position += 1
            }
            if exponentNegative { exponent = -exponent }
        }
        index = position

        if mantissa == 0 { return negative ? -0.0 : 0.0 }
        // Both operands exact: one IEEE operation rounds correctly.
        let power = scale + exponent
        if exact, mantissa <= 1 << 53, (-22...22).contains(power) {
            var value = Double(mantissa)
            value = power < 0 ? value / exactPowersOfTen[-power] : value * exactPowersOfTen[power]
            return negative ? -value : value
        }
        let text = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self)
        guard let value = Double(text), value.isFinite else {
            throw failure("number out of range", at: start)
        }
        return value
    }
}
