import Logging
import NIOCore
import NIOPosix
import ProxyCore
import Testing

/// The fast path (`FastPathHandler`): plain requests stay on it, everything else is handed to the full HTTP path on
/// the same connection, and what a client receives is the same byte for byte whichever path served it.
@Suite struct FastPathTests {
    private static let admin = AdminConfig(address: "127.0.0.1", port: 0, token: nil, metricsOpen: true)

    /// `ott_proxy_fast_path_handoffs_total` from the proxy's admin endpoint.
    private func handoffs(_ proxy: ProxyHarness) async throws -> Double {
        let connection = try await RawHTTPConnection.connect(port: try #require(proxy.adminPort))
        defer { Task { await connection.close() } }
        try await connection.send("GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        let metrics = try await connection.readResponse().bodyText
        let line = try #require(metrics.split(separator: "\n").first { $0.hasPrefix("ott_proxy_fast_path_handoffs_total") })
        return try #require(line.split(separator: " ").last.flatMap { Double($0) })
    }

    @Test func plainRequestsStayOnTheFastPathAndABodyIsHandedOver() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "a", port: origin.port)], admin: Self.admin) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                for index in 0..<3 {
                    try await connection.send("GET /echo?n=\(index) HTTP/1.1\r\nHost: test\r\n\r\n")
                    let response = try await connection.readResponse()
                    #expect(response.status == 200)
                    #expect(response.header("x-origin-uri") == "/echo?n=\(index)")
                    #expect(response.header("via") == "1.1 ott-proxy")
                }
                #expect(try await self.handoffs(proxy) == 0)
                // The backend saw the forwarded head the full path would send.
                let forwarded = try #require(origin.lastRequest)
                #expect(forwarded.head.headers["x-forwarded-for"] == ["127.0.0.1"])
                #expect(forwarded.head.headers["x-forwarded-proto"] == ["http"])
                #expect(forwarded.head.headers["x-forwarded-host"] == ["test"])
                #expect(forwarded.head.headers["via"] == ["1.1 ott-proxy"])

                // A body: the same connection goes on through the full path, in order.
                try await connection.send("POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello")
                let posted = try await connection.readResponse()
                #expect(posted.status == 200)
                #expect(posted.bodyText == "hello")
                try await connection.send("GET /echo?after HTTP/1.1\r\nHost: test\r\n\r\n")
                #expect(try await connection.readResponse().header("x-origin-uri") == "/echo?after")
                #expect(try await self.handoffs(proxy) == 1)
                // All of it on one backend connection: the full path took over the connection the fast path had used
                // (and added its HTTP codec to it then, `UpstreamConnection.codecInstalled`).
                #expect(origin.acceptedConnections == 1)
            }
        }
    }

    /// A keyed request on the fast path holds its key's lease from routing to the end of its response (what keeps
    /// a key in use from expiring), and gives it back exactly once.
    @Test func aKeyedRequestHoldsItsLeaseUntilItsResponseEnds() async throws {
        let script = #"function route(req) return { key = "held", pool = "main" } end"#
        try await withLuaProxy(script: script, configure: { config, _ in config.admin = Self.admin }) { proxy, _ in
            let directory = proxy.server.runtime.directory
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            for _ in 0..<2 {
                // (Slow enough that a test task starved by the parallel suite still sees the lease held.)
                try await connection.send("GET /slow/1500 HTTP/1.1\r\nHost: test\r\n\r\n")
                #expect(await WSSupport.waitUntil(timeout: .seconds(2)) { directory.liveCount(of: "held") == 1 })
                let response = try await connection.readResponse()
                #expect(response.status == 200)
                #expect(response.bodyText == "slow\n")
                #expect(await WSSupport.waitUntil(timeout: .seconds(2)) { directory.liveCount(of: "held") == 0 })
            }
            #expect(directory.owner(of: "held") != nil)
            #expect(try await self.handoffs(proxy) == 0)
        }
    }

    /// The fast path builds every head in one buffer per event loop (`LoopState.requestHeads`/`responseHeads`).
    /// A client that stops reading leaves its response heads queued in the proxy while the same loop serves another
    /// client: the queued heads must reach the slow client intact and in order.
    @Test func headsQueuedBehindASlowClientAreNotOverwrittenByOtherConnections() async throws {
        try await withOrigin { origin in
            try await withOneLoopProxy(backends: [(id: "a", port: origin.port)]) { proxy in
                // 8 KB heads: 600 of them are more than the kernel buffers between proxy and client can hold.
                let pad = String(repeating: "p", count: 8_000)
                let count = 600
                let slow = try await RawHTTPConnection.connect(port: proxy.port)
                try await slow.channel.setOption(ChannelOptions.autoRead, value: false).get()
                var burst = ""
                for index in 0..<count { burst += "GET /echo?slow=\(index)&\(pad) HTTP/1.1\r\nHost: test\r\n\r\n" }
                slow.channel.writeAndFlush(ByteBuffer(string: burst), promise: nil)
                try await Task.sleep(for: .milliseconds(300))

                let other = try await RawHTTPConnection.connect(port: proxy.port)
                for index in 0..<100 {
                    try await other.send("GET /echo?other=\(index)&\(pad) HTTP/1.1\r\nHost: test\r\n\r\n")
                    let response = try await other.readResponse()
                    #expect(response.header("x-origin-uri") == "/echo?other=\(index)&\(pad)")
                }
                await other.close()

                try await slow.channel.setOption(ChannelOptions.autoRead, value: true).get()
                slow.channel.read()
                for index in 0..<count {
                    let response = try await slow.readResponse()
                    guard response.status == 200, response.header("x-origin-uri") == "/echo?slow=\(index)&\(pad)" else {
                        Issue.record("response \(index) to the slow client: \(response.status) \(response.header("x-origin-uri")?.prefix(40) ?? "-")")
                        break
                    }
                }
                await slow.close()
            }
        }
    }

    @Test func pipelinedRequestsAreAnsweredInOrder() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "a", port: origin.port)], admin: Self.admin) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                var burst = ""
                for index in 0..<5 { burst += "GET /echo?p=\(index) HTTP/1.1\r\nHost: test\r\n\r\n" }
                try await connection.send(burst)
                for index in 0..<5 {
                    #expect(try await connection.readResponse().header("x-origin-uri") == "/echo?p=\(index)")
                }
                #expect(try await self.handoffs(proxy) == 0)
            }
        }
    }

    /// Requests the fast path leaves to the full path, each on a fresh connection; each must still be answered right.
    @Test(arguments: UnusualRequests.cases)
    func unusualRequestsAreHandedOverAndAnswered(_ request: String, _ status: Int) async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "a", port: origin.port)], admin: Self.admin) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                try await connection.send(request)
                #expect(try await connection.readResponse().status == status)
                #expect(try await self.handoffs(proxy) == 1)
            }
        }
    }

    /// The response-head deadline (one lazily re-armed timer per connection) answers 504 on either path, and the
    /// connection serves the next request, whose own deadline is watched too.
    @Test(arguments: [true, false])
    func aLateResponseHeadAnswers504OnEitherPath(_ fastPath: Bool) async throws {
        try await withOrigin { origin in
            try await withProxy(
                backends: [(id: "a", port: origin.port)],
                configure: {
                    $0.listeners[0].fastPath = fastPath
                    // Long enough that the quick request after each 504 is answered in time on a loaded machine
                    // (the whole suite runs in parallel on two cores).
                    $0.timeouts.upstreamResponseHeader = .seconds(1)
                }
            ) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                for round in 0..<2 {
                    let started = ContinuousClock.now
                    try await connection.send("GET /slow/4000 HTTP/1.1\r\nHost: test\r\n\r\n")
                    let response = try await connection.readResponse()
                    #expect(response.status == 504, "round \(round)")
                    #expect(response.bodyText.contains("did not answer in time"))
                    #expect(ContinuousClock.now - started >= .milliseconds(980))
                    try await connection.send("GET /echo?r=\(round) HTTP/1.1\r\nHost: test\r\n\r\n")
                    #expect(try await connection.readResponse().header("x-origin-uri") == "/echo?r=\(round)")
                }
            }
        }
    }

    /// A request's duration (access log, duration histogram) counts from the first byte of its head, as nginx's
    /// `$request_time` does, on either path: a head sent slowly shows in it, and a request that follows on the same
    /// connection counts from its own first byte.
    @Test(arguments: [true, false])
    func durationsCountFromTheFirstByteOfTheHead(_ fastPath: Bool) async throws {
        try await withOrigin { origin in
            let captured = CapturedLog()
            var config = ProxyConfig(
                listeners: [ListenerConfig(name: "test", address: "127.0.0.1", port: 0, pool: "main")],
                pools: [PoolConfig(name: "main", backends: [BackendConfig(id: "a", host: "127.0.0.1", port: origin.port)])],
                logging: LoggingConfig(level: .warning, format: .logfmt, accessLog: true))
            config.listeners[0].fastPath = fastPath
            config.timeouts.shutdownGrace = .seconds(1)
            let access = Logger(label: "access") { _ in CapturingLogHandler(log: captured) }
            let server = try ProxyServer(config: config, accessLogger: access, group: MultiThreadedEventLoopGroup.singleton)
            try await server.start()
            do {
                let connection = try await RawHTTPConnection.connect(port: try #require(server.listenerPorts["test"]))
                defer { Task { await connection.close() } }
                // The first request of the connection, then a later one: both slow heads, each followed by a quick one.
                for round in 0..<2 {
                    try await connection.send("GET /echo?slow=\(round) HTTP/1.1\r\nHo")
                    try await Task.sleep(for: .seconds(1))
                    try await connection.send("st: test\r\n\r\n")
                    #expect(try await connection.readResponse().status == 200)
                    try await connection.send("GET /echo?quick=\(round) HTTP/1.1\r\nHost: test\r\n\r\n")
                    #expect(try await connection.readResponse().status == 200)
                }
                let logged = await WSSupport.waitUntil(timeout: .seconds(3)) { captured.entries.count >= 4 }
                #expect(logged, "\(captured.entries)")
                var durations: [String: Double] = [:]
                for entry in captured.entries {
                    if case .string(let path) = entry["path"], case .string(let duration) = entry["duration_ms"] {
                        durations[path] = Double(duration)
                    }
                }
                for round in 0..<2 {
                    let slow = try #require(durations["/echo?slow=\(round)"], "\(durations)")
                    let quick = try #require(durations["/echo?quick=\(round)"], "\(durations)")
                    #expect(slow >= 500, "round \(round): \(slow) ms")
                    // Margins of half the 1 s gap either way: the whole suite runs in parallel on two cores, and a busy
                    // event loop reads a part late. From the previous head, a quick request would take over 1 s.
                    #expect(quick < 500, "round \(round): \(quick) ms")
                }
            } catch {
                await server.shutdown()
                throw error
            }
            await server.shutdown()
        }
    }

    /// A script with an `on_response` that reads only the head stays on the fast path, and its claims take effect.
    @Test func onResponseClaimsFromHeadsStayOnTheFastPath() async throws {
        let script = """
            function route(req)
                local creator = req.headers["x-create-on"]
                if creator then return { backend = creator } end
                return { key = "room:" .. req.args.room, pool = "main", place = "rendezvous" }
            end

            function on_response(req, res)
                local uri = res.headers["x-origin-uri"]
                local room = uri and uri:match("claim=([%w-]+)")
                if room then return { claim = "room:" .. room } end
                return nil
            end
            """
        // A room that rendezvous hashing would put elsewhere than on `a`, where the claim puts it.
        let room = try #require((0..<100).map { "r\($0)" }.first { NamedOrigins.rendezvous("room:\($0)", among: ["a", "b", "c"]) != "a" })
        try await withLuaProxy(script: script, configure: { config, _ in config.admin = Self.admin }) { proxy, origins in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            let created = try await connection.request(
                "GET", "/echo?claim=\(room)", marker: "create", headers: [("x-create-on", "a")])
            #expect(created.status == 200)
            #expect(origins.receivers(of: "create") == ["a"])
            for index in 0..<3 {
                let response = try await connection.request("GET", "/echo?room=\(room)", marker: "after-\(index)")
                #expect(response.status == 200)
                #expect(origins.receivers(of: "after-\(index)") == ["a"])
            }
            #expect(try await self.handoffs(proxy) == 0)
        }
    }

    /// The responses in what a client received, as status, ordered header fields and body. Reason phrases and chunk
    /// boundaries are left out: the full path re-chunks bodies and drops reason phrases NIO does not know, the fast
    /// path relays both as the backend sent them. A `502`'s body is left out too (it says why in each path's words).
    private func responses(_ bytes: [UInt8], method: String) -> [String] {
        var rest = bytes
        var result: [String] = []
        while !rest.isEmpty, case .complete(let response, let consumed) = RawHTTPConnection.parse(rest, method: method, closed: true) {
            let fields = response.headers.map { "\($0.0): \($0.1)" }.joined(separator: "|")
            result.append("\(response.status) [\(fields)] \(response.status == 502 ? "" : response.bodyText)")
            rest.removeFirst(consumed)
        }
        return result
    }

    /// Scripted backend answers, relayed by a proxy with the fast path and one without: the client gets the same
    /// responses (and, where neither reason phrases nor chunks are involved, the same bytes).
    @Test(arguments: [
        ("GET", "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nKeep-Alive: timeout=5\r\nContent-Length: 5\r\n\r\nhello"),
        ("GET", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"),
        ("GET", "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nclose-delimited body"),
        ("GET", "HTTP/1.0 200 OK\r\n\r\nold server"),
        ("GET", "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"),
        ("HEAD", "HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n"),
        ("GET", "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ("GET", "HTTP/1.1 200 OK\r\nConnection: x-private\r\nX-Private: 1\r\nContent-Length: 2\r\n\r\nok"),
        ("GET", "HTTP/1.1 299 Custom Thing\r\nVia: 1.0 upstream\r\nContent-Length: 2\r\n\r\nok"),
        ("GET", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"),  // truncated: both close the connection
        ("GET", "NOT HTTP\r\n\r\n"),
    ])
    func bothPathsRelayTheSameBytes(_ method: String, _ response: String) async throws {
        let origin = try await RawOrigin.start(response: response)
        defer { Task { await origin.stop() } }
        var received: [Bool: [UInt8]] = [:]
        for fastPath in [true, false] {
            try await withProxy(
                backends: [(id: "raw", port: origin.port)], admin: Self.admin,
                configure: { $0.listeners[0].fastPath = fastPath }
            ) { proxy in
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                try await connection.send("\(method) /x HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                received[fastPath] = try await connection.readUntilClosed()
                if fastPath { #expect(try await self.handoffs(proxy) == 0) }
            }
        }
        let fast = try #require(received[true])
        let full = try #require(received[false])
        #expect(!fast.isEmpty)
        #expect(self.responses(fast, method: method) == self.responses(full, method: method))
        let plain = !response.contains("chunked") && !response.contains("Custom") && !response.contains("Early") && !response.hasPrefix("NOT")
        if plain {
            #expect(String(decoding: fast, as: UTF8.self) == String(decoding: full, as: UTF8.self))
        }
    }

    /// The backend closes a pooled connection just as the next request is sent on it: a request without a body is
    /// sent again on a fresh connection (the client never sees the race), on either path.
    @Test(arguments: [true, false])
    func aReusedConnectionClosedByTheBackendIsRetried(_ fastPath: Bool) async throws {
        let origin = try await RawOrigin.start(
            response: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", closeAfterResponse: false, closeOnNextRequest: true)
        defer { Task { await origin.stop() } }
        try await withProxy(
            backends: [(id: "raw", port: origin.port)], admin: Self.admin, configure: { $0.listeners[0].fastPath = fastPath }
        ) { proxy in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            for index in 0..<3 {
                try await connection.send("GET /\(index) HTTP/1.1\r\nHost: test\r\n\r\n")
                let response = try await connection.readResponse()
                #expect(response.status == 200)
                #expect(response.bodyText == "ok")
            }
            // One connection per request: each reuse attempt was closed and retried.
            #expect(origin.acceptedConnections == 3)
            #expect(try await self.handoffs(proxy) == 0)
        }
    }
}
