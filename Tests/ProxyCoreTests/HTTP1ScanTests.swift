import NIOCore
import NIOHTTP1
import Testing

@testable import ProxyCore

/// The fast path's byte-level HTTP/1.1 pieces. The response-head rewrite is checked against the general path it
/// replaces (`ForwardingHeaders.downstreamResponseHead` + `writeResponseHead`), on fixed cases and on random heads.
@Suite struct HTTP1ScanTests {
    private func withBytes<T>(_ text: String, _ body: (UnsafeRawBufferPointer) -> T) -> T {
        Array(text.utf8).withUnsafeBytes(body)
    }

    // MARK: Head end

    @Test func headEndFindsTheFirstEmptyLineWhereverTheBytesAreSplit() {
        let head = "GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        let bytes = Array((head + "GET /next HTTP/1.1\r\n").utf8)
        #expect(bytes.withUnsafeBytes { HTTP1Scan.headEnd($0) } == head.utf8.count)
        // Every prefix shorter than the head has no end; resuming from any earlier point finds the same one.
        for length in 0..<head.utf8.count {
            #expect(Array(bytes[..<length]).withUnsafeBytes { HTTP1Scan.headEnd($0) } == nil)
            #expect(bytes.withUnsafeBytes { HTTP1Scan.headEnd($0, from: max(0, length - 3)) } == head.utf8.count)
        }
        #expect(withBytes("a\r\n\r\r\n\r\n") { HTTP1Scan.headEnd($0) } == 8)
        #expect(withBytes("\n\n\r\n\n") { HTTP1Scan.headEnd($0) } == nil)
    }

    @Test func tokenBytesAreExactlyTheRFC9110Tchars() {
        let tchar = Set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ".utf8)
        for byte in UInt8.min...UInt8.max {
            #expect(HTTP1Scan.isTokenByte(byte) == tchar.contains(byte), "byte \(byte)")
        }
    }

    /// `fieldValueEnd` tests eight bytes at a time; it must stop exactly where a byte-by-byte scan does: at the first
    /// control byte other than tab, DEL or obs-text, wherever that byte sits in a word and whatever surrounds it.
    @Test func fieldValueEndStopsWhereAByteByByteScanStops() {
        func reference(_ bytes: [UInt8], from start: Int) -> Int {
            var i = start
            while i < bytes.count, (bytes[i] >= 0x20 && bytes[i] < 0x7F) || bytes[i] == 0x09 { i += 1 }
            return i
        }
        // Every byte value at every offset of a 24-byte visible value, scanned from three starts.
        let visible = Array("Thu, 26 Nov 2026 22:30:0".utf8)
        for byte in UInt8.min...UInt8.max {
            for offset in 0..<visible.count {
                var bytes = visible
                bytes[offset] = byte
                for start in [0, 1, 5] {
                    let actual = bytes.withUnsafeBytes { HTTP1Scan.fieldValueEnd($0, from: start) }
                    #expect(actual == reference(bytes, from: start), "byte \(byte) at \(offset) from \(start)")
                }
            }
        }
        // Random mixes weighted toward visible bytes, so that long runs and words with several stops both occur.
        var rng = SplitMix64(seed: 0x5EED_0F_BA7E)
        for _ in 0..<5000 {
            let bytes = (0..<Int(rng.next() % 40)).map { _ -> UInt8 in
                let r = rng.next()
                return r % 8 == 0 ? UInt8(truncatingIfNeeded: r >> 8) : UInt8(0x20 + (r >> 8) % 95)
            }
            let start = bytes.isEmpty ? 0 : Int(rng.next() % UInt64(bytes.count))
            let actual = bytes.withUnsafeBytes { HTTP1Scan.fieldValueEnd($0, from: start) }
            #expect(actual == reference(bytes, from: start), "\(bytes) from \(start)")
        }
    }

    // MARK: Request heads

    @Test func plainRequestHeadsParse() throws {
        let head = try #require(
            withBytes("GET /rooms/a?x=1 HTTP/1.1\r\nHost: example.com\r\nX-Empty:\r\nAccept:  */*  \r\n\r\n") {
                HTTP1Scan.parseRequestHead($0)
            })
        #expect(head.method == .GET)
        #expect(head.uri == "/rooms/a?x=1")
        #expect(head.version == .http1_1)
        #expect(head.headers.map { [$0.name, $0.value] } == [["Host", "example.com"], ["X-Empty", ""], ["Accept", "*/*"]])
    }

    @Test(arguments: [
        "GET / HTTP/1.0\r\nHost: a\r\n\r\n",  // HTTP/1.0: left to the full parser
        "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",  // absolute form
        "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        "get / HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET / HTTP/1.1\r\nHost : a\r\n\r\n",  // space before the colon
        "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",  // obsolete line folding
        "GET / HTTP/1.1\r\nHost: caf\u{e9}\r\n\r\n",  // obs-text
        "GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",  // bare LF
        "GET / HTTP/1.1\r\nHost: a\r\n\r\nextra",  // bytes past the head
        "GET /\u{7f} HTTP/1.1\r\nHost: a\r\n\r\n",
        "BREW / HTTP/1.1\r\nHost: a\r\n\r\n",  // a method NIO does not know
    ])
    func unusualRequestHeadsAreLeftToTheFullParser(_ text: String) {
        #expect(withBytes(text) { HTTP1Scan.parseRequestHead($0) } == nil)
    }

    @Test(arguments: [
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nUPGRADE: websocket\r\nConnection: Upgrade\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n\r\n",  // no `Connection: upgrade`: still left to the full path
        "GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
        "GET / HTTP/1.1\r\nX: b\r\n\r\n",  // no Host
        "GET / HTTP/1.1\r\nHost:\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a, b\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: a\r\nHost: a\r\n\r\n",
    ])
    func headsTheFastPathDoesNotForwardAreRefusedWhenPlainOnly(_ text: String) {
        #expect(withBytes(text) { HTTP1Scan.parseRequestHead($0) } != nil)
        #expect(withBytes(text) { HTTP1Scan.parseRequestHead($0, plainOnly: true) } == nil)
    }

    /// `plainOnly` replaced four checks on the parsed head (`RequestValidator.framing`, `validateHost`,
    /// `upgradeProtocol`, an `Expect` search): on random heads built from the fields they look at, it accepts only heads
    /// all four accept, and every such head except those with an `Upgrade` field or unusual `Host` fields.
    @Test func plainOnlyAcceptsWhatTheValidatorsAccept() {
        let fields = [
            "Host: a", "Host: a.example:8080", "host: b", "Host:", "Host: a, b", "Host: ,", "X-Host: a",
            "Content-Length: 0", "Content-Length: 5", "content-length: 1, 1", "Transfer-Encoding: chunked",
            "Upgrade: websocket", "Connection: upgrade", "Connection: keep-alive", "Connection: close",
            "Expect: 100-continue", "expect:", "Accept: */*", "User-Agent: test",
        ]
        var rng = SplitMix64(seed: 0x91A1_4_0417)
        var accepted = 0
        for _ in 0..<5_000 {
            let count = Int(rng.next() % 5)
            let chosen = (0..<count).map { _ in fields[Int(rng.next() % UInt64(fields.count))] }
            let text = "GET /x HTTP/1.1\r\n" + chosen.map { $0 + "\r\n" }.joined() + "\r\n"
            guard let head = withBytes(text, { HTTP1Scan.parseRequestHead($0) }) else {
                Issue.record("the scanner refused \(text)")
                continue
            }
            let validatorsAccept =
                (try? RequestValidator.framing(of: head)) == RequestFraming.none
                && (try? RequestValidator.validateHost(of: head)) != nil
                && RequestValidator.upgradeProtocol(of: head) == nil
                && !head.headers.contains(name: "expect")
            let plain = withBytes(text) { HTTP1Scan.parseRequestHead($0, plainOnly: true) }
            if plain != nil {
                accepted += 1
                #expect(validatorsAccept, "\(text)")
                #expect(plain == head, "\(text)")
            } else if validatorsAccept {
                // Refused though the validators accept it: an `Upgrade` field, or `Host` fields the validators count
                // by their elements (`Host: a` next to `Host: ,` is one host to them).
                let hosts = head.headers["host"]
                let unusualHosts = hosts.count != 1 || hosts[0].isEmpty || hosts[0].contains(",")
                #expect(head.headers.contains(name: "upgrade") || unusualHosts, "\(text)")
            }
        }
        // The generator must produce heads both ways.
        #expect(accepted > 200)
        #expect(accepted < 4_500)
    }

    // MARK: Chunked bodies

    private func scanWhole(_ text: String) throws -> Int? {
        var scanner = ChunkedBodyScanner()
        return try Array(text.utf8).withUnsafeBytes { bytes throws(ChunkedBodyScanner.Malformed) in try scanner.scan(bytes) }
    }

    @Test func chunkedBodiesEndAfterTheLastChunkAndTrailers() throws {
        let bodies = [
            "0\r\n\r\n",
            "5\r\nhello\r\n0\r\n\r\n",
            "5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\n\r\n",
            "3\r\nabc\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n",
            "1a\r\n" + String(repeating: "z", count: 26) + "\r\n0 ; last\r\n\r\n",
        ]
        for body in bodies {
            let total = body.utf8.count
            #expect(try self.scanWhole(body + "NEXT") == total)
            // Fed one byte at a time, it ends on exactly the last byte.
            var scanner = ChunkedBodyScanner()
            var endedAt: Int?
            for (index, byte) in body.utf8.enumerated() {
                let result = try [byte].withUnsafeBytes { bytes throws(ChunkedBodyScanner.Malformed) in try scanner.scan(bytes) }
                if let result {
                    #expect(result == 1)
                    endedAt = index + 1
                    break
                }
            }
            #expect(endedAt == total)
            #expect(scanner.isComplete)
        }
    }

    @Test func chunkedBodySplitAtEveryPointEndsAtTheSameByte() throws {
        let body = "4\r\nwiki\r\n5;a=b\r\npedia\r\n0\r\nT: v\r\n\r\n"
        let bytes = Array(body.utf8)
        for split in 0...bytes.count {
            var scanner = ChunkedBodyScanner()
            let first = try Array(bytes[..<split]).withUnsafeBytes { b throws(ChunkedBodyScanner.Malformed) in try scanner.scan(b) }
            if split == bytes.count {
                #expect(first == bytes.count)
                continue
            }
            #expect(first == nil)
            let second = try Array(bytes[split...]).withUnsafeBytes { b throws(ChunkedBodyScanner.Malformed) in try scanner.scan(b) }
            #expect(second == bytes.count - split)
        }
    }

    @Test(arguments: [
        "\r\n",  // no size
        "x\r\n",
        "5\r\nhelloX\r\n",  // data longer than its size
        "5\nhello\r\n",  // bare LF after the size
        "fffffffffffffffff\r\n",  // too many digits
        ";ext\r\n",
    ])
    func malformedChunkedBodiesAreRejected(_ text: String) {
        #expect(throws: ChunkedBodyScanner.Malformed.self) { try self.scanWhole(text) }
    }

    @Test func overlongChunkExtensionsAreRejected() {
        let text = "1;" + String(repeating: "x", count: ChunkedBodyScanner.maxLineLength + 1) + "\r\n"
        #expect(throws: ChunkedBodyScanner.Malformed.self) { try self.scanWhole(text) }
    }

    // MARK: Response heads: the byte-level rewrite equals the general path

    /// What the general path writes for a response head, and what it concludes about framing.
    private func reference(_ text: String, method: HTTPMethod, keepAlive: Bool) -> (bytes: [UInt8], summary: HTTP1Scan.ResponseSummary)? {
        guard let head = withBytes(text, { HTTP1Scan.parseResponseHead($0) }) else { return nil }
        let (rewritten, closeAfter) = ForwardingHeaders.downstreamResponseHead(
            from: head, requestMethod: method, keepAlive: keepAlive, clientVersion: .http1_1)
        var buffer = ByteBuffer()
        buffer.writeResponseHead(rewritten)
        let framing: HTTP1Scan.ResponseSummary.Framing
        if !head.status.mayHaveResponseBody(for: method) {
            framing = .none
        } else if head.headers.contains(name: "transfer-encoding") {
            framing = .chunked
        } else if let length = head.headers.first(name: "content-length").flatMap({ Int($0) }) {
            framing = length == 0 ? .none : .length(length)
        } else {
            framing = .close
        }
        return (
            Array(buffer.readableBytesView),
            HTTP1Scan.ResponseSummary(
                status: Int(head.status.code), framing: framing, upstreamKeepAlive: head.isKeepAlive, closeAfter: closeAfter)
        )
    }

    private func rewrite(_ text: String, method: HTTPMethod, keepAlive: Bool) -> (bytes: [UInt8], summary: HTTP1Scan.ResponseSummary)? {
        var out = ByteBuffer()
        out.writeStaticString("prefix")
        let summary = withBytes(text) {
            HTTP1Scan.rewriteResponseHead($0, requestMethod: method, clientKeepAlive: keepAlive, into: &out)
        }
        guard let summary else {
            // Declined: what was written stays as it was.
            #expect(Array(out.readableBytesView) == Array("prefix".utf8))
            return nil
        }
        return (Array(out.readableBytesView.dropFirst(6)), summary)
    }

    private static let responseCases: [String] = [
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n",
        "HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 10\r\n\r\n",
        "HTTP/1.1 200 Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\nX-A:   spaced   \r\n\r\n",
        "HTTP/1.1 201 Created\r\nLocation: /a\r\n\r\n",
        "HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n",
        "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\n",
        "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-B: 1\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\nContent-Length: 1024\r\n\r\n",
        "HTTP/1.1 299 Custom Thing\r\nContent-Length: 2\r\n\r\n",
        "HTTP/1.1 404\r\nContent-Length: 2\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTE: trailers\r\nUpgrade: h2c\r\nContent-Length: 1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 1\r\n\r\n",
    ]

    @Test(arguments: responseCases)
    func responseHeadRewriteMatchesTheGeneralPath(_ text: String) throws {
        for method in [HTTPMethod.GET, .HEAD] {
            for keepAlive in [true, false] {
                let expected = try #require(self.reference(text, method: method, keepAlive: keepAlive))
                let actual = try #require(self.rewrite(text, method: method, keepAlive: keepAlive))
                #expect(String(decoding: actual.bytes, as: UTF8.self) == String(decoding: expected.bytes, as: UTF8.self))
                #expect(actual.summary == expected.summary)
            }
        }
    }

    @Test(arguments: [
        "HTTP/1.1 100 Continue\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        "HTTP/1.1 200 OK\r\nConnection: x-private\r\nX-Private: 1\r\nContent-Length: 1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nVia: 1.1 other\r\nContent-Length: 1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nProxy-Connection: close\r\nContent-Length: 1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX: caf\u{e9}\r\n\r\n",
        "HTTP/2 200 OK\r\n\r\n",
        "HTTP/1.1 2000 OK\r\n\r\n",
        "HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n",
    ])
    func unusualResponseHeadsAreLeftToTheGeneralPath(_ text: String) {
        #expect(self.rewrite(text, method: .GET, keepAlive: true) == nil)
    }

    /// Random heads from a vocabulary of the fields the rewrite treats specially, in random order and case: wherever
    /// the rewrite answers, it answers what the general path does.
    @Test func randomResponseHeadsMatchTheGeneralPath() throws {
        var rng = SplitMix64(seed: 0x0F_A5_7A_7E)
        let statuses = ["200 OK", "204 No Content", "304 Not Modified", "404 Not Found", "500 Oops", "299 Odd", "302 Found"]
        let fields = [
            "Content-Length: 12", "Content-Length: 0", "Transfer-Encoding: chunked", "Connection: close",
            "Connection: keep-alive", "Connection: Keep-Alive, close", "Keep-Alive: timeout=5", "TE: trailers",
            "Trailer: X", "Upgrade: foo", "Server: test", "X-Thing:  padded \t", "Date: Thu, 26 Nov 2026 00:00:00 GMT",
            "content-type: text/plain", "Via: 1.1 a", "Connection: x-thing", "X-Thing: 2",
        ]
        var answered = 0
        for _ in 0..<2000 {
            let version = rng.next() % 4 == 0 ? "HTTP/1.0" : "HTTP/1.1"
            var text = "\(version) \(statuses[Int(rng.next() % UInt64(statuses.count))])\r\n"
            for _ in 0..<Int(rng.next() % 6) {
                var field = fields[Int(rng.next() % UInt64(fields.count))]
                if rng.next() % 3 == 0 { field = field.uppercased() }
                text += field + "\r\n"
            }
            text += "\r\n"
            let method: HTTPMethod = rng.next() % 5 == 0 ? .HEAD : .GET
            let keepAlive = rng.next() % 2 == 0
            guard let actual = self.rewrite(text, method: method, keepAlive: keepAlive) else { continue }
            answered += 1
            let expected = try #require(self.reference(text, method: method, keepAlive: keepAlive), "\(text)")
            #expect(String(decoding: actual.bytes, as: UTF8.self) == String(decoding: expected.bytes, as: UTF8.self), "\(text)")
            #expect(actual.summary == expected.summary, "\(text)")
        }
        // The generator must exercise the rewrite, not only its refusals.
        #expect(answered > 500)
    }
}

extension HTTP1ScanTests {
    // MARK: Request heads: the byte-level rewrite equals the general path

    /// `added` are set with replace-or-add, as `ProxyHandler.forwardedHead` sets the pool's key and epoch fields.
    private func requestPair(_ text: String, added: [(name: String, value: String)]) throws -> (fast: String, general: String)? {
        let head = try #require(Array(text.utf8).withUnsafeBytes { HTTP1Scan.parseRequestHead($0) }, "\(text)")
        var out = ByteBuffer()
        out.writeStaticString("prefix")
        let written = Array(text.utf8).withUnsafeBytes {
            HTTP1Scan.rewriteRequestHead(
                $0, method: head.method, added: added, clientIP: "10.0.0.7", scheme: "https", into: &out)
        }
        guard written else {
            #expect(Array(out.readableBytesView) == Array("prefix".utf8))
            return nil
        }
        var forwarded = head
        for field in added { forwarded.headers.replaceOrAdd(name: field.name, value: field.value) }
        let upstream = ForwardingHeaders.upstreamRequestHead(
            from: forwarded, framing: .none, upgrade: nil, clientIP: "10.0.0.7", scheme: "https")
        var general = ByteBuffer()
        general.writeRequestHead(upstream)
        return (String(decoding: out.readableBytesView.dropFirst(6), as: UTF8.self), String(buffer: general))
    }

    @Test func requestHeadRewriteMatchesTheGeneralPath() throws {
        let cases: [(String, [(name: String, value: String)])] = [
            ("GET /rooms/a HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n", []),
            ("GET /a HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\nTE: trailers\r\n\r\n", []),
            ("DELETE /a HTTP/1.1\r\nhost:   h  \r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: old\r\nX-A: 1\r\n\r\n", []),
            ("POST /a HTTP/1.1\r\nHost: h\r\n\r\n", []),
            ("GET /a HTTP/1.1\r\nHost: h\r\nX-Room-Key: forged\r\nX-B: 2\r\n\r\n", [("X-Room-Key", "room:a"), ("x-room-epoch", "7")]),
            ("GET /a HTTP/1.1\r\nConnection: close\r\nHost: h\r\nUpgrade: nothing\r\n\r\n", [("k", "v")]),
        ]
        for (text, added) in cases {
            let pair = try #require(try self.requestPair(text, added: added), "\(text)")
            #expect(pair.fast == pair.general)
        }
    }

    @Test func requestHeadsWithMergedFieldsAreLeftToTheGeneralPath() throws {
        for text in [
            "GET /a HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: h\r\nVia: 1.1 edge\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: h\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: h\r\nProxy-Connection: keep-alive\r\n\r\n",
        ] {
            #expect(try self.requestPair(text, added: []) == nil)
        }
    }

    @Test func randomRequestHeadsMatchTheGeneralPath() throws {
        var rng = SplitMix64(seed: 0x5EED_0F_4E57)
        let methods = ["GET", "HEAD", "DELETE", "OPTIONS", "POST", "PUT", "PATCH"]
        let fields = [
            "Host: example.com", "Accept: */*", "Connection: keep-alive", "Connection: close", "Keep-Alive: 300",
            "TE: trailers", "Upgrade: foo", "Trailer: X", "X-Forwarded-Proto: http", "X-Forwarded-Host: a",
            "User-Agent:  wrk  ", "Cookie: a=1; b=2", "X-Room-Key: nope", "x-forwarded-for: 9.9.9.9", "Via: 1.0 x",
            "Connection: upgrade",
        ]
        var answered = 0
        for _ in 0..<2000 {
            var text = "\(methods[Int(rng.next() % UInt64(methods.count))]) /r/\(rng.next() % 100)?q=1 HTTP/1.1\r\n"
            var lines = ["Host: h\(rng.next() % 3)"]
            for _ in 0..<Int(rng.next() % 6) {
                var field = fields[Int(rng.next() % UInt64(fields.count))]
                if rng.next() % 3 == 0 { field = field.uppercased() }
                if !field.lowercased().hasPrefix("host:") { lines.append(field) }
            }
            lines.shuffle(using: &rng)
            text += lines.joined(separator: "\r\n") + "\r\n\r\n"
            let added: [(name: String, value: String)] = rng.next() % 2 == 0 ? [("X-Room-Key", "room:1"), ("X-Room-Epoch", "3")] : []
            guard let pair = try self.requestPair(text, added: added) else { continue }
            answered += 1
            #expect(pair.fast == pair.general, "\(text)")
        }
        #expect(answered > 500)
    }
}

/// A small deterministic generator, so a failure names a reproducible input (also used by TunnelRelayTests).
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { self.state = seed }
    mutating func next() -> UInt64 {
        self.state &+= 0x9E37_79B9_7F4A_7C15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
