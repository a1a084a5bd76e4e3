import Foundation

/// Source-side timestamps: ISO 8601 with or without fractional seconds, always with a zone.
public enum Timestamp {
    /// Parses an ISO 8601 date-time (`2025-03-14T09:21:07.412Z`, `2025-03-14T09:21:07+01:00`). Fields out
    /// of range (30 February, hour 25) are refused: Foundation would roll them over into another date,
    /// and PostgreSQL, which receives the text as written, refuses them.
    public static func parse(_ text: String) -> Date? {
        guard fieldsInRange(text) else { return nil }
        if let date = try? Date(text, strategy: withFraction) { return date }
        return try? Date(text, strategy: withoutFraction)
    }

    /// A time given on the command line: ISO 8601 as above, or as people and `psql` write it: a space
    /// for the `T`, an offset of hours alone (`+00`), no zone (UTC), or a date alone (midnight UTC).
    public static func parseArgument(_ argument: String) -> Date? {
        var text = argument.trimmingCharacters(in: .whitespaces)
        if text.utf8.count == 10 { text += "T00:00:00Z" }
        if text.utf8.count > 10, text.utf8[text.utf8.index(text.utf8.startIndex, offsetBy: 10)] == UInt8(ascii: " ") {
            text = String(text.prefix(10)) + "T" + String(text.dropFirst(11))
        }
        if let sign = text.utf8.dropLast(2).last, sign == UInt8(ascii: "+") || sign == UInt8(ascii: "-"),
           text.utf8.suffix(2).allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }), text.utf8.count > 19 {
            text += ":00"
        }
        return parse(text) ?? parse(text + "Z")
    }

    /// Formats a date for PostgreSQL `timestamptz` input, in UTC with microseconds.
    public static func format(_ date: Date) -> String {
        date.formatted(output)
    }

    private static let withFraction = Date.ISO8601FormatStyle(includingFractionalSeconds: true)
    private static let withoutFraction = Date.ISO8601FormatStyle()
    private static let output = Date.ISO8601FormatStyle(includingFractionalSeconds: true)

    /// Year 1–9999, month 1–12, a day that exists in that month, hour 0–23, minute 0–59, second 0–60 (a
    /// leap second, as PostgreSQL accepts). Text of another shape is left to the parser to refuse.
    static func fieldsInRange(_ text: String) -> Bool {
        let halves = text.split(separator: "T", maxSplits: 1, omittingEmptySubsequences: false)
        guard halves.count == 2 else { return true }
        let date = halves[0].split(separator: "-", omittingEmptySubsequences: false).map { Int($0) }
        let clock = halves[1].prefix { $0.isASCII && ($0.isNumber || $0 == ":") }
            .split(separator: ":", omittingEmptySubsequences: false).map { Int($0) }
        guard date.count == 3, let year = date[0], let month = date[1], let day = date[2] else { return true }
        guard (1...9999).contains(year), (1...12).contains(month) else { return false }
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
        let days = [31, leap ? 29 : 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month - 1]
        guard (1...days).contains(day) else { return false }
        let limits = [23, 59, 60]
        for (value, limit) in zip(clock, limits) {
            guard let value, (0...limit).contains(value) else { return false }
        }
        // A zone offset PostgreSQL takes: hours 0-15, minutes 0-59 (`+16:00` and `+00:60` are refused).
        if let sign = halves[1].lastIndex(where: { $0 == "+" || $0 == "-" }) {
            let zone = halves[1][halves[1].index(after: sign)...].split(separator: ":", omittingEmptySubsequences: false)
            let digits = zone.count == 1 && zone[0].count == 4 ? [zone[0].prefix(2), zone[0].suffix(2)] : zone
            guard let hours = digits.first.flatMap({ Int($0) }), (0...15).contains(hours) else { return false }
            if digits.count > 1 { guard let minutes = Int(digits[1]), (0...59).contains(minutes) else { return false } }
        }
        return true
    }
}
