import Foundation

/// Source-side timestamps: ISO 8601 with or without fractional seconds, always with a zone.
public enum Timestamp {
    /// Parses an ISO 8601 date-time (`2025-03-14T09:21:07.412Z`, `2025-03-14T09:21:07+01:00`).
    public static func parse(_ text: String) -> Date? {
        if let date = try? Date(text, strategy: withFraction) { return date }
        return try? Date(text, strategy: withoutFraction)
    }

    /// Formats a date for PostgreSQL `timestamptz` input, in UTC with microseconds.
    public static func format(_ date: Date) -> String {
        date.formatted(output)
    }

    private static let withFraction = Date.ISO8601FormatStyle(includingFractionalSeconds: true)
    private static let withoutFraction = Date.ISO8601FormatStyle()
    private static let output = Date.ISO8601FormatStyle(includingFractionalSeconds: true)
}
