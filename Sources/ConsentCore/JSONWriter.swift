/// Writes compact JSON text into a byte array: the apply path's batch encoding without `JSONEncoder`.
///
/// Separators are implied: before a key or a value, a comma is written unless the previous byte opens
/// a container or ends a key (a completed value never ends in `{`, `[` or `:`).
///
/// U+0000 is written as U+FFFD: the text goes to PostgreSQL `jsonb`, which cannot hold `\u0000` (ids
/// with one are refused when decoding; in free text such as event metadata or a citizen email, the raw
/// body kept with the delivery still has it).
public struct JSONWriter: Sendable {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 1024) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    @inline(__always)
    private mutating func separate() {
        guard let last = bytes.last else { return }
        if last != UInt8(ascii: "{") && last != UInt8(ascii: "[") && last != UInt8(ascii: ":") {
            bytes.append(UInt8(ascii: ","))
        }
    }

    public mutating func beginObject() {
        separate()
        bytes.append(UInt8(ascii: "{"))
    }

    public mutating func endObject() { bytes.append(UInt8(ascii: "}")) }

    public mutating func beginArray() {
        separate()
        bytes.append(UInt8(ascii: "["))
    }

    public mutating func endArray() { bytes.append(UInt8(ascii: "]")) }

    /// An object key known to need no escaping (the writer's own field names).
    public mutating func key(_ name: StaticString) {
        separate()
        bytes.append(UInt8(ascii: "\""))
        bytes.append(contentsOf: UnsafeBufferPointer(start: name.utf8Start, count: name.utf8CodeUnitCount))
        bytes.append(UInt8(ascii: "\""))
        bytes.append(UInt8(ascii: ":"))
    }

    /// An object key from data, escaped.
    public mutating func key(_ name: String) {
        separate()
        appendQuoted(name)
        bytes.append(UInt8(ascii: ":"))
    }

    public mutating func string(_ text: String) {
        separate()
        appendQuoted(text)
    }

    public mutating func bool(_ flag: Bool) {
        separate()
        appendLiteral(flag ? "true" : "false")
    }

    public mutating func null() {
        separate()
        appendLiteral("null")
    }

    public mutating func integer(_ number: Int64) {
        separate()
        appendDecimal(number)
    }

    /// Integral values within ±2^53 without a fraction; others in Swift's shortest round-trip form;
    /// non-finite values (which JSON cannot carry) as null.
    public mutating func number(_ number: Double) {
        separate()
        if !number.isFinite {
            appendLiteral("null")
        } else if number.isExactWholeNumber {
            appendDecimal(Int64(number))
        } else {
            bytes.append(contentsOf: number.description.utf8)
        }
    }

    public mutating func value(_ value: JSONValue) {
        switch value {
        case .null: null()
        case .bool(let flag): bool(flag)
        case .number(let number): self.number(number)
        case .string(let text): string(text)
        case .array(let elements):
            beginArray()
            for element in elements { self.value(element) }
            endArray()
        case .object(let members):
            beginObject()
            for (name, member) in members {
                key(name)
                self.value(member)
            }
            endObject()
        }
    }

    public mutating func strings(_ texts: [String]) {
        beginArray()
        for text in texts { string(text) }
        endArray()
    }

    public mutating func object(_ members: [String: String]) {
        beginObject()
        for (name, text) in members {
            key(name)
            string(text)
        }
        endObject()
    }

    // MARK: Optional members (absent when nil, as `JSONEncoder` leaves them out)

    public mutating func member(_ name: StaticString, _ text: String?) {
        guard let text else { return }
        key(name)
        string(text)
    }

    public mutating func member(_ name: StaticString, _ number: Int64?) {
        guard let number else { return }
        key(name)
        integer(number)
    }

    public mutating func member(_ name: StaticString, _ json: JSONValue?) {
        guard let json else { return }
        key(name)
        value(json)
    }

    // MARK: Text

    private mutating func appendLiteral(_ word: StaticString) {
        bytes.append(contentsOf: UnsafeBufferPointer(start: word.utf8Start, count: word.utf8CodeUnitCount))
    }

    private mutating func appendDecimal(_ number: Int64) {
        if number >= 0 && number < 10 {
            bytes.append(UInt8(ascii: "0") + UInt8(number))
            return
        }
        var magnitude = number.magnitude
        var digits: (UInt64, UInt64, UInt64) = (0, 0, 0)  // 24 bytes: room for 20 digits
        let count = withUnsafeMutableBytes(of: &digits) { buffer -> Int in
            var position = buffer.count
            repeat {
                position -= 1
                buffer[position] = UInt8(ascii: "0") + UInt8(magnitude % 10)
                magnitude /= 10
            } while magnitude != 0
            return buffer.count - position
        }
        if number < 0 { bytes.append(UInt8(ascii: "-")) }
        withUnsafeBytes(of: &digits) { buffer in
            bytes.append(contentsOf: UnsafeRawBufferPointer(rebasing: buffer[(buffer.count - count)...]))
        }
    }

    private mutating func appendQuoted(_ text: String) {
        bytes.append(UInt8(ascii: "\""))
        var text = text
        text.withUTF8 { utf8 in
            var run = 0
            for position in 0..<utf8.count {
                let byte = utf8[position]
                guard byte < 0x20 || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") else { continue }
                bytes.append(contentsOf: UnsafeBufferPointer(rebasing: utf8[run..<position]))
                appendEscape(byte)
                run = position + 1
            }
            bytes.append(contentsOf: UnsafeBufferPointer(rebasing: utf8[run..<utf8.count]))
        }
        bytes.append(UInt8(ascii: "\""))
    }

    private mutating func appendEscape(_ byte: UInt8) {
        bytes.append(UInt8(ascii: "\\"))
        switch byte {
        case UInt8(ascii: "\""), UInt8(ascii: "\\"): bytes.append(byte)
        case 0x08: bytes.append(UInt8(ascii: "b"))
        case 0x0C: bytes.append(UInt8(ascii: "f"))
        case 0x0A: bytes.append(UInt8(ascii: "n"))
        case 0x0D: bytes.append(UInt8(ascii: "r"))
        case 0x09: bytes.append(UInt8(ascii: "t"))
        case 0x00: bytes.append(contentsOf: [UInt8(ascii: "u"), UInt8(ascii: "f"), UInt8(ascii: "f"), UInt8(ascii: "f"), UInt8(ascii: "d")])
        default:
            let hex: StaticString = "0123456789abcdef"
            bytes.append(contentsOf: [UInt8(ascii: "u"), UInt8(ascii: "0"), UInt8(ascii: "0"),
                                      hex.utf8Start[Int(byte >> 4)], hex.utf8Start[Int(byte & 0x0F)]])
        }
    }
}

extension ChangeSet {
    /// A batch as the JSON array `consent.apply_batch` reads: the same members as the `Encodable`
    /// conformance (nil optionals left out).
    public static func jsonArray(_ changes: some Sequence<ChangeSet>, capacity: Int = 2048) -> [UInt8] {
        var writer = JSONWriter(capacity: capacity)
        writer.beginArray()
        for change in changes { change.write(to: &writer) }
        writer.endArray()
        return writer.bytes
    }

    /// This change set as one JSON object.
    public func write(to writer: inout JSONWriter) {
        writer.beginObject()
        writer.key("endpoint"); writer.string(endpoint)
        writer.key("source"); writer.string(source)
        writer.key("action"); writer.string(action.rawValue)
        writer.member("reason", reason)
        writer.member("tenant", tenant)
        writer.member("user", user)
        writer.member("type", type)
        writer.member("key", key)
        writer.member("regulation", regulation)
        writer.member("at", at)
        writer.member("at2", at2)
        writer.member("tie", tie)
        writer.member("cause", cause)
        if let userInfo {
            writer.key("user_info")
            userInfo.write(to: &writer)
        }
        if let event {
            writer.key("event")
            event.write(to: &writer)
        }
        writer.key("items")
        writer.beginArray()
        for item in items { item.write(to: &writer) }
        writer.endArray()
        writer.key("prefs")
        writer.beginArray()
        for pref in prefs { pref.write(to: &writer) }
        writer.endArray()
        if let replaces {
            writer.key("replaces")
            writer.strings(replaces)
        }
        writer.member("email", email)
        writer.member("request_id", requestID)
        writer.member("remote_addr", remoteAddress)
        if let headers {
            writer.key("headers")
            writer.object(headers)
        }
        writer.member("received_at", receivedAt)
        writer.member("principal", principal)
        writer.endObject()
    }
}

extension ChangeSet.UserInfo {
    public func write(to writer: inout JSONWriter) {
        writer.beginObject()
        writer.member("external_ref", externalRef)
        writer.member("external_ref_type", externalRefType)
        writer.member("country", country)
        writer.member("last_seen_country", lastSeenCountry)
        writer.member("metadata", metadata)
        writer.member("created_at", createdAt)
        writer.member("updated_at", updatedAt)
        writer.member("version", version)
        writer.endObject()
    }
}

extension ChangeSet.EventInfo {
    public func write(to writer: inout JSONWriter) {
        writer.beginObject()
        writer.key("id"); writer.string(id)
        writer.member("status", status)
        writer.member("old_status", oldStatus)
        writer.key("created_at"); writer.string(createdAt)
        writer.member("updated_at", updatedAt)
        writer.member("consents", consents)
        writer.key("proofs_id"); writer.strings(proofsID)
        writer.member("delegate", delegate)
        writer.endObject()
    }
}

extension ChangeSet.Item {
    public func write(to writer: inout JSONWriter) {
        writer.beginObject()
        writer.key("kind"); writer.string(kind)
        writer.key("id"); writer.string(id)
        writer.key("basis"); writer.string(basis.rawValue)
        writer.key("status"); writer.string(status.rawValue)
        writer.member("raw", raw)
        writer.member("option_type", optionType)
        writer.member("valid_from", validFrom)
        writer.member("valid_until", validUntil)
        writer.member("at", at)
        writer.member("at2", at2)
        writer.member("tie", tie)
        writer.member("cause", cause)
        writer.member("provenance", provenance)
        writer.endObject()
    }
}

extension ChangeSet.Preference {
    public func write(to writer: inout JSONWriter) {
        writer.beginObject()
        writer.member("purpose", purpose)
        writer.key("pref"); writer.string(pref)
        writer.key("values"); writer.strings(values)
        writer.member("at", at)
        writer.member("at2", at2)
        writer.member("tie", tie)
        writer.member("cause", cause)
        writer.member("provenance", provenance)
        writer.endObject()
    }
}
