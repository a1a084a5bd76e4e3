import ConsentCore
import Foundation
import Testing

/// The strict parser must read every valid document exactly as Foundation does, and refuse invalid
/// ones with an error naming the problem and its offset (never the body).
@Suite("JSON parser")
struct JSONParserTests {
    static let fixtureRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("../shared/spec/fixtures").standardizedFileURL

    static func fixtureFiles() -> [String] {
        let enumerator = FileManager.default.enumerator(atPath: fixtureRoot.path)
        var files: [String] = []
        while let path = enumerator?.nextObject() as? String {
            if path.hasSuffix(".json") { files.append(path) }
        }
        return files.sorted()
    }

    func foundation(_ bytes: [UInt8]) throws -> JSONValue {
        try JSONDecoder().decode(JSONValue.self, from: Data(bytes))
    }

    @Test("every fixture parses as Foundation reads it")
    func fixtures() throws {
        let files = Self.fixtureFiles()
        #expect(files.count >= 20)
        for file in files {
            let data = try Data(contentsOf: Self.fixtureRoot.appendingPathComponent(file))
            let expected = try JSONDecoder().decode(JSONValue.self, from: data)
            #expect(try JSONParser.parse(data) == expected, "\(file)")
            #expect(try JSONValue.parse(data) == expected, "\(file)")
        }
    }

    static let validDocuments: [String] = [
        #"{}"#, #"[]"#, #"  {  }  "#, "\t\r\n[ ]\n", #""""#, #""x""#, "0", "-0", "true", "false", "null",
        #"{"a":[1,2,{"b":null}],"c":{"d":true,"e":false}}"#,
        #"["\"\\\/\b\f\n\r\t"]"#,
        #"["\u0041\u00e9\u20AC\uFFFF\u0000"]"#,
        #"["\uD83D\uDE00 and \ud834\udd1e"]"#,
        #"["é€😀 日本語", "mixed \n é \u00e9 😀"]"#,
        #"{"ключ":"значение","🔑":"🗝"}"#,
        #"[1e10, 1E+2, -1.5e-3, 2.5E-300, 0.1, 3.141592653589793, 1.0, 100, 0.000001, 1e22, 1e23]"#,
        #"[1.7976931348623157e308, 5e-324, 2.2250738585072014e-308, -0.0, 0e999, 0.0e-5]"#,
        #"[9007199254740992, 9007199254740993, 123456789012345678, 12345678901234567890123, -9223372036854775808]"#,
        #"[1741946467530, 1741946467530123, 4, 17, 1234567890.0987654321, 0.30000000000000004]"#,
        #"[123456789012345678901234567890e-20, 1.00000000000000011102230246251565404236316680908203125]"#,
        #"{"version": 1741946467530, "nested": {"deep": [[[[[[[[]]]]]]]]}}"#,
        String(repeating: "[", count: 400) + String(repeating: "]", count: 400),
        String(repeating: #"{"a":"#, count: 300) + "1" + String(repeating: "}", count: 300),
    ]

    @Test("hand-written documents parse as Foundation reads them", arguments: validDocuments)
    func valid(_ text: String) throws {
        let bytes = Array(text.utf8)
        let expected = try foundation(bytes)
        #expect(try JSONParser.parse(bytes) == expected)
    }

    @Test("values are what the text says")
    func values() throws {
        #expect(try JSONParser.parse(#"["\uD83D\uDE00", "\u00e9", "a\/b"]"#) == .array([.string("😀"), .string("é"), .string("a/b")]))
        #expect(try JSONParser.parse("[9007199254740993, 1741946467530, -2.5e3]")
                == .array([.number(9007199254740992), .number(1741946467530), .number(-2500)]))
        #expect(try JSONParser.parse(#"{"a":1,"b":2,"a":3}"#) == .object(["a": .number(3), "b": .number(2)]))
        #expect(try JSONParser.parse(#""\u0000""#) == .string("\u{0}"))
        guard case .number(let zero) = try JSONParser.parse("-0") else { Issue.record("not a number"); return }
        #expect(zero == 0 && zero.sign == .minus)
    }

    @Test("nesting up to the limit is accepted, one more level is not")
    func depthLimit() throws {
        let limit = JSONParser.maxDepth
        let allowed = String(repeating: "[", count: limit) + String(repeating: "]", count: limit)
        #expect(throws: Never.self) { try JSONParser.parse(allowed) }
        let objects = String(repeating: #"{"k":"#, count: limit) + "0" + String(repeating: "}", count: limit)
        #expect(throws: Never.self) { try JSONParser.parse(objects) }
        let deeper = String(repeating: "[", count: limit + 1) + String(repeating: "]", count: limit + 1)
        #expect(throws: PayloadError.self) { try JSONParser.parse(deeper) }
    }

    @Test("every entry point reads the same bytes")
    func entryPoints() throws {
        let text = #"{"user":{"id":"é","version":4},"list":[1,2,3]}"#
        let expected = try JSONParser.parse(Array(text.utf8))
        #expect(try JSONParser.parse(Data(text.utf8)) == expected)
        #expect(try JSONParser.parse(text) == expected)
        #expect(try JSONParser.parse(("xx" + text).dropFirst(2)) == expected)
        #expect(try JSONParser.parse(Array(("xx" + text).utf8)[2...]) == expected)
        #expect(try JSONParser.parse(text.utf8.lazy.map { $0 }) == expected)
        #expect(try Array(text.utf8).withUnsafeBytes { try JSONParser.parse($0) } == expected)
        #expect(try JSONValue.parse(Data(text.utf8)) == expected)
    }

    /// Invalid documents and the offset their error must name.
    static let invalidDocuments: [(name: String, bytes: [UInt8], offset: Int)] = [
        ("empty", [], 0),
        ("only whitespace", Array("  \n".utf8), 3),
        ("truncated object", Array(#"{"a":1"#.utf8), 6),
        ("truncated key", Array(#"{"a"#.utf8), 3),
        ("truncated array", Array("[1,2".utf8), 4),
        ("truncated string", Array(#"["abc"#.utf8), 5),
        ("truncated literal", Array("tru".utf8), 3),
        ("truncated escape", Array(#""\u00"#.utf8), 5),
        ("trailing comma in object", Array(#"{"a":1,}"#.utf8), 7),
        ("trailing comma in array", Array("[1,2,]".utf8), 5),
        ("missing colon", Array(#"{"a" 1}"#.utf8), 5),
        ("missing comma", Array("[1 2]".utf8), 3),
        ("unquoted key", Array("{a:1}".utf8), 1),
        ("single quotes", Array("{'a':1}".utf8), 1),
        ("single-quoted string", Array("['a']".utf8), 1),
        ("control character in string", Array("[\"a\u{01}b\"]".utf8), 3),
        ("raw newline in string", Array("\"a\nb\"".utf8), 2),
        ("raw tab in string", Array("\"a\tb\"".utf8), 2),
        ("invalid escape", Array(#"["\x"]"#.utf8), 2),
        ("bad hex in \\u", Array(#"["\u12G4"]"#.utf8), 2),
        ("lone high surrogate", Array(#"["\uD800"]"#.utf8), 2),
        ("high surrogate then text", Array(#"["\uD800abcdef"]"#.utf8), 2),
        ("high surrogate then non-surrogate escape", Array(#"["\uD800\u0041"]"#.utf8), 2),
        ("lone low surrogate", Array(#"["\uDC00"]"#.utf8), 2),
        ("reversed surrogates", Array(#"["\uDE00\uD83D"]"#.utf8), 2),
        ("invalid UTF-8 C3 28", [0x22, 0xC3, 0x28, 0x22], 1),
        ("invalid UTF-8 FF", [0x5B, 0x22, 0x61, 0xFF, 0x22, 0x5D], 3),
        ("invalid UTF-8 after an escape", Array(#""\n"#.utf8) + [0xFF, 0x22], 3),
        ("overlong UTF-8", [0x22, 0xC0, 0xAF, 0x22], 1),
        ("UTF-8 encoded surrogate", [0x22, 0xED, 0xA0, 0x80, 0x22], 1),
        ("UTF-8 above U+10FFFF", [0x22, 0xF4, 0x90, 0x80, 0x80, 0x22], 1),
        ("truncated UTF-8 sequence", [0x22, 0xE2, 0x82], 1),
        ("byte FF outside a string", [0x5B, 0xFF, 0x5D], 1),
        ("byte order mark", [0xEF, 0xBB, 0xBF, 0x7B, 0x7D], 0),
        ("leading zero", Array("[01]".utf8), 1),
        ("negative leading zero", Array("-01".utf8), 0),
        ("leading plus", Array("+1".utf8), 0),
        ("leading dot", Array("[.5]".utf8), 1),
        ("trailing dot", Array("[1.]".utf8), 3),
        ("dot before exponent", Array("1.e5".utf8), 2),
        ("empty exponent", Array("[1e]".utf8), 3),
        ("exponent sign only", Array("1e+".utf8), 3),
        ("minus alone", Array("[-]".utf8), 2),
        ("hex number", Array("0x10".utf8), 1),
        ("NaN", Array("NaN".utf8), 0),
        ("Infinity", Array("[Infinity]".utf8), 1),
        ("negative Infinity", Array("-Infinity".utf8), 1),
        ("number too large", Array("[1e400]".utf8), 1),
        ("capitalised literal", Array("True".utf8), 0),
        ("misspelt literal", Array("nul1".utf8), 3),
        ("depth 10000", Array(String(repeating: "[", count: 10_000).utf8), 512),
        ("trailing garbage", Array("{} x".utf8), 3),
        ("two documents", Array("[1] [2]".utf8), 4),
        ("comment", Array("/* c */ {}".utf8), 0),
        ("form feed is not whitespace", [0x0C, 0x7B, 0x7D], 0),
        ("non-breaking space is not whitespace", [0x7B, 0xC2, 0xA0, 0x7D], 1),
    ]

    @Test("invalid documents are refused with the offset of the problem",
          arguments: invalidDocuments.indices)
    func invalid(_ index: Int) {
        let (name, bytes, offset) = Self.invalidDocuments[index]
        do {
            let value = try JSONParser.parse(bytes)
            Issue.record("\(name): accepted as \(value)")
        } catch let error as PayloadError {
            let message = error.message
            #expect(message.hasPrefix("body is not valid JSON: "), "\(name): \(message)")
            #expect(message.hasSuffix("at byte \(offset)") || message.contains("at byte \(offset);"),
                    "\(name): \(message)")
        } catch {
            Issue.record("\(name): \(error)")
        }
    }

    @Test("messages name the problem")
    func messages() {
        func message(_ bytes: [UInt8]) -> String {
            do { _ = try JSONParser.parse(bytes); return "accepted" } catch { return "\(error)" }
        }
        #expect(message(Array("{\"a\":1} x".utf8))
                == "body is not valid JSON: unexpected character 'x' at byte 8; expected the end of the document")
        #expect(message([0x22, 0xFF, 0x22]) == "body is not valid JSON: invalid UTF-8 in a string at byte 1")
        #expect(message(Array("[01]".utf8)) == "body is not valid JSON: leading zero in a number at byte 1")
        #expect(message(Array("[1e999]".utf8)) == "body is not valid JSON: number out of range at byte 1")
        #expect(message(Array("\"a\u{1F}\"".utf8))
                == "body is not valid JSON: unescaped control character 0x1F in a string at byte 2")
        #expect(message(Array(#"["\uDC00"]"#.utf8))
                == "body is not valid JSON: unpaired UTF-16 surrogate in a \\u escape at byte 2")
        #expect(message(Array("[1,".utf8)) == "body is not valid JSON: unexpected end of input at byte 3; expected a value")
        #expect(message(Array(String(repeating: "[", count: 600).utf8))
                == "body is not valid JSON: nesting deeper than 512 levels at byte 512")
    }

    @Test("errors never echo the body")
    func noEcho() {
        let secret = "hunter2-s3cr3t-token-value"
        let bodies: [[UInt8]] = [
            Array(#"{"password":"\#(secret)" "#.utf8),
            Array(#"{"password":"\#(secret)"} trailing \#(secret)"#.utf8),
            Array(#"{"password":"\#(secret)\x"}"#.utf8),
            Array(#"{"password":"\#(secret)"#.utf8) + [0xFF] + Array(#""}"#.utf8),
            Array(#"{"password":\#(secret)}"#.utf8),
            Array(#"{"password":"\#(secret)\uD800"}"#.utf8),
            Array("{\"\(secret)\":01}".utf8),
        ]
        for body in bodies {
            do {
                _ = try JSONValue.parse(Data(body))
                Issue.record("accepted")
            } catch {
                let message = "\(error)"
                #expect(message.hasPrefix("body is not valid JSON: "))
                #expect(!message.contains(secret) && !message.contains("hunter") && !message.contains("password"),
                        "\(message)")
            }
        }
        let change = DidomiDecoder.decode(Data(#"{"type":"user.updated","token":"\#(secret)""#.utf8), receivedAt: Date())
        #expect(change.action == .reject)
        #expect(change.reason?.contains(secret) == false)
    }

    @Test("an empty body keeps its own message")
    func emptyBody() {
        #expect(throws: PayloadError("body is empty; expected a JSON object")) { try JSONValue.parse(Data()) }
    }

    @Test("Codable round trip through Foundation")
    func codable() throws {
        let text = #"{"a":[1,2.5,"x",true,false,null,{"b":{}}],"c":"é😀","d":[]}"#
        let value = try JSONParser.parse(text)
        #expect(try JSONDecoder().decode(JSONValue.self, from: Data(text.utf8)) == value)
        #expect(try JSONDecoder().decode(JSONValue.self, from: JSONEncoder().encode(value)) == value)
        #expect(try JSONDecoder().decode([JSONValue].self, from: Data("[1,null,\"s\"]".utf8))
                == [.number(1), .null, .string("s")])
    }
}
