@testable import ConsentServer
import HTTPTypes
import Testing

/// The request path reads a few header values by hand: the bearer token and the media type.
@Suite("Header parsing")
struct HeaderParsingTests {
    @Test("a bearer token is read without the surrounding spaces and tabs; other schemes and empty tokens are none")
    func bearer() {
        func token(_ value: String) -> String? {
            var fields = HTTPFields()
            fields[.authorization] = value
            return Authenticator.bearer(fields)
        }
        #expect(token("Bearer abc.def") == "abc.def")
        #expect(token("bearer \tabc.def \t") == "abc.def")
        #expect(token("BEARER abc") == "abc")
        #expect(token("Basic YWJjOmRlZg==") == nil)
        #expect(token("Bearer") == nil)
        #expect(token("Bearer  \t ") == nil)
        #expect(Authenticator.bearer(HTTPFields()) == nil)
    }

    @Test("JSON media types are recognised whatever the case, the spacing and the parameters")
    func mediaType() {
        #expect(WebhookController.isJSON("application/json"))
        #expect(WebhookController.isJSON(" Application/JSON ; charset=utf-8"))
        #expect(WebhookController.isJSON("application/problem+json"))
        #expect(WebhookController.isJSON("\tapplication/json\t"))
        #expect(!WebhookController.isJSON("text/plain"))
        #expect(!WebhookController.isJSON("application/jsonx"))
        #expect(!WebhookController.isJSON(""))
    }

    @Test("trimming removes only spaces and tabs at either end")
    func trimming() {
        #expect(Substring(" \t a b \t ").trimmingHTTPWhitespace == "a b")
        #expect(Substring("").trimmingHTTPWhitespace == "")
        #expect(Substring(" \t ").trimmingHTTPWhitespace == "")
        #expect(Substring("\u{00A0}x\u{00A0}").trimmingHTTPWhitespace == "\u{00A0}x\u{00A0}")
    }
}
