import DemoBackends
import Foundation
import Logging
import NIOPosix
import ProxyCore
import Testing

/// `threads`: a server that owns its event loops starts `count` of them and, with `cpu_affinity: auto`, binds each
/// to its own CPU (checked in the kernel's view of every thread, /proc/self/task), still serves, and refuses a
/// reload that changes `threads`. With `accept: per_loop` (the default) each loop listens on the port itself
/// (checked in the kernel's list of listening sockets, /proc/net/tcp), and a second process on the same port is
/// refused.
@Suite(.serialized) struct ThreadsTests {
    /// CPU lists of this process's NIO event loop threads (or the threads whose name starts with `prefix`) that are
    /// bound to exactly one CPU, by thread id.
    static func singleCPULoopThreads(prefix: String = "NIO-ELT") -> [Int: Int] {
        var bound: [Int: Int] = [:]
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        for task in tasks {
            guard let name = try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8),
                name.hasPrefix(prefix),
                let status = try? String(contentsOfFile: "/proc/self/task/\(task)/status", encoding: .utf8),
                let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Cpus_allowed_list:") })
            else { continue }
            let list = line.dropFirst("Cpus_allowed_list:".count).trimmingCharacters(in: .whitespaces)
            if let cpu = Int(list), let tid = Int(task) { bound[tid] = cpu }
        }
        return bound
    }

    @Test("cpu_affinity auto binds each of the server's own loops to its own CPU, and the relay threads with them")
    func pinsOwnLoops() async throws {
        let allowed = try #require(CPUPinning.allowedCPUs())
        let room = try await RoomServer.start(id: "a", group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { try? await room.stop() } }
        let before = Self.singleCPULoopThreads()
        let relaysBefore = Self.singleCPULoopThreads(prefix: "ott-")
        var config = ProxyConfig(
            listeners: [ListenerConfig(name: "test", address: "127.0.0.1", port: 0, pool: "main")],
            pools: [PoolConfig(name: "main", backends: [BackendConfig(id: "a", host: "127.0.0.1", port: room.port)])],
            logging: LoggingConfig(level: .warning, format: .logfmt, accessLog: false),
            threads: ThreadsConfig(count: 2, cpuAffinity: .auto, httpRelayCount: 3)
        )
        config.timeouts.shutdownGrace = .seconds(1)
        var logger = Logger(label: "test-proxy")
        logger.logLevel = .warning
        let server = try ProxyServer(config: config, logger: logger, accessLogger: logger)
        try await server.start()
        do {
            let expected = CPUPinning.plan(loops: 2, allowed: allowed)
            #expect(server.loopCPUs == expected.map { Optional($0) })
            let pinned = Self.singleCPULoopThreads().filter { before[$0.key] == nil }
            #expect(pinned.values.sorted() == expected.sorted(), "\(pinned)")
            // Two tunnel relay threads on the loops' CPUs, and three HTTP relay threads (`http_relay_count: 3`) on
            // them in turn: the third wraps round to the first loop's CPU. (Each relay thread binds itself as it
            // starts.)
            let relaysExpected = (expected + expected + [expected[0]]).sorted()
            var relays: [Int] = []
            _ = await WSSupport.waitUntil(timeout: .seconds(3)) {
                relays = Self.singleCPULoopThreads(prefix: "ott-").filter { relaysBefore[$0.key] == nil }.values.sorted()
                return relays == relaysExpected
            }
            #expect(relays == relaysExpected)

            let connection = try await RawHTTPConnection.connect(port: server.listenerPorts["test"]!)
            try await connection.send("GET /rooms/lobby HTTP/1.1\r\nHost: example\r\n\r\n")
            #expect(try await connection.readResponse().status == 200)
            await connection.close()

            var changed = config
            changed.threads.cpuAffinity = .none
            guard case .failure(let error) = await server.reload(changed) else {
                Issue.record("a reload that changes threads was accepted")
                await server.shutdown()
                return
            }
            #expect(error.description.contains("threads cannot change on reload"), "\(error)")
        } catch {
            await server.shutdown()
            throw error
        }
        await server.shutdown()
    }

    @Test("without cpu_affinity the loops are left to the kernel")
    func leavesLoopsUnbound() async throws {
        let before = Self.singleCPULoopThreads()
        let config = ProxyConfig(
            listeners: [ListenerConfig(name: "test", address: "127.0.0.1", port: 0, pool: "main")],
            pools: [PoolConfig(name: "main")],
            logging: LoggingConfig(level: .warning, format: .logfmt, accessLog: false),
            threads: ThreadsConfig(count: 2)
        )
        let server = try ProxyServer(config: config)
        try await server.start()
        #expect(server.loopCPUs.isEmpty)
        if (CPUPinning.allowedCPUs()?.count ?? 0) > 1 {
            // With more than one CPU allowed, an unbound thread's list has more than one entry.
            #expect(Self.singleCPULoopThreads().keys.allSatisfy { before[$0] != nil })
        }
        await server.shutdown()
    }

    /// Listening sockets on 127.0.0.1:`port`, as the kernel lists them: rows `<local> 00000000:0000 0A` (no peer,
    /// TCP_LISTEN), found by a byte search rather than by splitting every row (the table lists every socket of the
    /// host; parsing it as strings took long enough to starve the parallel tests' executor).
    static func kernelListeners(port: Int) throws -> Int {
        // Read to the end: /proc files report no size, and a one-page read misses rows when many sockets are open.
        let file = try #require(FileHandle(forReadingAtPath: "/proc/net/tcp"))
        defer { try? file.close() }
        let table = try file.readToEnd() ?? Data()
        let row = Data(" 0100007F:\(String(format: "%04X", port)) 00000000:0000 0A ".utf8)
        var count = 0
        var searched = table.startIndex..<table.endIndex
        while let found = table.range(of: row, in: searched) {
            count += 1
            searched = found.upperBound..<table.endIndex
        }
        return count
    }

    static func config(port: Int, backend: Int, accept: ThreadsConfig.Accept) -> ProxyConfig {
        var config = ProxyConfig(
            listeners: [ListenerConfig(name: "test", address: "127.0.0.1", port: port, pool: "main")],
            pools: [PoolConfig(name: "main", backends: [BackendConfig(id: "a", host: "127.0.0.1", port: backend)])],
            logging: LoggingConfig(level: .critical, format: .logfmt, accessLog: false),
            threads: ThreadsConfig(count: 2, accept: accept)
        )
        config.timeouts.shutdownGrace = .seconds(1)
        return config
    }

    @Test("accept per_loop: every loop listens on the port and accepts its own connections; one_loop: one socket", arguments: [ThreadsConfig.Accept.perLoop, .oneLoop])
    func acceptModes(accept: ThreadsConfig.Accept) async throws {
        let room = try await RoomServer.start(id: "a", group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { try? await room.stop() } }
        let server = try ProxyServer(config: Self.config(port: 0, backend: room.port, accept: accept))
        try await server.start()
        do {
            let port = server.listenerPorts["test"]!
            #expect(try Self.kernelListeners(port: port) == (accept == .perLoop ? 2 : 1))
            // 32 connections: the kernel's hash leaves one loop without any with probability 2^-31.
            var connections: [RawHTTPConnection] = []
            for i in 0..<32 {
                let connection = try await RawHTTPConnection.connect(port: port)
                try await connection.send("GET /rooms/r\(i) HTTP/1.1\r\nHost: example\r\n\r\n")
                #expect(try await connection.readResponse().status == 200)
                connections.append(connection)
            }
            let perLoop = server.connectionsPerLoop()
            #expect(perLoop.count == 2 && perLoop.reduce(0, +) == 32 && perLoop.allSatisfy { $0 > 0 }, "\(perLoop)")
            for connection in connections { await connection.close() }
        } catch {
            await server.shutdown()
            throw error
        }
        await server.shutdown()
        #expect(try Self.kernelListeners(port: server.listenerPorts["test"]!) == 0)
    }

    @Test("accept per_loop: a second proxy on the same port fails to start, naming the listener, and the first goes on")
    func sharedPortIsRefused() async throws {
        let room = try await RoomServer.start(id: "a", group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { try? await room.stop() } }
        let first = try ProxyServer(config: Self.config(port: 0, backend: room.port, accept: .perLoop))
        try await first.start()
        let port = first.listenerPorts["test"]!
        let second = try ProxyServer(config: Self.config(port: port, backend: room.port, accept: .perLoop))
        do {
            try await second.start()
            Issue.record("a second proxy started on a port the first one listens on")
            await second.shutdown()
        } catch {
            #expect("\(error)".contains("listener 'test': 127.0.0.1:\(port) is already in use"), "\(error)")
        }
        // The second one's sockets are gone again, and the first still serves.
        #expect(try Self.kernelListeners(port: port) == 2)
        let connection = try await RawHTTPConnection.connect(port: port)
        try await connection.send("GET /rooms/lobby HTTP/1.1\r\nHost: example\r\n\r\n")
        #expect(try await connection.readResponse().status == 200)
        await connection.close()
        await first.shutdown()
    }

    @Test("a port another socket holds fails the start, naming the listener and the address", arguments: [ThreadsConfig.Accept.perLoop, .oneLoop])
    func portInUse(accept: ThreadsConfig.Accept) async throws {
        let holder = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.1", port: 0).get()
        let port = holder.localAddress!.port!
        let server = try ProxyServer(config: Self.config(port: port, backend: 9, accept: accept))
        do {
            try await server.start()
            Issue.record("the proxy started on a port another socket holds")
            await server.shutdown()
        } catch {
            #expect("\(error)" == "listener 'test': cannot listen on 127.0.0.1:\(port): address already in use (errno 98)")
        }
        #expect(try Self.kernelListeners(port: port) == 1)
        try await holder.close()
    }
}
