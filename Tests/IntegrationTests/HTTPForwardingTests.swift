import NIOCore
import NIOHTTP1
import Testing

/// HTTP/1.1 requests and responses crossing the proxy intact: bodies, framing, interim answers, bodiless answers,
/// upstream keep-alive, and the forwarding headers the backend sees.
@Suite struct HTTPForwardingTests {
    /// Every byte value, several times over, so any re-encoding or truncation shows.
    static let binaryBody: [UInt8] = (0..<5000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 / 256) }

    @Test(arguments: ["GET", "POST", "PUT", "DELETE"])
    func bodyReachesBackendIntact(method: String) async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                let body = Self.binaryBody
                try await connection.send(
                    "\(method) /echo?m=\(method) HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n"
                        + "Content-Length: \(body.count)\r\n\r\n")
                try await connection.send(bytes: body)
                let response = try await connection.readResponse()
                #expect(response.status == 200)
                #expect(response.header("x-origin-method") == method)
                #expect(response.header("x-origin-uri") == "/echo?m=\(method)")
                #expect(response.body == body)

                let seen = try #require(origin.lastRequest)
                #expect(seen.head.method.rawValue == method)
                #expect(seen.head.uri == "/echo?m=\(method)")
                #expect(seen.body == body)
                #expect(seen.head.headers["content-length"] == [String(body.count)])
                #expect(seen.head.headers["transfer-encoding"].isEmpty)
            }
        }
    }

    /// A client that pipelines gets every response, in order, even when it sends more than the proxy reads ahead
    /// (`ReadAheadHandler`, 16 KiB) in one go: the read-ahead must hand over to the pipelining handler's back-pressure.
    @Test func pipelinedRequestsAreAnsweredInOrder() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                let count = 400
                var batch = ""
                for i in 0..<count {
                    if i % 50 == 7 {
                        batch += "POST /echo?n=\(i) HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello"
                    } else {
                        batch += "GET /echo?n=\(i) HTTP/1.1\r\nHost: test\r\nX-Padding: \(String(repeating: "p", count: 40))\r\n\r\n"
                    }
                }
                #expect(batch.utf8.count > 2 * 16 * 1024)
                try await connection.send(batch)
                for i in 0..<count {
                    let response = try await connection.readResponse()
                    #expect(response.status == 200)
                    #expect(response.header("x-origin-uri") == "/echo?n=\(i)")
                    if i % 50 == 7 { #expect(response.bodyText == "hello") }
                }
            }
        }
    }

    /// A client that sends its request and shuts down its sending side (HTTP/1.0 tools, `nc -N`) still gets the whole
    /// response, and then the connection closes; on an idle connection, the end of stream closes it at once.
    @Test func aHalfClosedClientGetsItsResponse() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                for _ in 0..<5 {
                    let connection = try await RawHTTPConnection.connect(port: proxy.port)
                    try await connection.send("GET /echo?half=1 HTTP/1.1\r\nHost: test\r\n\r\n")
                    try await connection.channel.close(mode: .output)
                    let received = String(decoding: try await connection.readUntilClosed(timeout: .seconds(5)), as: UTF8.self)
                    #expect(received.hasPrefix("HTTP/1.1 200"), "got: \(received.prefix(80))")
                    #expect(received.contains("x-origin-uri: /echo?half=1"))
                    await connection.close()
                }
                // A request that can no longer complete (its body was cut short by the end of stream) closes at once.
                let cut = try await RawHTTPConnection.connect(port: proxy.port)
                try await cut.send("POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nhello")
                try await cut.channel.close(mode: .output)
                _ = try await cut.readUntilClosed(timeout: .seconds(5))
                await cut.close()
                let idle = try await RawHTTPConnection.connect(port: proxy.port)
                try await idle.send("GET /echo HTTP/1.1\r\nHost: test\r\n\r\n")
                #expect(try await idle.readResponse().status == 200)
                try await idle.channel.close(mode: .output)
                _ = try await idle.readUntilClosed(timeout: .seconds(5))
                #expect(idle.isClosed)
                await idle.close()
            }
        }
    }

    @Test func deleteWithJSONBody() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                let json = #"{"ids":[1,2,3],"reason":"cleanup","nested":{"ok":true}}"#
                try await connection.send(
                    "DELETE /echo HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                        + "Content-Length: \(json.utf8.count)\r\n\r\n\(json)")
                let response = try await connection.readResponse()
                #expect(response.status == 200)
                #expect(response.bodyText == json)
                let seen = try #require(origin.lastRequest)
                #expect(seen.head.method == .DELETE)
                #expect(seen.bodyText == json)
                #expect(seen.head.headers["content-type"] == ["application/json"])
            }
        }
    }

    @Test func chunkedRequestBodyArrivesChunkedAndIntact() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                let parts = ["hello", ", ", String(repeating: "chunk", count: 700), "!"]
                var request = "POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
                for part in parts {
                    request += String(part.utf8.count, radix: 16) + "\r\n" + part + "\r\n"
                }
                request += "0\r\n\r\n"
                try await connection.send(request)
                let response = try await connection.readResponse()
                #expect(response.status == 200)
                #expect(response.bodyText == parts.joined())
                let seen = try #require(origin.lastRequest)
                #expect(seen.head.headers["transfer-encoding"].map { $0.lowercased() } == ["chunked"])
                #expect(seen.head.headers["content-length"].isEmpty)
                #expect(seen.bodyText == parts.joined())
            }
        }
    }

    @Test func chunkedResponseArrivesIntact() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                for uri in ["/chunked", "/chunked?trailers"] {
                    try await connection.send("GET \(uri) HTTP/1.1\r\nHost: test\r\n\r\n")
                    let response = try await connection.readResponse()
                    #expect(response.status == 200)
                    #expect(response.header("transfer-encoding")?.lowercased() == "chunked")
                    #expect(response.header("content-length") == nil)
                    #expect(response.bodyText == TestOrigin.chunkedParts.joined())
                }
                // Both responses were framed exactly: the connection still carries a third request.
                try await connection.send("GET /status/200 HTTP/1.1\r\nHost: test\r\n\r\n")
                #expect(try await connection.readResponse().bodyText == "status 200\n")
                #expect(origin.acceptedConnections == 1)
            }
        }
    }

    @Test func closeDelimitedResponseIsChunkedForHTTP11Client() async throws {
        let body = "a body delimited only by the connection closing\n" + String(repeating: "z", count: 10_000)
        let raw = try await RawOrigin.start(response: "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
        defer { Task { await raw.stop() } }
        try await withProxy(backends: [(id: "raw", port: raw.port)]) { proxy in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            for _ in 0..<2 {
                try await connection.send("GET /close-delimited HTTP/1.1\r\nHost: test\r\n\r\n")
                let response = try await connection.readResponse()
                #expect(response.status == 200)
                #expect(response.header("transfer-encoding")?.lowercased() == "chunked")
                #expect(response.header("connection")?.lowercased() != "close")
                #expect(response.bodyText == body)
            }
            #expect(!connection.isClosed)
            #expect(raw.acceptedConnections == 2)
        }
    }

    @Test func expect100ContinueIsRelayedBeforeTheBody() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                let body = "the body, sent only after 100 Continue"
                try await connection.send(
                    "POST /continue HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: \(body.utf8.count)\r\n\r\n")
                let interim = try await connection.readResponse()
                #expect(interim.status == 100)
                #expect(origin.requests.isEmpty, "the backend cannot have the request yet: no body was sent")
                try await connection.send(body)
                let final = try await connection.readResponse()
                #expect(final.status == 200)
                #expect(final.bodyText == body)
                let seen = try #require(origin.lastRequest)
                #expect(seen.head.headers["expect"] == ["100-continue"])
                #expect(seen.bodyText == body)
            }
        }
    }

    @Test func headResponseKeepsContentLengthWithoutBody() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                try await connection.send("HEAD /head HTTP/1.1\r\nHost: test\r\n\r\n")
                let head = try await connection.readResponse(forMethod: "HEAD")
                #expect(head.status == 200)
                #expect(head.header("content-length") == String(TestOrigin.headBody.utf8.count))
                #expect(head.header("transfer-encoding") == nil)
                // Had the proxy sent body bytes after the HEAD answer, they would be read as the next response.
                try await connection.send("GET /head HTTP/1.1\r\nHost: test\r\n\r\n")
                let get = try await connection.readResponse()
                #expect(get.status == 200)
                #expect(get.bodyText == TestOrigin.headBody)
                #expect(origin.requests.map(\.head.method) == [.HEAD, .GET])
            }
        }
    }

    @Test func noContentAndNotModifiedHaveNoBody() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                try await connection.send("GET /status/204 HTTP/1.1\r\nHost: test\r\n\r\n")
                let noContent = try await connection.readResponse()
                #expect(noContent.status == 204)
                #expect(noContent.header("content-length") == nil)
                #expect(noContent.header("transfer-encoding") == nil)

                try await connection.send("GET /status/304 HTTP/1.1\r\nHost: test\r\nIf-None-Match: \"v1\"\r\n\r\n")
                let notModified = try await connection.readResponse()
                #expect(notModified.status == 304)
                #expect(notModified.header("etag") == "\"v1\"")
                #expect(notModified.header("transfer-encoding") == nil)

                // Any stray body byte would corrupt this response.
                try await connection.send("POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nafter")
                let after = try await connection.readResponse()
                #expect(after.status == 200)
                #expect(after.bodyText == "after")
                #expect(!connection.isClosed)
            }
        }
    }

    @Test func upstreamConnectionsAreReused() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                for _ in 0..<5 {
                    let connection = try await RawHTTPConnection.connect(port: proxy.port)
                    for _ in 0..<4 {
                        try await connection.send("GET /status/200 HTTP/1.1\r\nHost: test\r\n\r\n")
                        #expect(try await connection.readResponse().status == 200)
                    }
                    await connection.close()
                }
                #expect(origin.requests.count == 20)
                // One pool per event loop: sequential requests need at most one backend connection per loop.
                #expect(origin.acceptedConnections <= System.coreCount)
                #expect(origin.acceptedConnections < 20)
            }
        }
    }

    @Test func idleUpstreamConnectionsCloseAfterUpstreamIdle() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)], configure: { $0.timeouts.upstreamIdle = .milliseconds(300) }) {
                proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                // The idle period starts when the proxy releases the connection, after this point: a lower bound
                // measured from here holds however late this task runs on a loaded machine.
                let sent = ContinuousClock.now
                try await connection.send("GET /status/200 HTTP/1.1\r\nHost: test\r\n\r\n")
                #expect(try await connection.readResponse().status == 200)
                await connection.close()
                // Closed between 1 and 1.25 idle timeouts after its last use.
                let deadline = ContinuousClock.now + .seconds(5)
                while origin.openConnections > 0 && ContinuousClock.now < deadline {
                    try await Task.sleep(for: .milliseconds(20))
                }
                #expect(origin.openConnections == 0)
                #expect(ContinuousClock.now - sent >= .milliseconds(300))
            }
        }
    }

    @Test func forwardingHeadersAreAddedAndHopByHopRemoved() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                try await connection.send(
                    "GET /echo HTTP/1.1\r\nHost: app.example:8443\r\nX-Forwarded-For: 1.2.3.4\r\n"
                        + "Connection: keep-alive, x-custom\r\nX-Custom: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
                        + "Proxy-Connection: keep-alive\r\nX-End-To-End: kept\r\n\r\n")
                let response = try await connection.readResponse()
                #expect(response.status == 200)
                #expect(response.header("via") == "1.1 ott-proxy")

                let headers = try #require(origin.lastRequest).head.headers
                #expect(headers["host"] == ["app.example:8443"])
                #expect(headers["x-forwarded-for"] == ["1.2.3.4, 127.0.0.1"])
                #expect(headers["x-forwarded-proto"] == ["http"])
                #expect(headers["x-forwarded-host"] == ["app.example:8443"])
                #expect(headers["via"] == ["1.1 ott-proxy"])
                #expect(headers["x-end-to-end"] == ["kept"])
                for name in ["connection", "x-custom", "keep-alive", "te", "proxy-connection", "transfer-encoding", "upgrade"] {
                    #expect(!headers.contains(name: name), "\(name) crossed the proxy")
                }
            }
        }
    }

    @Test func forwardedForStartsWithClientAddressWhenAbsent() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                try await connection.send("GET /echo HTTP/1.1\r\nHost: test\r\n\r\n")
                #expect(try await connection.readResponse().status == 200)
                let headers = try #require(origin.lastRequest).head.headers
                #expect(headers["x-forwarded-for"] == ["127.0.0.1"])
                #expect(headers["x-forwarded-host"] == ["test"])
            }
        }
    }
}

/// Bytes a backend sends right behind its `101` (a WebSocket server's first frame) arrive in the same read as the
/// head; they must reach the client without waiting for some later event to flush them.
@Suite struct UpgradeLeftoverTests {
    @Test func bytesBehindSwitchingProtocolsAreRelayedAtOnce() async throws {
        let raw = try await RawOrigin.start(
            response: "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nFIRST-FRAME",
            closeAfterResponse: false)
        defer { Task { await raw.stop() } }
        try await withProxy(backends: [(id: "raw", port: raw.port)]) { proxy in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            try await connection.send(
                "GET /ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                    + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            let head = try await connection.readResponse()
            #expect(head.status == 101)
            let first = try await connection.readBytes(count: 11, timeout: .seconds(2))
            #expect(String(decoding: first, as: UTF8.self) == "FIRST-FRAME")
        }
    }
}
