import DemoBackends
import Foundation
import Logging
import NIOCore
import NIOPosix
import ProxyCore
import RedisTestSupport
import Testing

/// Reloading a configuration whose listener runs a Lua script: in process (`reload()`, admin `POST /reload`) and in
/// the built executable (SIGHUP). New requests follow the new script, open tunnels keep working, and a broken script
/// leaves the previous generation in force.
@Suite struct ReloadTests {
    static let group = MultiThreadedEventLoopGroup.singleton

    static func script(routingTo backend: String) -> String {
        """
        -- every request, WebSocket upgrades included, goes to one backend
        function route(req)
            return { backend = "\(backend)" }
        end
        """
    }

    /// A syntax error on line 3.
    static let brokenScript = """
        function route(req)
            return { backend = "a" }
        end end
        """

    static func configYAML(listenerPort: Int, backends: [RoomServer], admin: Bool) -> String {
        var yaml = """
            listeners:
              - name: public
                address: 127.0.0.1
                port: \(listenerPort)
                pool: rooms
                routing:
                  script: route.lua
            pools:
              rooms:
                backends:

            """
        for backend in backends {
            yaml += "      - id: \(backend.id)\n        address: 127.0.0.1:\(backend.port)\n"
        }
        yaml += """
            timeouts:
              shutdown_grace: 1s
            logging:
              level: warning
              access_log: false

            """
        if admin {
            yaml += "admin:\n  address: 127.0.0.1\n  port: 2\n"
        }
        return yaml
    }

    /// Two room servers, `a` and `b`, and a proxy started from a YAML file in `directory` whose script routes to `a`.
    /// The file names ports 1 and 2 (it must name valid ones); the config source binds port 0 instead, on every read, so a
    /// reload sees the same listener.
    static func withReloadableProxy(
        admin: Bool = false,
        _ body: (ProxyServer, ScriptDirectory, [RoomServer]) async throws -> Void
    ) async throws {
        let directory = try ScriptDirectory()
        defer { directory.remove() }
        let a = try await RoomServer.start(id: "a", group: Self.group)
        let b = try await RoomServer.start(id: "b", group: Self.group)
        defer {
            Task {
                try? await a.stop()
                try? await b.stop()
            }
        }
        try directory.write("route.lua", Self.script(routingTo: "a"))
        let configPath = try directory.write("proxy.yaml", Self.configYAML(listenerPort: 1, backends: [a, b], admin: admin))
        let source: @Sendable () throws -> ProxyConfig = {
            var config = try ConfigLoader.load(path: configPath)
            config.listeners[0].port = 0
            if config.admin != nil { config.admin!.port = 0 }
            return config
        }
        let server = try ProxyServer(
            config: try source(), logger: LuaSupport.quietLogger, accessLogger: LuaSupport.quietLogger, group: Self.group,
            policyFactory: LuaSupport.factory(), configSource: source)
        try await server.start()
        do {
            try await body(server, directory, [a, b])
        } catch {
            await server.shutdown()
            throw error
        }
        await server.shutdown()
    }

    /// The backend that answered a plain request (room servers name themselves in `X-Backend`).
    static func backend(of connection: RawHTTPConnection) async throws -> String? {
        let response = try await connection.request("GET", "/whoami")
        #expect(response.status == 200)
        return response.header("x-backend")
    }

    static func backendOnFreshConnection(port: Int) async throws -> String? {
        let connection = try await RawHTTPConnection.connect(port: port)
        defer { Task { await connection.close() } }
        return try await self.backend(of: connection)
    }

    static func next(_ client: WebSocketClient) async throws -> WebSocketClient.Message? {
        try await LuaSupport.withTimeout("WebSocket message") { try await client.receive() }
    }

    @Test func reloadSwitchesNewRequestsKeepsTunnelsAndRefusesABrokenScript() async throws {
        try await Self.withReloadableProxy { server, directory, _ in
            let port = try #require(server.listenerPorts["public"])
            let keptAlive = try await RawHTTPConnection.connect(port: port)
            defer { Task { await keptAlive.close() } }
            #expect(try await Self.backend(of: keptAlive) == "a")

            let socket = try await WebSocketClient.connect(host: "127.0.0.1", port: port, path: "/rooms/lobby/ws", group: Self.group)
            guard case .text(let joined) = try await Self.next(socket) else {
                Issue.record("no joined message")
                return
            }
            #expect(joined.contains(#""backend":"a""#))

            try directory.write("route.lua", Self.script(routingTo: "b"))
            let reloaded = await server.reload()
            #expect(try reloaded.get() == 2)
            #expect(server.runtime.generation == 2)
            #expect(try await Self.backendOnFreshConnection(port: port) == "b")
            // A connection opened before the reload follows the new script from its next request on.
            #expect(try await Self.backend(of: keptAlive) == "b")

            // The tunnel opened under the old script still carries frames both ways, to the backend it started on.
            try await socket.sendBinary([1, 2, 3, 250])
            #expect(try await Self.next(socket) == .binary([1, 2, 3, 250]))
            try await socket.sendText("still here")
            guard case .text(let echoed) = try await Self.next(socket) else {
                Issue.record("no message event")
                return
            }
            #expect(echoed.contains(#""text":"still here""#))
            #expect(echoed.contains(#""backend":"a""#))

            // A script that does not compile: refused with its position, the previous generation stays.
            try directory.write("route.lua", Self.brokenScript)
            let refused = await server.reload()
            guard case .failure(let error) = refused else {
                Issue.record("a broken script was accepted: \(refused)")
                return
            }
            #expect(error.description.contains("\(directory.path("route.lua")):3:"), "\(error)")
            #expect(server.runtime.generation == 2)
            #expect(try await Self.backendOnFreshConnection(port: port) == "b")
            #expect(try await Self.backend(of: keptAlive) == "b")
            try await socket.sendBinary([9])
            #expect(try await Self.next(socket) == .binary([9]))
            await socket.close()
        }
    }

    /// A reload that keeps a backend's id but moves it to another address: the pooled keep-alive connections to the
    /// old address must not serve the new backend. (The pool once looked connections up by backend id, and a
    /// request after such a reload went to the old address.)
    @Test func reloadMovingABackendIdToAnotherAddressDoesNotReuseItsPooledConnections() async throws {
        try await Self.withReloadableProxy { server, directory, backends in
            let (a, b) = (backends[0], backends[1])
            let port = try #require(server.listenerPorts["public"])
            let client = try await RawHTTPConnection.connect(port: port)
            defer { Task { await client.close() } }
            // Two requests, so the second surely found the first's backend connection back in the pool.
            #expect(try await Self.backend(of: client) == "a")
            #expect(try await Self.backend(of: client) == "a")

            let moved = Self.configYAML(listenerPort: 1, backends: [a, b], admin: false)
                .replacingOccurrences(of: "127.0.0.1:\(a.port)", with: "127.0.0.1:\(b.port)")
            #expect(moved.contains("id: a\n        address: 127.0.0.1:\(b.port)"))
            try directory.write("proxy.yaml", moved)
            #expect(try await server.reload().get() == 2)
            // The same client connection (so the same event loop and pool): backend `a` is now the server at b's port.
            #expect(try await Self.backend(of: client) == "b")
            #expect(try await Self.backendOnFreshConnection(port: port) == "b")
        }
    }

    @Test func adminPostReloadAnswersWithTheOutcome() async throws {
        try await Self.withReloadableProxy(admin: true) { server, directory, _ in
            let port = try #require(server.listenerPorts["public"])
            let adminPort = try #require(server.adminPort)
            #expect(try await Self.backendOnFreshConnection(port: port) == "a")

            func postReload() async throws -> RawHTTPConnection.Response {
                let admin = try await RawHTTPConnection.connect(port: adminPort)
                defer { Task { await admin.close() } }
                return try await admin.request("POST", "/reload", headers: [("Content-Length", "0")])
            }

            try directory.write("route.lua", Self.script(routingTo: "b"))
            let accepted = try await postReload()
            #expect(accepted.status == 200)
            #expect(accepted.header("content-type") == "application/json")
            let object = try #require(try JSONSerialization.jsonObject(with: Data(accepted.body)) as? [String: Any])
            #expect(object["reloaded"] as? Bool == true)
            #expect(object["generation"] as? Int == 2)
            #expect(try await Self.backendOnFreshConnection(port: port) == "b")

            try directory.write("route.lua", Self.brokenScript)
            let refused = try await postReload()
            #expect(refused.status == 422)
            let error = try #require(try JSONSerialization.jsonObject(with: Data(refused.body)) as? [String: Any])
            #expect(error["reloaded"] as? Bool == false)
            let message = try #require(error["error"] as? String)
            #expect(message.contains("route.lua:3:"), "\(message)")
            #expect(server.runtime.generation == 2)
            #expect(try await Self.backendOnFreshConnection(port: port) == "b")
        }
    }

    /// A hangup sent as soon as the listener accepts (a deploy tool reloading right after a start) must not kill the
    /// proxy. The window this guards was a few milliseconds wide, so the test tries several starts.
    @Test func sighupRightAfterStartDoesNotKillTheExecutable() async throws {
        let directory = try ScriptDirectory()
        defer { directory.remove() }
        let a = try await RoomServer.start(id: "a", group: Self.group)
        defer { Task { try? await a.stop() } }
        try directory.write("route.lua", Self.script(routingTo: "a"))
        for attempt in 0..<6 {
            let port = try await CLITests.freePort()
            let configPath = try directory.write("proxy.yaml", Self.configYAML(listenerPort: port, backends: [a], admin: false))
            let process = SpawnedProcess(executable: try CLITests.executable().path, arguments: ["run", "--config", configPath])
            try process.run()
            let accepting = await WSSupport.waitUntil(timeout: .seconds(10)) {
                guard process.isRunning, let connection = try? await RawHTTPConnection.connect(port: port) else { return false }
                await connection.close()
                return true
            }
            #expect(accepting, "attempt \(attempt): never listened")
            kill(process.processIdentifier, SIGHUP)
            let served = await WSSupport.waitUntil(timeout: .seconds(5)) {
                (try? await Self.backendOnFreshConnection(port: port)) == "a"
            }
            let alive = process.isRunning
            process.terminate()
            let exited = await WSSupport.waitUntil(timeout: .seconds(5)) { !process.isRunning }
            if !exited { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
            #expect(alive && served, "attempt \(attempt): the early SIGHUP ended the process (\(process.terminationReason), \(process.terminationStatus))")
            #expect(process.terminationReason == .exit && process.terminationStatus == 0, "attempt \(attempt)")
            if !(alive && served) { break }
        }
    }

    @Test func sighupReloadsTheRunningExecutable() async throws {
        let directory = try ScriptDirectory()
        defer { directory.remove() }
        let a = try await RoomServer.start(id: "a", group: Self.group)
        let b = try await RoomServer.start(id: "b", group: Self.group)
        defer {
            Task {
                try? await a.stop()
                try? await b.stop()
            }
        }
        let port = try await CLITests.freePort()
        try directory.write("route.lua", Self.script(routingTo: "a"))
        let configPath = try directory.write("proxy.yaml", Self.configYAML(listenerPort: port, backends: [a, b], admin: false))

        let err = Pipe()
        let process = SpawnedProcess(
            executable: try CLITests.executable().path, arguments: ["run", "--config", configPath], standardError: .pipe(err))
        try process.run()
        async let stderr = CLITests.readToEnd(err)
        defer {
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        }

        let routedToA = await WSSupport.waitUntil(timeout: .seconds(10)) {
            guard process.isRunning else { return false }
            return (try? await Self.backendOnFreshConnection(port: port)) == "a"
        }
        #expect(routedToA, "ott-proxy never routed to a on \(port)")

        try directory.write("route.lua", Self.script(routingTo: "b"))
        kill(process.processIdentifier, SIGHUP)
        let routedToB = await WSSupport.waitUntil(timeout: .seconds(5)) {
            (try? await Self.backendOnFreshConnection(port: port)) == "b"
        }
        #expect(routedToB, "routing did not change within 5 s of SIGHUP")
        #expect(process.isRunning, "SIGHUP stopped the process")

        process.terminate()
        let exited = await WSSupport.waitUntil(timeout: .seconds(5)) { !process.isRunning }
        if !exited { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        let log = String(decoding: await stderr, as: UTF8.self)
        #expect(process.terminationStatus == 0, "log: \(log)")
    }
}
