import NIOHTTP1
import Testing

@testable import ProxyCore

private func head(
    _ headers: [(String, String)],
    method: HTTPMethod = .POST,
    version: HTTPVersion = .http1_1
) -> HTTPRequestHead {
    HTTPRequestHead(version: version, method: method, uri: "/", headers: HTTPHeaders(headers))
}

private func framing(_ head: HTTPRequestHead) -> Result<RequestFraming, RequestRejection> {
    Result { () throws(RequestRejection) in try RequestValidator.framing(of: head) }
}

@Suite("RequestValidator")
struct RequestValidatorTests {
    // MARK: Framing that is accepted

    @Test("no body fields → .none")
    func noFraming() {
        #expect(framing(head([("Host", "h")], method: .GET)) == .success(.none))
    }

    @Test("plain chunked on HTTP/1.1 → .chunked, case-insensitively")
    func chunked() {
        #expect(framing(head([("Transfer-Encoding", "chunked")])) == .success(.chunked))
        #expect(framing(head([("transfer-encoding", "Chunked")])) == .success(.chunked))
    }

    @Test(
        "valid Content-Length",
        arguments: [
            ("0", 0),
            ("5", 5),
            ("007", 7),
            ("1048576", 1_048_576),
            ("999999999999999999", 999_999_999_999_999_999),
        ]
    )
    func validContentLength(raw: String, expected: Int) {
        #expect(framing(head([("Content-Length", raw)])) == .success(.contentLength(expected)))
    }

    @Test("equal duplicate Content-Lengths are accepted, as two fields or as one list")
    func equalDuplicateContentLengths() {
        #expect(framing(head([("Content-Length", "5"), ("content-length", "5")])) == .success(.contentLength(5)))
        #expect(framing(head([("Content-Length", "5, 5")])) == .success(.contentLength(5)))
    }

    // MARK: Smuggling vectors

    @Test("Content-Length together with Transfer-Encoding → conflictingFraming")
    func contentLengthAndTransferEncoding() {
        #expect(
            framing(head([("Content-Length", "5"), ("Transfer-Encoding", "chunked")]))
                == .failure(.conflictingFraming))
        #expect(
            framing(head([("Transfer-Encoding", "gzip"), ("Content-Length", "5")])) == .failure(.conflictingFraming))
    }

    @Test(
        "Transfer-Encoding other than a single plain chunked → unsupportedTransferEncoding",
        arguments: [
            [("Transfer-Encoding", "gzip, chunked")],
            [("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")],
            [("Transfer-Encoding", "chunked, identity")],
            [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "identity")],
            [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
            [("Transfer-Encoding", "xchunked")],
            [("Transfer-Encoding", "chunkedx")],
            [("Transfer-Encoding", "identity")],
            [("Transfer-Encoding", "\"chunked\"")],
        ]
    )
    func unsupportedTransferEncoding(fields: [(String, String)]) {
        #expect(framing(head(fields)) == .failure(.unsupportedTransferEncoding))
    }

    @Test("Transfer-Encoding on HTTP/1.0 → unsupportedTransferEncoding")
    func transferEncodingOnHTTP10() {
        #expect(
            framing(head([("Transfer-Encoding", "chunked")], version: .http1_0))
                == .failure(.unsupportedTransferEncoding))
    }

    @Test(
        "malformed Content-Length → invalidContentLength",
        arguments: [
            "+5", "-1", "5a", "a5", "0x10", "5.0", "5 5", "1e3", "٥",
            "9223372036854775807",  // Int.max: more digits than accepted
            "99999999999999999999",
            "340282366920938463463374607431768211456",
        ]
    )
    func invalidContentLength(raw: String) {
        #expect(framing(head([("Content-Length", raw)])) == .failure(.invalidContentLength))
    }

    @Test("differing duplicate Content-Lengths → invalidContentLength", arguments: [
        [("Content-Length", "5"), ("Content-Length", "6")],
        [("Content-Length", "5, 6")],
        [("Content-Length", "5"), ("Content-Length", "5"), ("Content-Length", "50")],
        [("Content-Length", "5"), ("Content-Length", "+5")],
    ])
    func differingContentLengths(fields: [(String, String)]) {
        #expect(framing(head(fields)) == .failure(.invalidContentLength))
    }

    @Test("parseContentLength accepts only plain digits")
    func parseContentLengthDigitsOnly() {
        #expect(RequestValidator.parseContentLength(" 5") == nil)
        #expect(RequestValidator.parseContentLength("5 ") == nil)
        #expect(RequestValidator.parseContentLength("") == nil)
        #expect(RequestValidator.parseContentLength("+5") == nil)
        #expect(RequestValidator.parseContentLength("-1") == nil)
        #expect(RequestValidator.parseContentLength("12") == 12)
    }

    @Test("whitespace around a Content-Length value is optional whitespace, not part of the value")
    func contentLengthSurroundingWhitespace() {
        // RFC 9110 §5.5: leading and trailing OWS is not part of a field value, and NIO's parser strips it, so
        // " 5" as stored in HTTPHeaders is the same field as `Content-Length:  5` on the wire. Inner junk is not.
        #expect(framing(head([("Content-Length", " 5")])) == .success(.contentLength(5)))
        #expect(framing(head([("Content-Length", " 5 x")])) == .failure(.invalidContentLength))
    }

    @Test(
        "a Transfer-Encoding or Content-Length field with no list elements is not the same as no field",
        arguments: [
            ([("Transfer-Encoding", ""), ("Content-Length", "5")], RequestRejection.conflictingFraming),
            ([("Transfer-Encoding", ","), ("Content-Length", "5")], .conflictingFraming),
            ([("Transfer-Encoding", "")], .unsupportedTransferEncoding),
            ([("Transfer-Encoding", " , ")], .unsupportedTransferEncoding),
            ([("Content-Length", "")], .invalidContentLength),
            ([("Content-Length", ",")], .invalidContentLength),
            ([("Content-Length", "5"), ("Content-Length", "")], .invalidContentLength),
        ]
    )
    func emptyFramingFields(fields: [(String, String)], expected: RequestRejection) {
        #expect(framing(head(fields)) == .failure(expected))
        #expect(framing(head(fields, method: .GET)) == .failure(expected))
    }

    // MARK: Host

    @Test("HTTP/1.1 without Host → missingHost")
    func missingHost() {
        #expect(throws: RequestRejection.missingHost) {
            try RequestValidator.validateHost(of: head([("Accept", "*/*")], method: .GET))
        }
    }

    @Test("more than one Host → multipleHosts, on either version")
    func multipleHosts() {
        #expect(throws: RequestRejection.multipleHosts) {
            try RequestValidator.validateHost(of: head([("Host", "a.example"), ("Host", "b.example")]))
        }
        #expect(throws: RequestRejection.multipleHosts) {
            try RequestValidator.validateHost(
                of: head([("Host", "a.example"), ("host", "a.example")], version: .http1_0))
        }
    }

    @Test("one Host on HTTP/1.1, or none on HTTP/1.0, is fine")
    func hostAccepted() {
        #expect(throws: Never.self) {
            try RequestValidator.validateHost(of: head([("Host", "a.example:8080")]))
        }
        #expect(throws: Never.self) {
            try RequestValidator.validateHost(of: head([], version: .http1_0))
        }
    }

    // MARK: Upgrade

    @Test("a well-formed upgrade request yields its protocol")
    func upgradeProtocol() {
        let ws = head([("Host", "h"), ("Connection", "keep-alive, Upgrade"), ("Upgrade", "websocket")], method: .GET)
        #expect(RequestValidator.upgradeProtocol(of: ws) == "websocket")
        let lower = head([("Host", "h"), ("connection", "upgrade"), ("upgrade", "WebSocket")], method: .GET)
        #expect(RequestValidator.upgradeProtocol(of: lower) == "WebSocket")
    }

    @Test(
        "not an upgrade",
        arguments: [
            // Upgrade without the Connection token.
            (HTTPVersion.http1_1, [("Host", "h"), ("Upgrade", "websocket")]),
            // Connection token without Upgrade.
            (.http1_1, [("Host", "h"), ("Connection", "upgrade")]),
            // Empty Upgrade.
            (.http1_1, [("Host", "h"), ("Connection", "upgrade"), ("Upgrade", "")]),
            // HTTP/1.0 cannot upgrade.
            (.http1_0, [("Host", "h"), ("Connection", "upgrade"), ("Upgrade", "websocket")]),
            // A token that merely contains "upgrade".
            (.http1_1, [("Host", "h"), ("Connection", "upgraded"), ("Upgrade", "websocket")]),
        ]
    )
    func notUpgrade(version: HTTPVersion, fields: [(String, String)]) {
        #expect(RequestValidator.upgradeProtocol(of: head(fields, method: .GET, version: version)) == nil)
    }

    @Test("every rejection has its own reason")
    func reasons() {
        let all: [RequestRejection] = [
            .conflictingFraming, .invalidContentLength, .unsupportedTransferEncoding, .missingHost, .multipleHosts,
        ]
        #expect(Set(all.map(\.reason)).count == all.count)
        #expect(RequestRejection.missingHost.reason == "bad request: missing Host header")
    }
}
