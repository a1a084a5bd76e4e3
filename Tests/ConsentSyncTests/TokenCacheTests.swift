@testable import ConsentServer
import Foundation
import Testing

/// Issued tokens are remembered by their digest for a short while, so that a burst of deliveries
/// does not look the same token up in the database each time.
@Suite("Token cache")
struct TokenCacheTests {
    @Test("a stored token is found by its digest until it expires; other tokens are not")
    func lookup() async {
        let cache = TokenCache(ttl: .seconds(60))
        await cache.store("token-a", clientID: "client-a", expiresAt: Date().addingTimeInterval(3600))
        await cache.store("token-b", clientID: "client-b", expiresAt: Date().addingTimeInterval(-1))
        #expect(await cache.lookup("token-a") == "client-a")
        #expect(await cache.lookup("token-a ") == nil)
        #expect(await cache.lookup("token-b") == nil)
        #expect(await cache.lookup("") == nil)
    }

    @Test("a zero time to live disables the cache")
    func disabled() async {
        let cache = TokenCache(ttl: .zero)
        await cache.store("token-a", clientID: "client-a", expiresAt: Date().addingTimeInterval(3600))
        #expect(await cache.lookup("token-a") == nil)
    }

    @Test("keys are the SHA-256 digest of the token")
    func keys() {
        // SHA-256("abc") = ba7816bf 8f01cfea 414140de 5dae2223 b00361a3 96177a9c b410ff61 f20015ad
        let key = TokenCache.key("abc")
        var bytes: [UInt8] = []
        for word in [key.w0, key.w1, key.w2, key.w3] {
            withUnsafeBytes(of: word) { bytes.append(contentsOf: $0) }
        }
        let hex = bytes.map { byte -> String in
            let digits = String(byte, radix: 16)
            return digits.count == 1 ? "0" + digits : digits
        }.joined()
        #expect(hex == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(TokenCache.key("abc") == TokenCache.key(String("xabc".dropFirst())))
        #expect(TokenCache.key("abc") != TokenCache.key("abd"))
        let long = String(repeating: "é", count: 500)
        #expect(TokenCache.key(long) == TokenCache.key(String(repeating: "é", count: 500)))
    }
}
