import Foundation

/// Why a body cannot be applied: the message names the field and the problem (it is sent to the
/// caller in the 400 response and kept with the delivery).
public struct PayloadError: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    /// A NUL a path or value carried into the message is written `\u0000`: the message is stored as text.
    public init(_ message: String) {
        self.message = message.utf8.contains(0) ? message.replacingOccurrences(of: "\u{0}", with: "\\u0000") : message
    }
    public var description: String { message }
}

/// A value at a JSON path, with typed accessors whose errors name that path.
public struct Field: Sendable {
    public let value: JSONValue?
    public let path: String

    public init(_ value: JSONValue?, path: String) {
        self.value = value
        self.path = path
    }

    public subscript(key: String) -> Field {
        Field(value?[key], path: path.isEmpty ? key : "\(path).\(key)")
    }

    /// Absent or JSON null.
    public var isMissing: Bool { value == nil || value == .null }
    public var isPresent: Bool { value != nil }

    private func wrongType(_ expected: String) -> PayloadError {
        PayloadError("field '\(path)' must be \(expected), got \(value?.typeName ?? "nothing")")
    }

    private func missing() -> PayloadError {
        PayloadError("required field '\(path)' is missing")
    }

    /// A string value. PostgreSQL text cannot hold U+0000, so a NUL in it is read as U+FFFD (free text
    /// such as labels; an identifier with one is refused, see `identifier()`).
    public func string() throws -> String {
        guard let value, value != .null else { throw missing() }
        guard case .string(let text) = value else { throw wrongType("a string") }
        return Self.withoutNUL(text)
    }

    public func optionalString() throws -> String? {
        guard let value, value != .null else { return nil }
        guard case .string(let text) = value else { throw wrongType("a string") }
        return Self.withoutNUL(text)
    }

    /// A string that names something (a regulation, a value id, a tie-break): a NUL is refused, as in
    /// `identifier()`, rather than read as U+FFFD; empty is allowed.
    public func optionalName() throws -> String? {
        guard let value, value != .null else { return nil }
        guard case .string(let text) = value else { throw wrongType("a string") }
        return try storable(text)
    }

    static func withoutNUL(_ text: String) -> String {
        text.utf8.contains(0) ? text.replacingOccurrences(of: "\u{0}", with: "\u{FFFD}") : text
    }

    /// A member name of this object used as a value (an id keyed by name), checked like a string value.
    public func storableKey(_ key: String) throws -> String {
        try self[key].storable(key)
    }

    /// PostgreSQL text cannot hold U+0000 (JSON's `\u0000`); such an identifier is named here rather
    /// than failing the whole batch in the database (or being read as another id).
    private func storable(_ text: String) throws -> String {
        guard !text.utf8.contains(0) else {
            throw PayloadError("field '\(path)' contains a NUL character (\\u0000), which cannot be stored")
        }
        return text
    }

    /// A non-empty identifier: a string (a number is the wrong type: `1e2`, `100.0` and `100` would
    /// all name one id, and `-0`, `0` and `1e-400` another).
    public func identifier() throws -> String {
        guard let value, value != .null else { throw missing() }
        switch value {
        case .string(let text) where !text.isEmpty: return try storable(text)
        case .string: throw PayloadError("field '\(path)' must not be empty")
        default: throw wrongType("a string")
        }
    }

    public func int64() throws -> Int64 {
        guard let value, value != .null else { throw missing() }
        switch value {
        case .number(let number) where number.isExactWholeNumber:
            return Int64(number)
        default:
            throw wrongType("an integer")
        }
    }

    public func optionalInt64() throws -> Int64? {
        isMissing ? nil : try int64()
    }

    /// A validated ISO 8601 timestamp, kept as the platform wrote it (no precision lost on the way to
    /// PostgreSQL).
    public func timestamp() throws -> String {
        let text = try string()
        guard Timestamp.parse(text) != nil else {
            throw PayloadError("field '\(path)' is not an ISO 8601 timestamp: '\(text.prefix(64))'")
        }
        return text
    }

    public func optionalTimestamp() throws -> String? {
        isMissing ? nil : try timestamp()
    }

    /// `true`/`false`, or nil for JSON null; absent is nil too (use `isPresent` to tell).
    public func optionalBool() throws -> Bool? {
        guard let value, value != .null else { return nil }
        guard case .bool(let flag) = value else { throw wrongType("a boolean or null") }
        return flag
    }

    public func object() throws -> [String: JSONValue] {
        guard let value, value != .null else { throw missing() }
        guard case .object(let members) = value else { throw wrongType("an object") }
        return members
    }

    public func optionalObject() throws -> [String: JSONValue]? {
        isMissing ? nil : try object()
    }

    public func optionalArray() throws -> [JSONValue]? {
        guard let value, value != .null else { return nil }
        guard case .array(let elements) = value else { throw wrongType("an array") }
        return elements
    }

    /// The element at `index` of this array field.
    public func indexed(_ index: Int, _ element: JSONValue) -> Field {
        Field(element, path: "\(path)[\(index)]")
    }

    /// An array of ids (absent or null = empty). Lists of vendor ids may carry IAB vendors as numbers:
    /// a whole number a double holds exactly is taken in decimal.
    public func stringArray() throws -> [String] {
        guard let elements = try optionalArray() else { return [] }
        return try elements.enumerated().map { index, element in
            let field = indexed(index, element)
            if case .number(let number) = element {
                guard number.isExactWholeNumber && number >= 0 else {
                    throw PayloadError("field '\(field.path)' must be a string or a whole number, got \(number)")
                }
                return String(Int64(number))
            }
            return try field.identifier()
        }
    }
}

extension Double {
    /// Whole and within ±2^53, so the conversion to Int64 neither traps nor rounds.
    var isExactWholeNumber: Bool {
        self == rounded(.towardZero) && abs(self) <= 9_007_199_254_740_992
    }
}

extension JSONValue {
    /// Parses a request body. Errors say what is wrong without echoing the body.
    public static func parse(_ body: Data) throws -> JSONValue {
        guard !body.isEmpty else { throw PayloadError("body is empty; expected a JSON object") }
        return try JSONParser.parse(body)
    }
}
