import Logging
import NIOCore
import NIOPosix
import NIOSSL

/// One connection to Redis (one NIO channel), pipelined: commands are written as soon as they are sent and replies
/// complete them in order. Safe to use from any thread; work happens on the channel's event loop.
public final class RedisConnection: Sendable {
    public let channel: Channel
    public let configuration: RedisConfiguration
    private let handler: NIOLoopBound<RedisConnectionHandler>

    public var eventLoop: EventLoop { self.channel.eventLoop }
    public var isActive: Bool { self.channel.isActive }
    /// Completes when the channel has closed.
    public var closeFuture: EventLoopFuture<Void> { self.channel.closeFuture }

    private init(channel: Channel, handler: RedisConnectionHandler, configuration: RedisConfiguration) {
        self.channel = channel
        self.handler = NIOLoopBound(handler, eventLoop: channel.eventLoop)
        self.configuration = configuration
    }

    /// Connects, sets up TLS for `rediss://`, then sends AUTH and SELECT as configured.
    ///
    /// `onPush` puts the connection in pub/sub mode: `message` and `pmessage` arrays go to it (on the event loop)
    /// instead of completing commands.
    public static func connect(
        configuration: RedisConfiguration,
        on eventLoop: EventLoop,
        onPush: (@Sendable (RESPValue) -> Void)? = nil
    ) -> EventLoopFuture<RedisConnection> {
        let sslContext: NIOSSLContext?
        do {
            sslContext = configuration.tls ? try configuration.makeSSLContext() : nil
        } catch {
            return eventLoop.makeFailedFuture(error)
        }
        let host = configuration.host
        let isIPAddress = (try? SocketAddress(ipAddress: host, port: 0)) != nil
        let limits = configuration.limits
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(configuration.connectTimeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    if let sslContext {
                        try sync.addHandler(
                            NIOSSLClientHandler(context: sslContext, serverHostname: isIPAddress ? nil : host)
                        )
                    }
                    try sync.addHandler(ByteToMessageHandler(RESPDecoder(limits: limits)))
                    try sync.addHandler(RedisConnectionHandler(onPush: onPush))
                }
            }
        return bootstrap.connect(host: host, port: configuration.port)
            .hop(to: eventLoop)
            .flatMapThrowing { channel in
                let handler = try channel.pipeline.syncOperations.handler(type: RedisConnectionHandler.self)
                return RedisConnection(channel: channel, handler: handler, configuration: configuration)
            }
            .flatMap { (connection: RedisConnection) -> EventLoopFuture<RedisConnection> in
                connection.handshake().flatMapError { (error: Error) -> EventLoopFuture<Void> in
                    connection.channel.close(promise: nil)
                    return connection.eventLoop.makeFailedFuture(error)
                }.map { () -> RedisConnection in connection }
            }
    }

    private func handshake() -> EventLoopFuture<Void> {
        var steps: [EventLoopFuture<Void>] = []
        if let password = self.configuration.password {
            let command: [any RESPArgument] =
                self.configuration.username.map { ["AUTH", $0, password] } ?? ["AUTH", password]
            steps.append(
                self.send(command).flatMapErrorThrowing { error in
                    if case RedisError.server(let message) = error { throw RedisError.authenticationFailed(message) }
                    throw error
                }.map { _ in }
            )
        }
        if self.configuration.database != 0 {
            let database = self.configuration.database
            steps.append(
                self.send(["SELECT", database]).flatMapErrorThrowing { error in
                    if case RedisError.server(let message) = error {
                        throw RedisError.selectFailed(database: database, message)
                    }
                    throw error
                }.map { _ in }
            )
        }
        if steps.isEmpty {
            // Nothing to set up: one PING, so a refused TLS handshake or a peer that is not Redis fails the connect.
            steps.append(self.send(["PING"]).map { _ in })
        }
        // Pipelined; the first failure (AUTH before SELECT) is the one reported.
        return EventLoopFuture.andAllSucceed(steps, on: self.eventLoop)
    }

    /// Sends a command (`["SET", key, value]`). The future fails with `RedisError.server` for an error reply,
    /// `RedisError.timeout` when no reply came within `timeout` (default: the configuration's `commandTimeout`).
    public func send(_ command: [any RESPArgument], timeout: TimeAmount? = nil) -> EventLoopFuture<RESPValue> {
        self.send(command, replies: 1, timeout: timeout)
    }

    /// `send`, for `async` callers.
    public func execute(_ command: [any RESPArgument], timeout: TimeAmount? = nil) async throws -> RESPValue {
        try await self.send(command, timeout: timeout).get()
    }

    func send(_ command: [any RESPArgument], replies: Int, timeout: TimeAmount?) -> EventLoopFuture<RESPValue> {
        var encoded = self.channel.allocator.buffer(capacity: 32)
        RESPEncoder.encode(command: command, into: &encoded)
        let name = (command.first as? String)?.uppercased() ?? "command"
        let timeout = timeout ?? self.configuration.commandTimeout
        let promise = self.eventLoop.makePromise(of: RESPValue.self)
        if self.eventLoop.inEventLoop {
            self.handler.value.enqueue(encoded, name: name, replies: replies, timeout: timeout, promise: promise)
        } else {
            let handler = self.handler
            let encoded = encoded
            self.eventLoop.execute {
                handler.value.enqueue(encoded, name: name, replies: replies, timeout: timeout, promise: promise)
            }
        }
        return promise.futureResult
    }

    public func close() -> EventLoopFuture<Void> {
        self.channel.close().recover { _ in }
    }
}
