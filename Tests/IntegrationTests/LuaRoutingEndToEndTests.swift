import DemoBackends
import Foundation
import LuaRouting
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ProxyCore
import Testing

/// Lua routing scripts driving the real proxy: every decision form, the error paths, WebSockets keyed by path, and
/// two event loops routing at once. Backends are told apart by a marker header each request carries (see
/// `NamedOrigins`), or by the backend id a `RoomServer` reports.
@Suite struct LuaRoutingEndToEndTests {
    // MARK: Decisions

    static let keyedScript = """
        function route(req)
            local room = req.args.room
            if room then
                return { key = "room:" .. room, pool = "main", place = "rendezvous" }
            end
            return { pool = "main" }
        end
        """

    @Test func keyedRequestsOfOneKeyAlwaysReachOneBackendAndKeysSpread() async throws {
        try await withLuaProxy(script: Self.keyedScript) { proxy, origins in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            var receivers: [String: Set<String>] = [:]
            // Rounds interleave the keys, so a balancer that merely rotates could not keep a key on one backend.
            for round in 0..<5 {
                for key in 0..<50 {
                    let marker = "k\(key)-\(round)"
                    let response = try await connection.request("GET", "/echo?room=k\(key)", marker: marker)
                    #expect(response.status == 200)
                    receivers["k\(key)", default: []].formUnion(origins.receivers(of: marker))
                }
            }
            #expect(receivers.count == 50)
            for (key, backends) in receivers.sorted(by: { $0.key < $1.key }) {
                #expect(backends.count == 1, "\(key) reached \(backends.sorted())")
                // The same placement as the core's (and any other proxy instance's): rendezvous over the pool.
                #expect(backends.first == NamedOrigins.rendezvous("room:\(key)", among: ["a", "b", "c"]), "\(key)")
            }
            let used = Set(receivers.values.compactMap(\.first))
            #expect(used.count > 1, "every key landed on \(used.sorted())")
            #expect(origins.totalRequests == 250)
        }
    }

    @Test func backendAndPoolDecisionsReachWhatTheyName() async throws {
        let script = """
            function route(req)
                local want = req.headers["x-want"]
                if want == "backend" then return { backend = req.headers["x-id"] } end
                if want == "pool" then return { pool = "pair" } end
                return { pool = "main" }
            end
            """
        try await withLuaProxy(
            script: script,
            configure: { config, origins in
                let backends = origins.backends.map { BackendConfig(id: $0.id, host: "127.0.0.1", port: $0.port) }
                config.pools = [
                    PoolConfig(name: "main", backends: [backends[0]]),
                    PoolConfig(name: "pair", backends: Array(backends[1...])),
                ]
            }
        ) { proxy, origins in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            for id in ["c", "a", "b", "c"] {
                let marker = "backend-\(id)-\(UUID().uuidString)"
                let response = try await connection.request(
                    "GET", "/echo", marker: marker, headers: [("x-want", "backend"), ("x-id", id)])
                #expect(response.status == 200)
                #expect(origins.receivers(of: marker) == [id])
            }
            var poolReceivers: [String] = []
            for index in 0..<6 {
                let marker = "pool-\(index)"
                let response = try await connection.request("GET", "/echo", marker: marker, headers: [("x-want", "pool")])
                #expect(response.status == 200)
                poolReceivers += origins.receivers(of: marker)
            }
            #expect(poolReceivers.count == 6)
            // Only the pool's backends, and its balancer spreads over both of them.
            #expect(Set(poolReceivers) == ["b", "c"], "\(poolReceivers)")
            let marker = "default"
            _ = try await connection.request("GET", "/echo", marker: marker)
            #expect(origins.receivers(of: marker) == ["a"])
        }
    }

    @Test func respondDecisionAnswersLocallyWithExactlyWhatTheScriptGave() async throws {
        let script = """
            function route(req)
                if req.path == "/tea" then
                    return { respond = { status = 418, headers = { ["x-a"] = "b", ["x-n"] = 7 }, body = "teapot" } }
                end
                if req.path == "/json" then
                    return { respond = { status = 200, headers = { ["content-type"] = "application/json" },
                                         body = '{"ok":true}' } }
                end
                return { pool = "main" }
            end
            """
        try await withLuaProxy(script: script) { proxy, origins in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            let tea = try await connection.request("GET", "/tea")
            #expect(tea.status == 418)
            #expect(tea.header("x-a") == "b")
            #expect(tea.header("x-n") == "7")
            #expect(tea.bodyText == "teapot")
            #expect(tea.header("content-length") == "6")
            let json = try await connection.request("GET", "/json")
            #expect(json.status == 200)
            #expect(json.header("content-type") == "application/json")
            #expect(json.bodyText == #"{"ok":true}"#)
            // The connection stays usable, and no backend saw either request.
            let forwarded = try await connection.request("GET", "/echo", marker: "after")
            #expect(forwarded.status == 200)
            #expect(origins.totalRequests == 1)
        }
    }

    static let bodyScript = """
        function route(req)
            if req.method ~= "POST" then return { pool = "main" } end
            if req.body == nil then return { need_body = true } end
            local doc, err = proxy.json.decode(req.body)
            if doc == nil then return { respond = { status = 400, body = "bad json: " .. err } } end
            return { backend = doc.backend }
        end
        """

    @Test func needBodyRoutesOnAJSONFieldAndTheBodyArrivesIntact() async throws {
        try await withLuaProxy(script: Self.bodyScript) { proxy, origins in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            for id in ["b", "c", "a"] {
                let body = #"{"backend":"\#(id)","pad":"\#(String(repeating: "x", count: 3000))","text":"caf\#u{e9} ✓"}"#
                let marker = "body-\(id)"
                let response = try await connection.request("POST", "/echo", marker: marker, body: body)
                #expect(response.status == 200)
                #expect(response.bodyText == body)
                #expect(origins.receivers(of: marker) == [id])
                let received = try #require(origins.origin(id).lastRequest)
                #expect(received.bodyText == body)
                #expect(received.head.headers.first(name: "content-length") == String(body.utf8.count))
            }

            // A chunked body is collected too, and forwarded with its length.
            let body = #"{"backend":"b","n":1}"#
            let split = body.utf8.count / 2
            let first = String(body.utf8.prefix(split))!
            let second = String(body.utf8.dropFirst(split))!
            try await connection.send(
                "POST /echo HTTP/1.1\r\nHost: test\r\n\(NamedOrigins.markerHeader): chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + String(first.utf8.count, radix: 16) + "\r\n" + first + "\r\n")
            try await Task.sleep(for: .milliseconds(20))
            try await connection.send(String(second.utf8.count, radix: 16) + "\r\n" + second + "\r\n0\r\n\r\n")
            let response = try await connection.readResponse()
            #expect(response.status == 200)
            #expect(response.bodyText == body)
            #expect(origins.receivers(of: "chunked") == ["b"])
            #expect(origins.origin("b").lastRequest?.bodyText == body)

            let bad = try await connection.request("POST", "/echo", body: "{not json")
            #expect(bad.status == 400)
            #expect(bad.bodyText.hasPrefix("bad json"))
        }
    }

    @Test func needBodyOverTheBufferLimitIs413() async throws {
        let limit = 1024
        try await withLuaProxy(
            script: Self.bodyScript,
            configure: { config, _ in config.limits.maxBufferedBody = limit }
        ) { proxy, origins in
            func body(_ size: Int) -> String {
                let prefix = #"{"backend":"a","pad":""#
                return prefix + String(repeating: "p", count: size - prefix.utf8.count - 2) + #""}"#
            }
            // Exactly the limit still fits.
            let fits = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await fits.close() } }
            let ok = try await fits.request("POST", "/echo", body: body(limit))
            #expect(ok.status == 200)
            #expect(ok.body.count == limit)

            // One byte more, announced by Content-Length: refused before reading it.
            let announced = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await announced.close() } }
            let tooLarge = try await announced.request("POST", "/echo", body: body(limit + 1))
            #expect(tooLarge.status == 413)
            #expect(await announced.waitForClose())

            // Chunked: refused once the collected body passes the limit.
            let chunked = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await chunked.close() } }
            let chunk = String(repeating: "q", count: 600)
            try await chunked.send(
                "POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n\(chunk)\r\n258\r\n\(chunk)\r\n")
            let refused = try await chunked.readResponse()
            #expect(refused.status == 413)
            #expect(await chunked.waitForClose())

            #expect(origins.totalRequests == 1)
        }
    }

    @Test func headerAndPathRewritesAreWhatTheBackendSees() async throws {
        let script = """
            function route(req)
                return {
                    pool = "main",
                    path = "/echo",
                    set_headers = { ["x-tenant"] = "acme", ["x-count"] = 42, ["x-keep"] = "replaced" },
                    remove_headers = { "cookie", "X-Secret" },
                }
            end
            """
        try await withLuaProxy(script: script) { proxy, origins in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            let response = try await connection.request(
                "GET", "/api/v1/items?x=1&y=two%20words", marker: "rewrite",
                headers: [("Cookie", "session=s3cr3t"), ("X-Secret", "hush"), ("X-Keep", "original"), ("X-Other", "o")])
            #expect(response.status == 200)
            #expect(response.header("x-origin-uri") == "/echo?x=1&y=two%20words")
            let receiver = try #require(origins.receivers(of: "rewrite").first)
            let head = try #require(origins.origin(receiver).lastRequest?.head)
            #expect(head.uri == "/echo?x=1&y=two%20words")
            #expect(head.headers["x-tenant"] == ["acme"])
            #expect(head.headers["x-count"] == ["42"])
            #expect(head.headers["x-keep"] == ["replaced"])
            #expect(head.headers["x-other"] == ["o"])
            #expect(!head.headers.contains(name: "cookie"))
            #expect(!head.headers.contains(name: "x-secret"))

            // Without a query, the path is replaced alone.
            let plain = try await connection.request("GET", "/somewhere/else", marker: "plain")
            #expect(plain.header("x-origin-uri") == "/echo")
        }
    }

    @Test func aKeyClaimedInOnResponseRoutesToTheBackendThatAnswered() async throws {
        let script = """
            function route(req)
                local creator = req.headers["x-create-on"]
                if creator then return { backend = creator, response_body = true } end
                return { key = "room:" .. req.args.room, pool = "main", place = "rendezvous" }
            end

            function on_response(req, res)
                if res.body == nil then return nil end
                local doc = proxy.json.decode(res.body)
                if doc and doc.room then return { claim = "room:" .. doc.room } end
                return {}
            end
            """
        // A room that rendezvous hashing would put elsewhere than on `a`, where it is created.
        let room = try #require((0..<100).map { "r\($0)" }.first { NamedOrigins.rendezvous("room:\($0)", among: ["a", "b", "c"]) != "a" })
        let hashed = NamedOrigins.rendezvous("room:\(room)", among: ["a", "b", "c"])
        try await withLuaProxy(script: script) { proxy, origins in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            _ = try await connection.request("GET", "/echo?room=\(room)", marker: "before")
            #expect(origins.receivers(of: "before") == [hashed])

            let created = try await connection.request(
                "POST", "/echo", marker: "create", headers: [("x-create-on", "a")], body: #"{"room":"\#(room)","x":1}"#)
            #expect(created.status == 200)
            #expect(origins.receivers(of: "create") == ["a"])

            // On this connection and on a fresh one (the claim is not per connection or per loop).
            let other = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await other.close() } }
            for (index, client) in [connection, other, connection, other].enumerated() {
                let marker = "after-\(index)"
                let response = try await client.request("GET", "/echo?room=\(room)", marker: marker)
                #expect(response.status == 200)
                #expect(origins.receivers(of: marker) == ["a"])
            }
            // Other rooms still go where hashing puts them.
            let otherRoom = room + "-unclaimed"
            _ = try await connection.request("GET", "/echo?room=\(otherRoom)", marker: "unclaimed")
            #expect(origins.receivers(of: "unclaimed") == [NamedOrigins.rendezvous("room:\(otherRoom)", among: ["a", "b", "c"])])
        }
    }

    // MARK: Errors

    static let failingScript = """
        function route(req)
            local fail = req.args.fail
            if fail == "runtime" then local t = nil; return t.field end
            if fail == "loop" then while true do end end
            if fail == "bomb" then
                local t = {}
                for i = 1, 100000 do t[i] = string.rep("x", 65536) .. i end
                return { pool = "main" }
            end
            if fail == "decision" then return { key = "k" } end
            if fail == "unknown-pool" then return { pool = "nope" } end
            if fail == "unknown-backend" then return { backend = "zz" } end
            return { pool = "main" }
        end
        """

    static func failingRouting(_ settings: inout RoutingScriptConfig) {
        settings.instructionLimit = 200_000
        settings.memoryLimit = 2 << 20
    }

    @Test(arguments: ["runtime", "loop", "bomb", "decision", "unknown-pool", "unknown-backend"])
    func aFailingRouteIs500AndTheNextRequestIsServed(failure: String) async throws {
        try await withLuaProxy(script: Self.failingScript, routing: Self.failingRouting) { proxy, origins in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            for round in 0..<3 {
                let failed = try await connection.request("GET", "/echo?fail=\(failure)", marker: "fail-\(round)")
                #expect(failed.status == 500)
                #expect(failed.bodyText.contains("routing error"), "body: \(failed.bodyText)")
                // Nothing about the script leaks to the client.
                for secret in [".lua", "traceback", "attempt to", "limit", "field", "nope", "zz", "string.rep"] {
                    #expect(!failed.bodyText.contains(secret), "body: \(failed.bodyText)")
                }
                #expect(origins.receivers(of: "fail-\(round)").isEmpty)
                // The same connection, and the same Lua state, serve the next request.
                let next = try await connection.request("GET", "/echo?ok=\(round)", marker: "ok-\(round)")
                #expect(next.status == 200)
                #expect(origins.receivers(of: "ok-\(round)").count == 1)
            }
        }
    }

    @Test(arguments: ["runtime", "loop", "bomb", "decision"])
    func aFailingScriptFallsBackToTheFallbackPool(failure: String) async throws {
        try await withLuaProxy(
            script: Self.failingScript,
            routing: { settings in
                Self.failingRouting(&settings)
                settings.fallbackPool = "spare"
            },
            configure: { config, origins in
                let backends = origins.backends.map { BackendConfig(id: $0.id, host: "127.0.0.1", port: $0.port) }
                config.pools = [
                    PoolConfig(name: "main", backends: Array(backends[..<2])),
                    PoolConfig(name: "spare", backends: [backends[2]]),
                ]
            }
        ) { proxy, origins in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            for round in 0..<2 {
                let marker = "fallback-\(round)"
                let response = try await connection.request("GET", "/echo?fail=\(failure)", marker: marker)
                #expect(response.status == 200)
                #expect(origins.receivers(of: marker) == ["c"])
                let normal = try await connection.request("GET", "/echo", marker: "normal-\(round)")
                #expect(normal.status == 200)
                #expect(origins.receivers(of: "normal-\(round)").first != "c")
            }
        }
    }

    // MARK: WebSockets

    static let pathKeyScript = """
        function route(req)
            local room = req.path:match("^/rooms/([^/]+)")
            if room then return { key = "room:" .. room, pool = "main", place = "rendezvous" } end
            return { pool = "main" }
        end
        """

    struct Joined: Decodable {
        var event: String
        var room: String
        var backend: String
        var members: Int
    }

    struct UnexpectedMessage: Error {
        var message: WebSocketClient.Message?
    }

    static func joined(_ client: WebSocketClient) async throws -> Joined {
        let message = try await LuaSupport.withTimeout("joined message") { try await client.receive() }
        guard case .text(let text) = message else {
            throw UnexpectedMessage(message: message)
        }
        return try JSONDecoder().decode(Joined.self, from: Data(text.utf8))
    }

    @Test func webSocketsOfOneRoomLandOnOneBackend() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        var started: [RoomServer] = []
        for id in ["r1", "r2", "r3"] { started.append(try await RoomServer.start(id: id, group: group)) }
        let servers = started
        defer { Task { for server in servers { try? await server.stop() } } }
        let directory = try ScriptDirectory()
        defer { directory.remove() }
        let proxy = try await startLuaProxy(
            script: Self.pathKeyScript, directory: directory, backends: servers.map { ($0.id, $0.port) })
        var used: Set<String> = []
        do {
            for index in 0..<20 {
                let room = "room\(index)"
                let first = try await WebSocketClient.connect(host: "127.0.0.1", port: proxy.port, path: "/rooms/\(room)/ws", group: group)
                let firstJoined = try await Self.joined(first)
                let second = try await WebSocketClient.connect(host: "127.0.0.1", port: proxy.port, path: "/rooms/\(room)/ws", group: group)
                let secondJoined = try await Self.joined(second)
                #expect(firstJoined.room == room)
                #expect(firstJoined.backend == secondJoined.backend, "\(room)")
                #expect(firstJoined.members == 1)
                #expect(secondJoined.members == 2, "\(room): the second client is in the same room instance")
                #expect(firstJoined.backend == NamedOrigins.rendezvous("room:\(room)", among: ["r1", "r2", "r3"]))
                used.insert(firstJoined.backend)
                await first.close()
                await second.close()
            }
        } catch {
            await proxy.stop()
            throw error
        }
        await proxy.stop()
        #expect(used.count > 1, "all rooms on \(used.sorted())")
    }

    /// The usual client flow: look at the room over HTTP, then join it over a WebSocket. Both are keyed to the same
    /// backend, so the proxy holds an idle keep-alive connection to it when the upgrade comes (one loop: the same
    /// upstream pool). A SwiftNIO server only upgrades on the first request of a connection.
    @Test func aWebSocketAfterAPlainRequestToTheSameBackendStillUpgrades() async throws {
        let proxyGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let group = MultiThreadedEventLoopGroup.singleton
        let server = try await RoomServer.start(id: "r1", group: group)
        let directory = try ScriptDirectory()
        let proxy = try await startLuaProxy(
            script: Self.pathKeyScript, directory: directory, backends: [(server.id, server.port)], group: proxyGroup)
        let outcome: Result<Void, Error>
        do {
            for index in 0..<3 {
                let room = "lobby\(index)"
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                let info = try await connection.request("GET", "/rooms/\(room)")
                await connection.close()
                #expect(info.status == 200)
                let client = try await WebSocketClient.connect(host: "127.0.0.1", port: proxy.port, path: "/rooms/\(room)/ws", group: group)
                let joined = try await Self.joined(client)
                #expect(joined.room == room)
                #expect(joined.backend == "r1")
                await client.close()
            }
            outcome = .success(())
        } catch {
            outcome = .failure(error)
        }
        await proxy.stop()
        try? await server.stop()
        try? await proxyGroup.shutdownGracefully()
        directory.remove()
        try outcome.get()
    }

    // MARK: Two event loops

    /// Counts `route` calls per event loop around the real Lua policy.
    final class CountingPolicy: RoutingPolicy {
        let inner: RoutingPolicy
        let loop: ObjectIdentifier
        let calls: NIOLockedValueBox<[ObjectIdentifier: Int]>

        init(inner: RoutingPolicy, loop: ObjectIdentifier, calls: NIOLockedValueBox<[ObjectIdentifier: Int]>) {
            self.inner = inner
            self.loop = loop
            self.calls = calls
        }

        func route(_ request: RouteRequest) throws -> RouteDecision {
            self.calls.withLockedValue { $0[self.loop, default: 0] += 1 }
            return try self.inner.route(request)
        }

        var observesResponses: Bool { self.inner.observesResponses }

        func onResponse(_ request: RouteRequest, _ response: RouteResponse) throws -> ResponseAction? {
            try self.inner.onResponse(request, response)
        }
    }

    struct RoomInfo: Decodable {
        var room: String
        var backend: String
    }

    @Test func twoEventLoopsRouteConcurrently() async throws {
        let proxyGroup = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let backendGroup = MultiThreadedEventLoopGroup.singleton
        var servers: [RoomServer] = []
        for id in ["r1", "r2", "r3"] { servers.append(try await RoomServer.start(id: id, group: backendGroup)) }
        let directory = try ScriptDirectory()
        let calls = NIOLockedValueBox<[ObjectIdentifier: Int]>([:])
        let lua = LuaSupport.factory()
        let factory: RoutingPolicyFactory = { listener, loop, environment in
            CountingPolicy(inner: try lua(listener, loop, environment), loop: ObjectIdentifier(loop), calls: calls)
        }
        let proxy = try await startLuaProxy(
            script: Self.pathKeyScript, directory: directory, backends: servers.map { ($0.id, $0.port) }, group: proxyGroup,
            policyFactory: factory)
        let port = proxy.port
        let outcome: Result<[(room: String, backend: String?, header: String?, status: Int)], Error>
        do {
            let results = try await withThrowingTaskGroup(of: [(room: String, backend: String?, header: String?, status: Int)].self) { group in
                for connectionIndex in 0..<100 {
                    group.addTask {
                        let connection = try await RawHTTPConnection.connect(port: port, group: backendGroup)
                        defer { Task { await connection.close() } }
                        var results: [(room: String, backend: String?, header: String?, status: Int)] = []
                        for request in 0..<2 {
                            let room = "c\(connectionIndex)-\(request)"
                            let response = try await connection.request("GET", "/rooms/\(room)")
                            let info = try? JSONDecoder().decode(RoomInfo.self, from: Data(response.body))
                            results.append((room, info?.backend, response.header("x-backend"), response.status))
                        }
                        return results
                    }
                }
                var all: [(room: String, backend: String?, header: String?, status: Int)] = []
                for try await results in group { all += results }
                return all
            }
            outcome = .success(results)
        } catch {
            outcome = .failure(error)
        }
        await proxy.stop()
        for server in servers { try? await server.stop() }
        try? await proxyGroup.shutdownGracefully()
        directory.remove()

        let results = try outcome.get()
        #expect(results.count == 200)
        for result in results {
            let expected = NamedOrigins.rendezvous("room:\(result.room)", among: ["r1", "r2", "r3"])
            #expect(result.status == 200, "\(result.room)")
            #expect(result.backend == expected, "\(result.room)")
            #expect(result.header == expected, "\(result.room)")
        }
        let perLoop = calls.withLockedValue { $0 }
        #expect(perLoop.count == 2, "route ran on \(perLoop.count) loop(s)")
        #expect(perLoop.values.allSatisfy { $0 > 0 })
        #expect(perLoop.values.reduce(0, +) == 200)
    }
}
