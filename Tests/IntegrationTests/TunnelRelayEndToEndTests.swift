import DemoBackends
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ProxyCore
import RedisTestSupport
import Testing

/// Tunnels carried by the relay threads (`threads.tunnel_relay`, on by default), through a real proxy: what a
/// relayed tunnel must keep doing that the NIO tunnel did.
@Suite struct TunnelRelayEndToEndTests {
    private static let group = MultiThreadedEventLoopGroup.singleton

    private func upgrade(_ proxy: ProxyHarness, path: String = "/echo") async throws -> RawHTTPConnection {
        let connection = try await RawHTTPConnection.connect(port: proxy.port)
        try await connection.send(WSSupport.upgradeRequest(path: path))
        let response = try await connection.readResponse()
        #expect(response.status == 101)
        return connection
    }

    /// A gauge's value in the proxy's Prometheus text.
    private func gauge(_ name: String, _ proxy: ProxyHarness) -> Double? {
        for line in proxy.server.runtime.metrics.prometheusText().split(separator: "\n") where line.hasPrefix(name + " ") {
            return Double(line.dropFirst(name.count + 1))
        }
        return nil
    }

    private func waitRelayed(_ proxy: ProxyHarness, _ count: Int) async -> Bool {
        await WSSupport.waitUntil(timeout: .seconds(3)) { proxy.server.relayedTunnels == count }
    }

    @Test func aMebibyteEchoedThroughARelayedTunnelArrivesIntact() async throws {
        let backend = try await EchoUpgradeBackend.start()
        defer { Task { await backend.stop() } }
        try await withProxy(backends: [(id: "echo", port: backend.port)]) { proxy in
            let connection = try await self.upgrade(proxy)
            #expect(await self.waitRelayed(proxy, 1))
            // Built and compared on a thread of its own: in a debug build that is real work, which would hold up the
            // concurrency pool (two threads here) that timing-sensitive tests beside this one need.
            let payload = await onOwnThread { () -> [UInt8] in
                var state: UInt64 = 0x9E37_79B9_7F4A_7C15
                return (0..<(1 << 20)).map { _ in
                    state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                    return UInt8(truncatingIfNeeded: state >> 33)
                }
            }
            // Sent all at once while the echo comes back: both directions fill their sockets on the way.
            try await connection.send(bytes: payload)
            let echoed = try await connection.readBytes(count: payload.count, timeout: .seconds(20))
            let intact = await onOwnThread { echoed == payload }
            #expect(intact, "the echo differs from what was sent")
            await connection.close()
            #expect(await self.waitRelayed(proxy, 0))
        }
    }

    @Test func relayedTunnelsKeepTheirPlaceInMaxConnections() async throws {
        let backend = try await EchoUpgradeBackend.start()
        defer { Task { await backend.stop() } }
        try await withProxy(backends: [(id: "echo", port: backend.port)], configure: { $0.limits.maxConnections = 2 }) { proxy in
            let first = try await self.upgrade(proxy)
            let second = try await self.upgrade(proxy)
            #expect(await self.waitRelayed(proxy, 2))
            #expect(proxy.server.openConnections == 2)
            #expect(self.gauge("ott_proxy_tunnels_relayed", proxy) == 2)
            #expect(self.gauge("ott_proxy_tunnels", proxy) == 2)

            // Both places are taken by relayed tunnels: a third connection is refused.
            let third = try await RawHTTPConnection.connect(port: proxy.port)
            #expect(await third.waitForClose(timeout: .seconds(3)), "a third connection was accepted past max_connections")

            // A tunnel that ends gives its place back.
            await first.close()
            #expect(await self.waitRelayed(proxy, 1))
            let freed = await WSSupport.waitUntil(timeout: .seconds(3)) { proxy.server.openConnections == 1 }
            #expect(freed, "open connections: \(proxy.server.openConnections)")
            let gaugesFollowed = await WSSupport.waitUntil(timeout: .seconds(3)) {
                self.gauge("ott_proxy_tunnels_relayed", proxy) == 1 && self.gauge("ott_proxy_tunnels", proxy) == 1
            }
            #expect(gaugesFollowed, "ott_proxy_tunnels_relayed \(String(describing: self.gauge("ott_proxy_tunnels_relayed", proxy)))")
            let fourth = try await self.upgrade(proxy)
            try await fourth.send(bytes: Array("still relaying".utf8))
            #expect(try await fourth.readBytes(count: 14) == Array("still relaying".utf8))
            await second.close()
            await fourth.close()
        }
    }

    /// The access-log line of a tunnel counts the same bytes whether the relay carried it or NIO did.
    @Test func accessLogCountsTheSameBytesRelayedOrNot() async throws {
        let backend = try await EchoUpgradeBackend.start()
        defer { Task { await backend.stop() } }
        var lines: [Bool: Logger.Metadata] = [:]
        for relay in [true, false] {
            try await withLoggedProxy(backendPort: backend.port, relay: relay) { server, captured in
                let proxy = ProxyHarness(server: server, port: server.listenerPorts["test"]!, adminPort: nil)
                let connection = try await self.upgrade(proxy)
                #expect(await self.waitRelayed(proxy, relay ? 1 : 0))
                let payload = [UInt8](repeating: 0x42, count: 100_000)
                try await connection.send(bytes: payload)
                _ = try await connection.readBytes(count: payload.count, timeout: .seconds(10))
                await connection.close()
                let logged = await WSSupport.waitUntil(timeout: .seconds(3)) { captured.entries.contains { $0["status"] == "101" } }
                #expect(logged, "no access-log line for the tunnel (relay: \(relay))")
                lines[relay] = captured.entries.first { $0["status"] == "101" }
            }
        }
        let relayed = try #require(lines[true])
        let onNIO = try #require(lines[false])
        // The tunnel's bytes, both ways (the upgrade's heads are not counted, as for any request).
        #expect(relayed["bytes_in"] == "100000")
        #expect(relayed["bytes_out"] == "100000")
        #expect(relayed["bytes_in"] == onNIO["bytes_in"])
        #expect(relayed["bytes_out"] == onNIO["bytes_out"])
        // The client closed it, on either path.
        #expect(relayed["end"] == "client")
        #expect(onNIO["end"] == "client")
    }

    @Test func migrationClosesARelayedWebSocketWithTheCloseCode() async throws {
        let room = try await RoomServer.start(id: "a", group: Self.group)
        defer { Task { try? await room.stop() } }
        try await withProxy(backends: [(id: "a", port: room.port)]) { proxy in
            let client = try await WebSocketClient.connect(
                host: "127.0.0.1", port: proxy.port, path: "/rooms/moving/ws", group: Self.group)
            _ = try await WSSupport.withTimeout(.seconds(5)) { try await client.receive() }  // joined
            #expect(await self.waitRelayed(proxy, 1))
            #expect(proxy.server.drain(backend: "a", migrate: true))
            let closed = try await WSSupport.withTimeout(.seconds(5)) { try await client.receive() }
            #expect(closed == .close(code: 1012))
            #expect(await self.waitRelayed(proxy, 0))
        }
    }
}

/// A tunnel's access-log line (status 101, written when it ends) says why it ended, on NIO's channels and on the
/// relay alike: `end=client` when the client closed first, `end=idle` after `timeouts.tunnel_idle` (2 s) with no traffic.
@Suite struct TunnelEndTests {
    @Test(arguments: [true, false])
    func aTunnelsAccessLogLineSaysWhyItEnded(relay: Bool) async throws {
        let backend = try await EchoUpgradeBackend.start()
        defer { Task { await backend.stop() } }
        try await withLoggedProxy(backendPort: backend.port, relay: relay, tunnelIdle: .seconds(2)) { server, captured in
            let port = try #require(server.listenerPorts["test"])
            func open(_ path: String) async throws -> RawHTTPConnection {
                let connection = try await RawHTTPConnection.connect(port: port)
                try await connection.send(WSSupport.upgradeRequest(path: path))
                #expect(try await connection.readResponse().status == 101)
                return connection
            }
            // One after the other, so the first is closed long before its idle timeout even on a loaded machine.
            let closing = try await open("/closed-by-client")
            if relay {
                #expect(await WSSupport.waitUntil(timeout: .seconds(3)) { server.relayedTunnelsTotal == 1 })
            }
            await closing.close()
            let idle = try await open("/left-idle")
            if relay {
                #expect(await WSSupport.waitUntil(timeout: .seconds(3)) { server.relayedTunnelsTotal == 2 })
            }
            #expect(await idle.waitForClose(timeout: .seconds(10)), "the idle tunnel stayed open")
            let logged = await WSSupport.waitUntil(timeout: .seconds(3)) { captured.entries.count >= 2 }
            #expect(logged, "\(captured.entries)")
            var ends: [String: String] = [:]
            for entry in captured.entries {
                if case .string(let path) = entry["path"], case .string(let end) = entry["end"] { ends[path] = end }
                #expect(entry["status"] == "101")
            }
            #expect(ends == ["/closed-by-client": "client", "/left-idle": "idle"], "\(captured.entries)")
            #expect(server.relayedTunnelsTotal == (relay ? 2 : 0))
            await idle.close()
        }
    }
}

/// A proxy in front of one backend (`echo`), its access log captured, with the tunnel relay on or off; shut down
/// afterwards.
func withLoggedProxy(
    backendPort: Int, relay: Bool, tunnelIdle: TimeAmount? = nil, _ body: (ProxyServer, CapturedLog) async throws -> Void
) async throws {
    let captured = CapturedLog()
    var config = ProxyConfig(
        listeners: [ListenerConfig(name: "test", address: "127.0.0.1", port: 0, pool: "main")],
        pools: [PoolConfig(name: "main", backends: [BackendConfig(id: "echo", host: "127.0.0.1", port: backendPort)])],
        logging: LoggingConfig(level: .warning, format: .logfmt, accessLog: true))
    config.threads.tunnelRelay = relay
    if let tunnelIdle { config.timeouts.tunnelIdle = tunnelIdle }
    config.timeouts.shutdownGrace = .seconds(1)
    let access = Logger(label: "access") { _ in CapturingLogHandler(log: captured) }
    let server = try ProxyServer(config: config, accessLogger: access, group: MultiThreadedEventLoopGroup.singleton)
    try await server.start()
    do {
        try await body(server, captured)
    } catch {
        await server.shutdown()
        throw error
    }
    await server.shutdown()
}

/// Access-log entries' metadata, as the proxy logged them.
final class CapturedLog: Sendable {
    private let box = NIOLockedValueBox<[Logger.Metadata]>([])
    var entries: [Logger.Metadata] { self.box.withLockedValue { $0 } }
    func append(_ metadata: Logger.Metadata) { self.box.withLockedValue { $0.append(metadata) } }
}

struct CapturingLogHandler: LogHandler {
    let log: CapturedLog
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .info

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        self.log.append(self.metadata.merging(event.metadata ?? [:]) { $1 })
    }
}

/// A backend that answers any request with `101` and then echoes every byte, with back-pressure (it stops reading
/// while its socket is full).
final class EchoUpgradeBackend: Sendable {
    let port: Int
    private let serverChannel: Channel

    private init(port: Int, serverChannel: Channel) {
        self.port = port
        self.serverChannel = serverChannel
    }

    static func start(group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> EchoUpgradeBackend {
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Handler()) }
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        return EchoUpgradeBackend(port: channel.localAddress!.port!, serverChannel: channel)
    }

    func stop() async {
        try? await self.serverChannel.close()
    }

    private final class Handler: ChannelDuplexHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer

        private var head: [UInt8] = []
        private var upgraded = false
        private var readHeld = false

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var buffer = Self.unwrapInboundIn(data)
            if !self.upgraded {
                self.head.append(contentsOf: buffer.readableBytesView)
                guard let end = RawHTTPConnection.find([13, 10, 13, 10], in: self.head, from: 0) else { return }
                self.upgraded = true
                let answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    + "Sec-WebSocket-Accept: \(WSSupport.sampleAccept)\r\n\r\n"
                context.write(Self.wrapOutboundOut(ByteBuffer(string: answer)), promise: nil)
                buffer = ByteBuffer(bytes: self.head[(end + 4)...])
            }
            context.write(Self.wrapOutboundOut(buffer), promise: nil)
        }

        func channelReadComplete(context: ChannelHandlerContext) {
            context.flush()
        }

        func read(context: ChannelHandlerContext) {
            if context.channel.isWritable {
                context.read()
            } else {
                self.readHeld = true
            }
        }

        func channelWritabilityChanged(context: ChannelHandlerContext) {
            if context.channel.isWritable, self.readHeld {
                self.readHeld = false
                context.read()
            }
            context.fireChannelWritabilityChanged()
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            context.close(promise: nil)
        }
    }
}
