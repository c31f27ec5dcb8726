import NIOHTTP1
import Testing

@testable import ProxyCore

/// The header fields as an ordered list of `[name, value]` pairs, so a test can assert the exact result.
private func fields(_ headers: HTTPHeaders) -> [[String]] {
    headers.map { [$0.name, $0.value] }
}

private func request(
    _ method: HTTPMethod = .GET,
    _ uri: String = "/",
    version: HTTPVersion = .http1_1,
    _ headers: [(String, String)]
) -> HTTPRequestHead {
    HTTPRequestHead(version: version, method: method, uri: uri, headers: HTTPHeaders(headers))
}

private func request(_ headers: [(String, String)]) -> HTTPRequestHead {
    request(.GET, "/", headers)
}

private func response(
    _ status: HTTPResponseStatus,
    version: HTTPVersion = .http1_1,
    _ headers: [(String, String)]
) -> HTTPResponseHead {
    HTTPResponseHead(version: version, status: status, headers: HTTPHeaders(headers))
}

@Suite("ForwardingHeaders.upstreamRequestHead")
struct UpstreamRequestHeadTests {
    private func upstream(
        _ head: HTTPRequestHead,
        framing: RequestFraming = .none,
        upgrade: String? = nil,
        clientIP: String = "10.0.0.7",
        scheme: String = "http"
    ) -> HTTPRequestHead {
        ForwardingHeaders.upstreamRequestHead(
            from: head, framing: framing, upgrade: upgrade, clientIP: clientIP, scheme: scheme)
    }

    @Test("fixed hop-by-hop fields are removed, end-to-end fields kept in order")
    func removesFixedHopByHop() {
        let head = request(
            .GET, "/rooms/42?x=1",
            [
                ("Host", "example.com"),
                ("Keep-Alive", "timeout=5"),
                ("Accept", "*/*"),
                ("TE", "trailers"),
                ("Trailer", "X-Checksum"),
                ("Upgrade", "h2c"),
                ("Proxy-Connection", "keep-alive"),
                ("Connection", "keep-alive"),
                ("Cookie", "a=b"),
            ])
        let out = upstream(head)
        #expect(
            fields(out.headers) == [
                ["Host", "example.com"],
                ["Accept", "*/*"],
                ["Cookie", "a=b"],
                ["x-forwarded-for", "10.0.0.7"],
                ["x-forwarded-proto", "http"],
                ["x-forwarded-host", "example.com"],
                ["via", "1.1 ott-proxy"],
            ])
        #expect(out.method == .GET)
        #expect(out.uri == "/rooms/42?x=1")
        #expect(out.version == .http1_1)
    }

    @Test("fields named in Connection and Proxy-Connection are removed, case-insensitively")
    func removesFieldsNamedInConnection() {
        let head = request(
            [
                ("Host", "example.com"),
                ("Connection", "close, X-Secret"),
                ("Proxy-Connection", "x-other"),
                ("x-secret", "1"),
                ("X-Other", "2"),
                ("X-Keep", "3"),
            ])
        let out = upstream(head)
        #expect(out.headers["x-secret"] == [])
        #expect(out.headers["x-other"] == [])
        #expect(out.headers["connection"] == [])
        #expect(out.headers["proxy-connection"] == [])
        #expect(out.headers["x-keep"] == ["3"])
        #expect(out.headers["host"] == ["example.com"])
    }

    @Test(
        "no body: content-length: 0 only for methods that may carry one",
        arguments: [
            (HTTPMethod.GET, [String]()),
            (.DELETE, []),
            (.HEAD, []),
            (.OPTIONS, []),
            (.POST, ["0"]),
            (.PUT, ["0"]),
            (.PATCH, ["0"]),
        ]
    )
    func noBodyFraming(method: HTTPMethod, expected: [String]) {
        let out = upstream(request(method, "/", [("Host", "h")]), framing: .none)
        #expect(out.headers["content-length"] == expected)
        #expect(out.headers["transfer-encoding"] == [])
    }

    @Test("content-length framing sets one content-length and no transfer-encoding")
    func contentLengthFraming() {
        let head = request(.POST, "/", [("Host", "h"), ("Content-Length", "42"), ("Content-Type", "text/plain")])
        let out = upstream(head, framing: .contentLength(42))
        #expect(out.headers["content-length"] == ["42"])
        #expect(out.headers["transfer-encoding"] == [])
        #expect(out.headers["content-type"] == ["text/plain"])
    }

    @Test("chunked framing sends transfer-encoding: chunked and no content-length")
    func chunkedFraming() {
        let head = request(.POST, "/", [("Host", "h"), ("Transfer-Encoding", "chunked")])
        let out = upstream(head, framing: .chunked)
        #expect(out.headers["transfer-encoding"] == ["chunked"])
        #expect(out.headers["content-length"] == [])
        #expect(
            fields(out.headers) == [
                ["Host", "h"],
                ["transfer-encoding", "chunked"],
                ["x-forwarded-for", "10.0.0.7"],
                ["x-forwarded-proto", "http"],
                ["x-forwarded-host", "h"],
                ["via", "1.1 ott-proxy"],
            ])
    }

    @Test("an upgrade request keeps connection: upgrade and the upgrade token")
    func upgradeKept() {
        let head = request(
            [
                ("Host", "chat.example"),
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
            ])
        let out = upstream(head, upgrade: "websocket", scheme: "https")
        #expect(
            fields(out.headers) == [
                ["Host", "chat.example"],
                ["Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="],
                ["Sec-WebSocket-Version", "13"],
                ["connection", "upgrade"],
                ["upgrade", "websocket"],
                ["x-forwarded-for", "10.0.0.7"],
                ["x-forwarded-proto", "https"],
                ["x-forwarded-host", "chat.example"],
                ["via", "1.1 ott-proxy"],
            ])
    }

    @Test("without an upgrade, the client's Upgrade field does not cross")
    func upgradeDroppedWhenNotUpgrading() {
        let head = request([("Host", "h"), ("Connection", "Upgrade"), ("Upgrade", "websocket")])
        let out = upstream(head, upgrade: nil)
        #expect(out.headers["upgrade"] == [])
        #expect(out.headers["connection"] == [])
    }

    @Test("X-Forwarded-For is appended to an existing value")
    func forwardedForAppended() {
        let out = upstream(request([("Host", "h"), ("X-Forwarded-For", "203.0.113.9")]))
        #expect(out.headers["x-forwarded-for"] == ["203.0.113.9, 10.0.0.7"])
    }

    @Test("several X-Forwarded-For fields collapse into one list")
    func forwardedForCollapsed() {
        let head = request(
            [
                ("X-Forwarded-For", "203.0.113.9, 198.51.100.2"),
                ("Host", "h"),
                ("x-forwarded-for", "192.0.2.1"),
            ])
        let out = upstream(head, clientIP: "::1")
        #expect(out.headers["x-forwarded-for"] == ["203.0.113.9, 198.51.100.2, 192.0.2.1, ::1"])
    }

    @Test("X-Forwarded-Proto and X-Forwarded-Host replace what the client sent")
    func forwardedProtoAndHostReplaced() {
        let head = request(
            [
                ("Host", "real.example:8443"),
                ("X-Forwarded-Proto", "http"),
                ("X-Forwarded-Host", "spoofed.example"),
            ])
        let out = upstream(head, scheme: "https")
        #expect(out.headers["x-forwarded-proto"] == ["https"])
        #expect(out.headers["x-forwarded-host"] == ["real.example:8443"])
        #expect(out.headers["host"] == ["real.example:8443"])
    }

    @Test("Via is appended to an existing chain")
    func viaAppended() {
        let out = upstream(request([("Host", "h"), ("Via", "1.0 fred"), ("Via", "1.1 p.example")]))
        #expect(out.headers["via"] == ["1.0 fred, 1.1 p.example, 1.1 ott-proxy"])
    }

    @Test("an HTTP/1.0 request goes upstream as HTTP/1.1, with no Host or X-Forwarded-Host invented")
    func http10BecomesHTTP11() {
        let head = request(.GET, "/old", version: .http1_0, [("Accept", "text/html")])
        let out = upstream(head)
        #expect(out.version == .http1_1)
        #expect(
            fields(out.headers) == [
                ["Accept", "text/html"],
                ["x-forwarded-for", "10.0.0.7"],
                ["x-forwarded-proto", "http"],
                ["via", "1.0 ott-proxy"],
            ])
    }
}

@Suite("ForwardingHeaders.downstreamResponseHead")
struct DownstreamResponseHeadTests {
    private func downstream(
        _ head: HTTPResponseHead,
        method: HTTPMethod = .GET,
        keepAlive: Bool = true,
        client: HTTPVersion = .http1_1
    ) -> (head: HTTPResponseHead, closeAfter: Bool) {
        ForwardingHeaders.downstreamResponseHead(
            from: head, requestMethod: method, keepAlive: keepAlive, clientVersion: client)
    }

    @Test("Content-Length is kept; hop-by-hop fields dropped; Via added")
    func contentLengthKept() {
        let up = response(
            .ok,
            [
                ("Content-Type", "text/plain"),
                ("Content-Length", "5"),
                ("Connection", "keep-alive, X-Backend-Only"),
                ("Keep-Alive", "timeout=60"),
                ("X-Backend-Only", "secret"),
            ])
        let (head, closeAfter) = downstream(up)
        #expect(closeAfter == false)
        #expect(head.version == .http1_1)
        #expect(head.status == .ok)
        #expect(
            fields(head.headers) == [
                ["Content-Type", "text/plain"],
                ["Content-Length", "5"],
                ["via", "1.1 ott-proxy"],
            ])
    }

    @Test("a chunked upstream body is re-chunked for an HTTP/1.1 client")
    func chunkedForHTTP11() {
        let up = response(.ok, [("Transfer-Encoding", "chunked"), ("Content-Type", "application/json")])
        let (head, closeAfter) = downstream(up)
        #expect(closeAfter == false)
        #expect(
            fields(head.headers) == [
                ["Content-Type", "application/json"],
                ["transfer-encoding", "chunked"],
                ["via", "1.1 ott-proxy"],
            ])
    }

    @Test("a close-delimited upstream body is chunked for an HTTP/1.1 client")
    func closeDelimitedForHTTP11() {
        let (head, closeAfter) = downstream(response(.ok, [("Connection", "close")]))
        #expect(closeAfter == false)
        #expect(fields(head.headers) == [["transfer-encoding", "chunked"], ["via", "1.1 ott-proxy"]])
    }

    @Test(
        "an unknown-length body is delimited by close for an HTTP/1.0 client",
        arguments: [
            [("Transfer-Encoding", "chunked")],
            [(String, String)](),
        ]
    )
    func closeDelimitedForHTTP10(upstreamFields: [(String, String)]) {
        let (head, closeAfter) = downstream(response(.ok, upstreamFields), keepAlive: true, client: .http1_0)
        #expect(closeAfter == true)
        #expect(head.version == .http1_0)
        #expect(fields(head.headers) == [["connection", "close"], ["via", "1.1 ott-proxy"]])
    }

    @Test("a HEAD response keeps Content-Length and gets no chunking")
    func headKeepsContentLength() {
        let (withLength, _) = downstream(response(.ok, [("Content-Length", "1234")]), method: .HEAD)
        #expect(fields(withLength.headers) == [["Content-Length", "1234"], ["via", "1.1 ott-proxy"]])

        let (withoutLength, closeAfter) = downstream(
            response(.ok, [("Transfer-Encoding", "chunked")]), method: .HEAD)
        #expect(closeAfter == false)
        #expect(fields(withoutLength.headers) == [["via", "1.1 ott-proxy"]])
    }

    @Test("a 304 keeps Content-Length")
    func notModifiedKeepsContentLength() {
        let (head, closeAfter) = downstream(response(.notModified, [("ETag", "\"v1\""), ("Content-Length", "99")]))
        #expect(closeAfter == false)
        #expect(fields(head.headers) == [["ETag", "\"v1\""], ["Content-Length", "99"], ["via", "1.1 ott-proxy"]])
    }

    @Test("a 204 drops Content-Length and gets no chunking")
    func noContentDropsContentLength() {
        let (head, closeAfter) = downstream(response(.noContent, [("Content-Length", "0"), ("X-Id", "7")]))
        #expect(closeAfter == false)
        #expect(fields(head.headers) == [["X-Id", "7"], ["via", "1.1 ott-proxy"]])
    }

    @Test("a 101 keeps the upgrade fields and never closes, even when keep-alive is off")
    func switchingProtocolsKeepsUpgrade() {
        let up = response(
            .switchingProtocols,
            [
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            ])
        let (head, closeAfter) = downstream(up, keepAlive: false)
        #expect(closeAfter == false)
        #expect(head.status == .switchingProtocols)
        #expect(
            fields(head.headers) == [
                ["Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="],
                ["connection", "upgrade"],
                ["upgrade", "websocket"],
                ["via", "1.1 ott-proxy"],
            ])
    }

    @Test("keep-alive off adds connection: close and closeAfter")
    func keepAliveOff() {
        let (head, closeAfter) = downstream(response(.ok, [("Content-Length", "2")]), keepAlive: false)
        #expect(closeAfter == true)
        #expect(
            fields(head.headers) == [["Content-Length", "2"], ["connection", "close"], ["via", "1.1 ott-proxy"]])
    }

    @Test("an HTTP/1.0 client that keeps alive is told connection: keep-alive")
    func http10KeepAlive() {
        let (head, closeAfter) = downstream(response(.ok, [("Content-Length", "2")]), client: .http1_0)
        #expect(closeAfter == false)
        #expect(head.version == .http1_0)
        #expect(
            fields(head.headers) == [
                ["Content-Length", "2"], ["connection", "keep-alive"], ["via", "1.1 ott-proxy"],
            ])
    }

    @Test("an HTTP/1.1 client that keeps alive gets no Connection field")
    func http11KeepAliveImplicit() {
        let (head, _) = downstream(response(.ok, [("Content-Length", "2"), ("Connection", "close")]))
        #expect(head.headers["connection"] == [])
    }

    @Test("Via is appended to the backend's chain")
    func viaAppended() {
        let (head, _) = downstream(response(.ok, [("Content-Length", "0"), ("Via", "1.1 cache")]))
        #expect(head.headers["via"] == ["1.1 cache, 1.1 ott-proxy"])
    }
}

@Suite struct ForwardingHeadersEdgeTests {
    @Test func connectionCannotStripHost() {
        let head = HTTPRequestHead(
            version: .http1_1, method: .GET, uri: "/",
            headers: HTTPHeaders([("Host", "example.com"), ("Connection", "host, x-drop"), ("X-Drop", "1")]))
        let out = ForwardingHeaders.upstreamRequestHead(from: head, framing: .none, upgrade: nil, clientIP: "10.0.0.1", scheme: "http")
        #expect(out.headers["host"] == ["example.com"])
        #expect(out.headers["x-drop"].isEmpty)
    }

    @Test func viaNamesTheReceivedVersion() {
        let head = HTTPRequestHead(version: .http1_0, method: .GET, uri: "/", headers: HTTPHeaders([("Via", "1.1 edge")]))
        let out = ForwardingHeaders.upstreamRequestHead(from: head, framing: .none, upgrade: nil, clientIP: "10.0.0.1", scheme: "http")
        #expect(out.headers["via"] == ["1.1 edge, 1.0 ott-proxy"])
    }
}

@Suite struct HeaderElementsTests {
    /// `elements(_:)` replaces NIO's `canonicalForm` on the hot path: it must agree with it on every value.
    @Test func agreesWithCanonicalFormOnRandomValues() {
        var generator = SystemRandomNumberGenerator()
        let alphabet: [Character] = ["a", "B", "7", "-", ",", " ", "\t", ";", "="]
        for _ in 0..<2_000 {
            var headers = HTTPHeaders()
            for _ in 0..<Int.random(in: 0...3, using: &generator) {
                let value = String((0..<Int.random(in: 0...12, using: &generator)).map { _ in alphabet.randomElement(using: &generator)! })
                headers.add(name: Bool.random(using: &generator) ? "Connection" : "connection", value: value)
                headers.add(name: "Other", value: value)
            }
            #expect(headers.elements("connection") == headers[canonicalForm: "connection"], "\(headers)")
        }
    }

    @Test func examples() {
        let headers = HTTPHeaders([("Connection", " keep-alive ,, X-Foo,"), ("CONNECTION", ""), ("connection", " , ")])
        #expect(headers.elements("connection") == ["keep-alive", "X-Foo", "", ""])
        #expect(headers.elements("host") == [])
    }
}
