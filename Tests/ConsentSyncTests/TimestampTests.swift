import ConsentCore
import Foundation
import Testing

/// Source-side timestamps must mean the same in Swift and in PostgreSQL, which receives them as written.
@Suite("Timestamps")
struct TimestampTests {
    @Test("real dates parse, with or without fraction and with an offset; leap days and a leap second are real")
    func valid() {
        #expect(Timestamp.parse("2025-03-14T09:21:07.412Z") == Date(timeIntervalSince1970: 1_741_944_067.412))
        #expect(Timestamp.parse("2025-03-14T09:21:07Z") == Date(timeIntervalSince1970: 1_741_944_067))
        #expect(Timestamp.parse("2025-03-14T10:21:07+01:00") == Date(timeIntervalSince1970: 1_741_944_067))
        #expect(Timestamp.parse("2024-02-29T00:00:00Z") != nil)
        #expect(Timestamp.parse("2000-02-29T00:00:00Z") != nil)
        #expect(Timestamp.parse("2025-12-31T23:59:60Z") != nil)
        #expect(Timestamp.parse("2025-03-14T23:21:07+14:00") != nil)
        #expect(Timestamp.parse("2025-03-14T00:21:07-09:30") != nil)
    }

    @Test("command-line times: ISO 8601, psql's form, no zone (UTC) and a date alone (midnight UTC)")
    func arguments() {
        let midnight = Date(timeIntervalSince1970: 1_748_736_000)  // 2025-06-01T00:00:00Z
        for text in ["2025-06-01T00:00:00Z", "2025-06-01", "2025-06-01 00:00:00+00", "2025-06-01 02:00:00+02",
                     "2025-06-01T00:00:00", "2025-06-01 00:00:00", "2025-05-31T19:00:00-05:00", " 2025-06-01 "] {
            #expect(Timestamp.parseArgument(text) == midnight, "\(text)")
        }
        #expect(Timestamp.parseArgument("2025-06-01 00:00:00.250+00") == midnight.addingTimeInterval(0.25))
        for text in ["yesterday", "2025-06-31", "2025-06-01 25:00:00", "", "06/01/2025"] {
            #expect(Timestamp.parseArgument(text) == nil, "\(text)")
        }
    }

    @Test("dates that do not exist are refused instead of rolling over into another day")
    func outOfRange() {
        for text in ["2025-02-29T00:00:00Z", "1900-02-29T00:00:00Z", "2025-02-30T00:00:00Z", "2025-04-31T00:00:00Z",
                     "2025-13-01T00:00:00Z", "2025-00-10T00:00:00Z", "2025-03-00T00:00:00Z", "2025-03-14T24:00:00Z",
                     "2025-03-14T23:60:00Z", "2025-03-14T23:59:61Z", "0000-01-01T00:00:00Z", "yesterday", "",
                     "2025-03-14T10:00:00+16:00", "2025-03-14T10:00:00-18:59", "2025-03-14T10:00:00+00:60"] {
            #expect(Timestamp.parse(text) == nil, "\(text)")
        }
    }
}
