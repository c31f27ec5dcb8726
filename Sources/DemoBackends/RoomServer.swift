import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// A small stateful backend that behaves like a watch-party room server: rooms live in memory on
/// the backend that loaded them, which is exactly what a sticky-routing proxy has to respect.
///
/// HTTP: `GET /rooms/{name}` → room JSON, anything else → "served by backend X".
/// WebSocket: `/rooms/{name}/ws` joins the room; text is broadcast, binary echoed.
public final class RoomServer: Sendable {
    /// Large enough that tests can echo 1 MiB binary messages in one frame.
    static let maxFrameSize = 16 * 1024 * 1024

    public let id: String
    /// The bound port (useful when started with port 0).
    public let port: Int

    private static let httpHandlerName = "RoomHTTPHandler"

    private let serverChannel: any Channel
    private let state: RoomServerState

    private init(id: String, port: Int, serverChannel: any Channel, state: RoomServerState) {
        self.id = id
        self.port = port
        self.serverChannel = serverChannel
        self.state = state
    }

    public static func start(
        id: String,
        host: String = "127.0.0.1",
        port: Int = 0,
        group: any EventLoopGroup
    ) async throws -> RoomServer {
        let state = RoomServerState(backendID: id)
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                state.connectionAccepted(channel)
                return channel.eventLoop.makeCompletedFuture {
                    try Self.configurePipeline(channel: channel, state: state)
                }
            }
            .bind(host: host, port: port)
            .get()
        let boundPort = channel.localAddress?.port ?? port
        return RoomServer(id: id, port: boundPort, serverChannel: channel, state: state)
    }

    /// HTTP/1.1 with an optional WebSocket upgrade for room URLs.
    private static func configurePipeline(channel: any Channel, state: RoomServerState) throws {
        let httpHandler = RoomHTTPHandler(state: state)
        let upgrader = NIOWebSocketServerUpgrader(
            maxFrameSize: Self.maxFrameSize,
            shouldUpgrade: { channel, head in
                // Only room URLs upgrade; anything else falls through to the plain HTTP handler.
                guard case .webSocket = RoomPath(uri: head.uri) else {
                    return channel.eventLoop.makeSucceededFuture(nil)
                }
                state.requestReceived()
                var headers = HTTPHeaders()
                headers.add(name: "X-Backend", value: state.backendID)
                return channel.eventLoop.makeSucceededFuture(headers)
            },
            upgradePipelineHandler: { channel, head in
                channel.eventLoop.makeCompletedFuture {
                    guard case .webSocket(let room) = RoomPath(uri: head.uri) else { return }
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(
                        NIOWebSocketFrameAggregator(
                            minNonFinalFragmentSize: 0,
                            maxAccumulatedFrameCount: 1024,
                            maxAccumulatedFrameSize: Self.maxFrameSize
                        )
                    )
                    try sync.addHandler(RoomWebSocketHandler(state: state, room: room))
                }
            }
        )
        let upgrade: NIOHTTPServerUpgradeConfiguration = (
            upgraders: [upgrader],
            completionHandler: { context in
                // After the 101 the HTTP handler would misread WebSocket frames; take it out.
                // Removed by name because this closure must be @Sendable and the handler is not.
                context.pipeline.syncOperations.removeHandler(name: Self.httpHandlerName, promise: nil)
            }
        )
        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withServerUpgrade: upgrade)
        try channel.pipeline.syncOperations.addHandler(httpHandler, name: Self.httpHandlerName)
    }

    /// Rooms currently loaded in this backend's memory, sorted.
    public func roomNames() -> [String] {
        self.state.rooms.names()
    }

    /// Number of TCP connections accepted so far (lets tests observe keep-alive reuse).
    public var acceptedConnections: Int { self.state.acceptedConnections }

    /// Number of HTTP requests (including WebSocket upgrade requests) handled so far.
    public var requestCount: Int { self.state.requestCount }

    /// Stops listening and closes every open connection, WebSockets included.
    public func stop() async throws {
        do {
            try await self.serverChannel.close()
        } catch ChannelError.alreadyClosed {
            // Stopping twice is harmless.
        }
        let connections = self.state.openConnections()
        for connection in connections {
            connection.close(promise: nil)
        }
        for connection in connections {
            try? await connection.closeFuture.get()
        }
    }
}
