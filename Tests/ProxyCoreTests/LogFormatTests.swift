import Foundation
import Logging
import Synchronization
import Testing

@testable import ProxyCore

@Suite("LineLogHandler.render")
struct LogFormatTests {
    // MARK: logfmt

    @Test("plain values are written bare")
    func logfmtPlain() {
        let line = LineLogHandler.render(
            [("level", "info"), ("msg", "request"), ("path", "/rooms/42?x"), ("ms", "1.5")], format: .logfmt)
        #expect(line == "level=info msg=request path=/rooms/42?x ms=1.5")
    }

    @Test(
        "values that need quoting",
        arguments: [
            ("", #""""#),
            ("has space", #""has space""#),
            ("a=b", #""a=b""#),
            (#"say "hi""#, #""say \"hi\"""#),
            (#"C:\dir"#, #""C:\\dir""#),
            ("two\nlines", #""two\nlines""#),
            (#"\"#, #""\\""#),
            (#"mix "q" \ = x"#, #""mix \"q\" \\ = x""#),
        ]
    )
    func logfmtQuoted(value: String, expected: String) {
        #expect(LineLogHandler.render([("k", value)], format: .logfmt) == "k=\(expected)")
    }

    @Test(
        "control characters are quoted and escaped, so a value stays one value on one line",
        arguments: [
            ("a\tb", #""a\tb""#),
            ("a\rb", #""a\rb""#),
            ("a\r\nb", #""a\r\nb""#),
            ("bell\u{07}", #""bell\u0007""#),
            ("\u{1B}[31mred", #""\u001b[31mred""#),
        ]
    )
    func logfmtControlCharacters(value: String, expected: String) {
        let line = LineLogHandler.render([("k", value), ("next", "v")], format: .logfmt)
        #expect(line == "k=\(expected) next=v")
        #expect(!line.unicodeScalars.contains { $0.value < 0x20 })
    }

    @Test("non-ASCII text is written as is")
    func logfmtUnicode() {
        #expect(LineLogHandler.render([("city", "Zürich"), ("e", "🎉")], format: .logfmt) == "city=Zürich e=🎉")
    }

    // MARK: JSON

    @Test("JSON output is exact for plain fields")
    func jsonPlain() {
        let line = LineLogHandler.render([("level", "info"), ("msg", "request"), ("status", "200")], format: .json)
        #expect(line == #"{"level":"info","msg":"request","status":"200"}"#)
    }

    @Test("JSON escapes quotes, backslashes, newlines and control characters")
    func jsonEscapes() {
        let line = LineLogHandler.render(
            [("q", #"say "hi""#), ("b", #"C:\dir"#), ("n", "a\nb"), ("r", "a\rb"), ("t", "a\tb"), ("c", "\u{01}\u{1F}")],
            format: .json)
        #expect(
            line == #"{"q":"say \"hi\"","b":"C:\\dir","n":"a\nb","r":"a\rb","t":"a\tb","c":"\u0001\u001f"}"#)
    }

    @Test("JSON output parses back to the same fields")
    func jsonRoundTrip() throws {
        var awkward = ""
        for value in 0..<0x20 { awkward.unicodeScalars.append(Unicode.Scalar(UInt8(value))) }
        let fields: [(String, String)] = [
            ("msg", "quote \" backslash \\ slash / newline \n tab \t"),
            ("controls", awkward),
            ("unicode", "Zürich 🎉 \u{2028} \u{7F}"),
            ("empty", ""),
            ("key \"with\" quotes\n", "v"),
        ]
        let line = LineLogHandler.render(fields, format: .json)
        #expect(!line.contains("\n"))
        let parsed = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String]
        #expect(parsed == Dictionary(uniqueKeysWithValues: fields))
    }

    @Test("the handler writes one line with level, logger, message and sorted metadata")
    func handlerWritesLine() throws {
        let sink = LineSink()
        var handler = LineLogHandler(label: "test.logger", level: .info, format: .json) { sink.append($0) }
        handler[metadataKey: "zone"] = "eu"
        let configured = handler
        let logger = Logger(label: "test.logger") { _ in configured }
        logger.info("hello \"world\"", metadata: ["b": "2", "a": "1"])
        logger.debug("below the level")

        let lines = sink.lines
        #expect(lines.count == 1)
        let line = try #require(lines.first)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String])
        #expect(object["level"] == "info")
        #expect(object["logger"] == "test.logger")
        #expect(object["msg"] == "hello \"world\"")
        #expect(object["a"] == "1" && object["b"] == "2" && object["zone"] == "eu")
        #expect(object["ts"]?.isEmpty == false)
        // Metadata keys follow the fixed fields, sorted.
        let a = try #require(line.range(of: #""a":"#))
        let b = try #require(line.range(of: #""b":"#))
        let zone = try #require(line.range(of: #""zone":"#))
        #expect(a.lowerBound < b.lowerBound && b.lowerBound < zone.lowerBound)
        #expect(line.hasPrefix(#"{"ts":"#))
    }
}

private final class LineSink: Sendable {
    private let storage = Mutex<[String]>([])

    var lines: [String] { self.storage.withLock { $0 } }

    func append(_ line: String) {
        self.storage.withLock { $0.append(line) }
    }
}
