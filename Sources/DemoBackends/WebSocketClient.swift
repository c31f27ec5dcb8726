import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// A deliberately tiny WebSocket client for tests and the demo: connect, send frames, and read
/// messages one at a time with `receive()`. Not a general-purpose client (one consumer only).
public final class WebSocketClient: Sendable {
    public enum Message: Sendable, Equatable {
        case text(String)
        case binary([UInt8])
        case pong([UInt8])
        /// The peer's close frame; `code` is nil when it carried no status code.
        case close(code: UInt16?)
    }

    public enum ConnectError: Error, Equatable, CustomStringConvertible {
        /// The server answered the upgrade request with something other than 101.
        case upgradeRejected(status: Int)
        /// The connection went away before the server answered the upgrade request.
        case closedBeforeUpgrade

        public var description: String {
            switch self {
            case .upgradeRejected(let status):
                return "WebSocket upgrade rejected with HTTP status \(status)"
            case .closedBeforeUpgrade:
                return "connection closed before the WebSocket upgrade completed"
            }
        }
    }

    /// Matches `RoomServer`, so large echo tests work in both directions.
    static let maxFrameSize = 16 * 1024 * 1024
    /// How long `close()` waits for the server to finish the close handshake.
    private static let closeTimeout = TimeAmount.seconds(2)
    private static let outcomeHandlerName = "WebSocketUpgradeOutcome"

    private let channel: any Channel
    private let messages: AsyncStream<Message>

    private init(channel: any Channel, messages: AsyncStream<Message>) {
        self.channel = channel
        self.messages = messages
    }

    /// Connects to `ws://host:port/path`. `headers` are added to the upgrade request.
    /// Throws `ConnectError.upgradeRejected(status:)` if the server does not answer 101.
    public static func connect(
        host: String,
        port: Int,
        path: String,
        headers: [(String, String)] = [],
        group: any EventLoopGroup
    ) async throws -> WebSocketClient {
        let eventLoop = group.next()
        let upgraded = eventLoop.makePromise(of: Void.self)
        let (messages, continuation) = AsyncStream.makeStream(of: Message.self)

        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: eventLoop)
                .channelOption(.tcpOption(.tcp_nodelay), value: 1)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try Self.configurePipeline(channel: channel, upgraded: upgraded, messages: continuation)
                    }
                }
                .connect(host: host, port: port)
                .get()
        } catch {
            // Nothing will ever complete these if the TCP connect itself failed.
            upgraded.fail(error)
            continuation.finish()
            throw error
        }

        var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path)
        head.headers.add(name: "Host", value: "\(host):\(port)")
        for (name, value) in headers {
            head.headers.add(name: name, value: value)
        }
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)

        do {
            try await upgraded.futureResult.get()
        } catch {
            continuation.finish()
            channel.close(promise: nil)
            throw error
        }
        return WebSocketClient(channel: channel, messages: messages)
    }

    private static func configurePipeline(
        channel: any Channel,
        upgraded: EventLoopPromise<Void>,
        messages: AsyncStream<Message>.Continuation
    ) throws {
        let upgrader = NIOWebSocketClientUpgrader(
            maxFrameSize: Self.maxFrameSize,
            upgradePipelineHandler: { channel, _ in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(
                        NIOWebSocketFrameAggregator(
                            minNonFinalFragmentSize: 0,
                            maxAccumulatedFrameCount: 1024,
                            maxAccumulatedFrameSize: Self.maxFrameSize
                        )
                    )
                    try sync.addHandler(WebSocketClientFrameHandler(messages: messages))
                    upgraded.succeed()
                }
            }
        )
        let upgrade: NIOHTTPClientUpgradeConfiguration = (
            upgraders: [upgrader],
            completionHandler: { context in
                // The outcome handler only understands HTTP parts; it must go before frames flow.
                // Removed by name because this closure must be @Sendable and the handler is not.
                context.pipeline.syncOperations.removeHandler(name: Self.outcomeHandlerName, promise: nil)
            }
        )
        let sync = channel.pipeline.syncOperations
        // The server's first frame (room "joined") often arrives in the same read as the 101;
        // the default `.dropBytes` would silently discard it when the HTTP decoder is removed.
        try sync.addHTTPClientHandlers(leftOverBytesStrategy: .forwardBytes, withClientUpgrade: upgrade)
        try sync.addHandler(WebSocketUpgradeOutcomeHandler(upgraded: upgraded), name: Self.outcomeHandlerName)
    }

    public func sendText(_ text: String) async throws {
        try await self.send(.text, self.channel.allocator.buffer(string: text))
    }

    public func sendBinary(_ bytes: [UInt8]) async throws {
        try await self.send(.binary, self.channel.allocator.buffer(bytes: bytes))
    }

    public func sendPing(_ bytes: [UInt8]) async throws {
        try await self.send(.ping, self.channel.allocator.buffer(bytes: bytes))
    }

    public func sendClose(code: UInt16) async throws {
        var payload = self.channel.allocator.buffer(capacity: 2)
        payload.writeInteger(code)
        try await self.send(.connectionClose, payload)
    }

    /// The next message from the server, or nil once the connection is closed.
    /// Must not be called concurrently from more than one task.
    public func receive() async throws -> Message? {
        // AsyncStream iterators share the stream's buffer, so a fresh iterator per call
        // continues where the previous one stopped.
        var iterator = self.messages.makeAsyncIterator()
        let message = await iterator.next()
        try Task.checkCancellation()
        return message
    }

    /// Starts the close handshake (code 1000) and waits briefly for the server to finish it
    /// before dropping the connection. Never throws: closing an already-closed client is fine.
    public func close() async {
        let channel = self.channel
        let forceClose = channel.eventLoop.scheduleTask(in: Self.closeTimeout) {
            channel.close(promise: nil)
        }
        try? await self.sendClose(code: 1000)
        try? await channel.closeFuture.get()
        forceClose.cancel()
    }

    private func send(_ opcode: WebSocketOpcode, _ data: ByteBuffer) async throws {
        // RFC 6455 §5.3: every client-to-server frame must be masked.
        let frame = WebSocketFrame(fin: true, opcode: opcode, maskKey: .random(), data: data)
        try await self.channel.writeAndFlush(frame).get()
    }
}
