import Foundation
import HTTPTypes

/// An IPv4 or IPv6 network in CIDR notation (`35.159.1.63/32`, `10.0.0.0/8`, `::1/128`; a bare address
/// is a single host).
public struct IPNetwork: Sendable, Equatable, CustomStringConvertible {
    let bytes: [UInt8]
    let prefix: Int
    public let description: String

    public init?(_ text: String) {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        let parts = trimmed.split(separator: "/", maxSplits: 1).map(String.init)
        guard let address = parts.first, let bytes = IPNetwork.parseAddress(address) else { return nil }
        let maxPrefix = bytes.count * 8
        let prefix = parts.count == 2 ? Int(parts[1]) : maxPrefix
        guard let prefix, (0...maxPrefix).contains(prefix) else { return nil }
        self.bytes = bytes
        self.prefix = prefix
        self.description = trimmed
    }

    /// Whether `address` (textual) lies in this network. IPv4-mapped IPv6 addresses match IPv4 networks.
    public func contains(_ address: String) -> Bool {
        guard var candidate = IPNetwork.parseAddress(address) else { return false }
        if bytes.count == 4, candidate.count == 16, candidate[0..<10].allSatisfy({ $0 == 0 }),
           candidate[10] == 0xff, candidate[11] == 0xff {
            candidate = Array(candidate[12..<16])
        }
        guard candidate.count == bytes.count else { return false }
        var remaining = prefix
        for index in 0..<bytes.count where remaining > 0 {
            let bits = min(8, remaining)
            let mask = UInt8(truncatingIfNeeded: 0xff << (8 - bits))
            if candidate[index] & mask != bytes[index] & mask { return false }
            remaining -= bits
        }
        return true
    }

    static func parseAddress(_ text: String) -> [UInt8]? {
        var stripped = text
        if stripped.hasPrefix("[") && stripped.hasSuffix("]") { stripped = String(stripped.dropFirst().dropLast()) }
        if let zone = stripped.firstIndex(of: "%") { stripped = String(stripped[..<zone]) }
        var v4 = in_addr()
        if inet_pton(AF_INET, stripped, &v4) == 1 {
            return withUnsafeBytes(of: &v4) { Array($0) }
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, stripped, &v6) == 1 {
            return withUnsafeBytes(of: &v6) { Array($0) }
        }
        return nil
    }
}

/// Who is calling: the peer address, or — only when the peer is a trusted proxy — the client address
/// the proxy reports (`Forwarded: for=`, else `X-Forwarded-For`), walking from the nearest hop and
/// skipping trusted proxies.
public struct ClientAddressResolver: Sendable {
    public var trustedProxies: [IPNetwork]

    public init(trustedProxies: [IPNetwork]) {
        self.trustedProxies = trustedProxies
    }

    public func resolve(peer: String?, headers: HTTPFields) -> String? {
        guard let peer else { return nil }
        guard isTrusted(peer) else { return peer }
        var hops: [String] = []
        if let forwarded = headers[.forwarded] {
            for element in forwarded.split(separator: ",") {
                for pair in element.split(separator: ";") {
                    let kv = pair.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
                    if kv.count == 2, kv[0].lowercased() == "for" {
                        var value = kv[1].trimmingCharacters(in: CharacterSet(charactersIn: "\""))
                        if value.hasPrefix("["), let end = value.firstIndex(of: "]") {
                            value = String(value[value.index(after: value.startIndex)..<end])
                        } else if value.filter({ $0 == ":" }).count == 1, let colon = value.firstIndex(of: ":") {
                            value = String(value[..<colon])
                        }
                        hops.append(value)
                    }
                }
            }
        } else if let forwardedFor = headers[.xForwardedFor] {
            hops = forwardedFor.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        }
        for hop in hops.reversed() {
            guard IPNetwork.parseAddress(hop) != nil else { return peer }  // unparseable: do not guess
            if !isTrusted(hop) { return hop }
        }
        return hops.first ?? peer
    }

    func isTrusted(_ address: String) -> Bool {
        trustedProxies.contains { $0.contains(address) }
    }
}

extension HTTPField.Name {
    static let forwarded = Self("Forwarded")!
    static let xForwardedFor = Self("X-Forwarded-For")!
}
