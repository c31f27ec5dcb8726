import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization

/// Makes the routing policy for one listener on one event loop (policies are loop-confined; Lua states are too).
public typealias RoutingPolicyFactory = @Sendable (ListenerConfig, EventLoop) throws -> RoutingPolicy

/// The assembled proxy: listeners, the admin listener, per-loop upstream pools, and graceful shutdown.
///
/// Use it as a ServiceLifecycle `Service` (`run()` serves until graceful shutdown is triggered, then drains), or
/// drive it directly with `start()` and `shutdown()` (tests do).
public final class ProxyServer: Service, Sendable {
    /// Per-event-loop state: the upstream pool and each listener's policy live on one loop and never cross it.
    final class LoopState {
        let pool: UpstreamPool
        var policies: [String: RoutingPolicy]

        init(pool: UpstreamPool, policies: [String: RoutingPolicy]) {
            self.pool = pool
            self.policies = policies
        }
    }

    private struct Started {
        var listenerChannels: [Channel]
        var adminChannel: Channel?
        var loopStates: [ObjectIdentifier: NIOLoopBound<LoopState>]
    }

    public let runtime: ProxyRuntime
    private let group: EventLoopGroup
    private let ownsGroup: Bool
    private let policyFactory: RoutingPolicyFactory
    private let connections: ConnectionRegistry
    /// Open admin connections: closed with the admin listener (keep-alive ones would otherwise outlive the server
    /// when the event loops are not the server's own).
    private let adminConnections = ConnectionRegistry(limit: Int.max)
    private let started = Mutex<Started?>(nil)
    private let boundPorts = Mutex<[String: Int]>([:])
    private let boundAdminPort = Mutex<Int?>(nil)

    /// - Parameters:
    ///   - group: the event loops to serve on; by default one thread per core, owned and shut down by the server.
    ///   - policyFactory: the routing policy per listener; by default every request goes to the listener's pool.
    public init(
        config: ProxyConfig,
        logger: Logger = Logger(label: "ott-proxy"),
        accessLogger: Logger = Logger(label: "ott-proxy.access"),
        group: EventLoopGroup? = nil,
        policyFactory: RoutingPolicyFactory? = nil
    ) throws {
        let table = try RoutingTable(config: config)
        let metrics = ProxyMetrics(listeners: config.listeners.map(\.name))
        self.runtime = ProxyRuntime(config: config, table: table, logger: logger, accessLogger: accessLogger, metrics: metrics)
        self.ownsGroup = group == nil
        self.group = group ?? MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
        self.policyFactory = policyFactory ?? { listener, _ in StaticPoolPolicy(pool: listener.pool) }
        self.connections = ConnectionRegistry(limit: config.limits.maxConnections)
    }

    /// The port each listener is bound to, by listener name (useful with port 0).
    public var listenerPorts: [String: Int] { self.boundPorts.withLock { $0 } }
    public var adminPort: Int? { self.boundAdminPort.withLock { $0 } }
    public var openConnections: Int { self.connections.count }

    /// Binds every listener and the admin listener. Fails (and binds nothing) if any address is unusable.
    public func start() async throws {
        let config = self.runtime.config
        var loopStates: [ObjectIdentifier: NIOLoopBound<LoopState>] = [:]
        let factory = self.policyFactory
        let settings = UpstreamPool.Settings(
            connectTimeout: config.timeouts.connect,
            idleTimeout: config.timeouts.upstreamIdle,
            maxIdlePerBackend: config.limits.maxIdleUpstreamPerBackend
        )
        for loop in self.group.makeIterator() {
            let state = try await loop.submit {
                var policies: [String: RoutingPolicy] = [:]
                for listener in config.listeners {
                    policies[listener.name] = try factory(listener, loop)
                }
                return NIOLoopBound(
                    LoopState(pool: UpstreamPool(eventLoop: loop, settings: settings), policies: policies),
                    eventLoop: loop
                )
            }.get()
            loopStates[ObjectIdentifier(loop)] = state
        }

        var channels: [Channel] = []
        do {
            for listener in config.listeners {
                let channel = try await self.bind(listener, loopStates: loopStates)
                channels.append(channel)
                let port = channel.localAddress?.port ?? listener.port
                self.boundPorts.withLock { $0[listener.name] = port }
                self.runtime.logger.info(
                    "listening", metadata: ["listener": "\(listener.name)", "address": "\(listener.address):\(port)"])
            }
            var adminChannel: Channel? = nil
            if let admin = config.admin {
                let server = AdminServer(config: admin, runtime: self.runtime, connections: self.connections)
                let channel = try await server.bind(group: self.group, tracking: self.adminConnections)
                adminChannel = channel
                self.boundAdminPort.withLock { $0 = channel.localAddress?.port }
                self.runtime.logger.info(
                    "admin listening", metadata: ["address": "\(admin.address):\(channel.localAddress?.port ?? admin.port)"])
            }
            self.started.withLock { $0 = Started(listenerChannels: channels, adminChannel: adminChannel, loopStates: loopStates) }
        } catch {
            for channel in channels { try? await channel.close() }
            throw error
        }
    }

    public func run() async throws {
        if self.started.withLock({ $0 == nil }) {
            try await self.start()
        }
        try? await gracefulShutdown()
        await self.shutdown()
    }

    /// Stops accepting, lets in-flight requests finish for up to `shutdown_grace`, then closes whatever is left
    /// (tunnels included) and releases the event loops if the server owns them.
    public func shutdown() async {
        guard let started = self.started.withLock({ state -> Started? in
            let current = state
            state = nil
            return current
        }) else { return }
        let grace = self.runtime.config.timeouts.shutdownGrace
        self.runtime.logger.info("shutting down", metadata: ["grace": "\(grace)"])

        for channel in started.listenerChannels {
            try? await channel.close()
        }
        // Idle keep-alive connections close now; busy ones after their current response (the pipelining handler
        // does this on the quiesce event). Tunnels ignore it and are closed when the grace period ends.
        for channel in self.connections.all() {
            channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        }
        let deadline = NIODeadline.now() + grace
        while self.connections.count > 0 && NIODeadline.now() < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        let remaining = self.connections.all()
        if !remaining.isEmpty {
            self.runtime.logger.info("closing connections left after the grace period", metadata: ["count": "\(remaining.count)"])
        }
        for channel in remaining {
            try? await channel.close()
        }
        for (_, state) in started.loopStates {
            try? await state.eventLoop.submit { state.value.pool.closeAll() }.get()
        }
        if let admin = started.adminChannel {
            try? await admin.close()
        }
        for channel in self.adminConnections.all() {
            try? await channel.close()
        }
        if self.ownsGroup {
            try? await self.group.shutdownGracefully()
        }
    }

    private func bind(_ listener: ListenerConfig, loopStates: [ObjectIdentifier: NIOLoopBound<LoopState>]) async throws -> Channel {
        let runtime = self.runtime
        let connections = self.connections
        let sslContext = try listener.tls.map { tls in
            try NIOSSLContext(
                configuration: .makeServerConfiguration(
                    certificateChain: try NIOSSLCertificate.fromPEMFile(tls.certificatePath).map { .certificate($0) },
                    privateKey: .privateKey(try NIOSSLPrivateKey(file: tls.keyPath, format: .pem))
                )
            )
        }
        let context = ListenerContext(name: listener.name, scheme: sslContext == nil ? "http" : "https")
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderListSize = runtime.config.limits.maxHeaderBytes
        limits.maxHeaderFieldSize = runtime.config.limits.maxHeaderBytes
        let decoderLimits = limits
        let timeouts = runtime.config.timeouts

        return try await ServerBootstrap(group: self.group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 16)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    guard connections.add(channel) else {
                        runtime.metrics.rejectedConnections.increment()
                        channel.close(promise: nil)
                        return
                    }
                    runtime.metrics.connectionOpened(listener: context.name)
                    channel.closeFuture.whenComplete { _ in
                        connections.remove(channel)
                        runtime.metrics.connectionClosed(listener: context.name)
                    }
                    guard let loopState = loopStates[ObjectIdentifier(channel.eventLoop)]?.value,
                        let policy = loopState.policies[listener.name]
                    else {
                        preconditionFailure("no loop state for the channel's event loop")
                    }
                    let sync = channel.pipeline.syncOperations
                    if let sslContext {
                        try sync.addHandler(NIOSSLServerHandler(context: sslContext))
                    }
                    var encoderConfiguration = HTTPResponseEncoder.Configuration()
                    // Framing is decided by ForwardingHeaders, which knows the request method (HEAD) and the backend's
                    // own framing; the encoder must not add its own.
                    encoderConfiguration.automaticallySetFramingHeaders = false
                    let handlers = DownstreamHTTPHandlers(
                        headTimer: RequestHeadTimer(headerTimeout: timeouts.requestHeader, idleTimeout: timeouts.idleKeepAlive),
                        encoder: HTTPResponseEncoder(configuration: encoderConfiguration),
                        decoder: ByteToMessageHandler(
                            HTTPRequestDecoder(leftOverBytesStrategy: .forwardBytes, limitConfiguration: decoderLimits)
                        ),
                        pipelining: HTTPServerPipelineHandler()
                    )
                    try sync.addHandler(handlers.headTimer)
                    try sync.addHandler(handlers.encoder)
                    try sync.addHandler(handlers.decoder)
                    try sync.addHandler(handlers.pipelining)
                    try sync.addHandler(
                        ProxyHandler(
                            runtime: runtime,
                            listener: context,
                            policy: policy,
                            upstreamPool: loopState.pool,
                            httpHandlers: handlers
                        )
                    )
                }
            }
            .bind(host: listener.address, port: listener.port)
            .get()
    }
}

/// Every open client connection, so shutdown can quiesce and then close them, and `max_connections` can be enforced.
final class ConnectionRegistry: Sendable {
    private let channels = Mutex<[ObjectIdentifier: Channel]>([:])
    private let limit: Int

    init(limit: Int) {
        self.limit = limit
    }

    /// Registers a channel; false when the limit is reached (the caller closes it).
    func add(_ channel: Channel) -> Bool {
        self.channels.withLock { channels in
            guard channels.count < self.limit else { return false }
            channels[ObjectIdentifier(channel)] = channel
            return true
        }
    }

    func remove(_ channel: Channel) {
        _ = self.channels.withLock { $0.removeValue(forKey: ObjectIdentifier(channel)) }
    }

    var count: Int { self.channels.withLock { $0.count } }

    func all() -> [Channel] { self.channels.withLock { Array($0.values) } }
}
