import Foundation
import NIOCore
import NIOHTTP1
import NIOWebSocket

/// The pipeline of one `OTTBackend` connection: HTTP/1.1, and a WebSocket upgrade on every path (as OTT's
/// `websockets.ts` does; a wrong path is refused afterwards with close 4001).
enum OTTPipeline {
    static let maxFrameSize = 1024 * 1024
    private static let httpHandlerName = "OTTHTTPHandler"

    static func configure(channel: any Channel, state: OTTBackendState) throws {
        let upgrader = NIOWebSocketServerUpgrader(
            maxFrameSize: Self.maxFrameSize,
            shouldUpgrade: { channel, _ in
                state.requestReceived()
                var headers = HTTPHeaders()
                headers.add(name: "X-OTT-Backend", value: state.id)
                return channel.eventLoop.makeSucceededFuture(headers)
            },
            upgradePipelineHandler: { channel, head in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(
                        NIOWebSocketFrameAggregator(
                            minNonFinalFragmentSize: 0,
                            maxAccumulatedFrameCount: 64,
                            maxAccumulatedFrameSize: Self.maxFrameSize
                        )
                    )
                    try sync.addHandler(OTTWebSocketHandler(state: state, uri: head.uri))
                }
            }
        )
        let upgrade: NIOHTTPServerUpgradeConfiguration = (
            upgraders: [upgrader],
            completionHandler: { context in
                context.pipeline.syncOperations.removeHandler(name: Self.httpHandlerName, promise: nil)
            }
        )
        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withServerUpgrade: upgrade)
        try channel.pipeline.syncOperations.addHandler(OTTHTTPHandler(state: state), name: Self.httpHandlerName)
    }
}

/// JSON helpers shared by the HTTP and WebSocket sides.
enum OTTJSON {
    static func encode(_ object: Any) -> String {
        guard JSONSerialization.isValidJSONObject(object),
              let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])
        else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }

    static func decodeObject(_ bytes: some Sequence<UInt8>) -> [String: Any]? {
        (try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any]
    }
}

/// One room WebSocket, following OTT's `clientmanager.ts`: check the path, wait for `auth`, join (loading the room
/// here), send `sync` and `you`; broadcast `req` frames to the room's clients on this server as `event`s.
final class OTTWebSocketHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    private static let closeHandshakeTimeout = TimeAmount.seconds(2)

    private enum Phase {
        case awaitingAuth(room: String)
        case joined(room: String, clientID: String)
        case closing
    }

    private let state: OTTBackendState
    private let uri: String
    private var phase: Phase = .closing
    private var sentClose = false

    init(state: OTTBackendState, uri: String) {
        self.state = state
        self.uri = uri
    }

    /// The room name of a WebSocket URL, or nil when OTT would close with 4001. The query string is ignored.
    static func roomName(uri: String, baseURL: String) -> String? {
        let path = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        guard path.hasPrefix(baseURL + "/api/room/") else { return nil }
        let segments = path.dropFirst(baseURL.count).split(separator: "/", omittingEmptySubsequences: false)
        // ["", "api", "room", name, ...]: OTT takes segment 3 and ignores the rest.
        guard segments.count >= 4 else { return nil }
        let name = String(segments[3])
        return OTTRoomName.matchesPattern(name) ? name : nil
    }

    func handlerAdded(context: ChannelHandlerContext) {
        guard let room = Self.roomName(uri: self.uri, baseURL: self.state.config.baseURL) else {
            self.initiateClose(code: OTTCloseCode.invalidConnectionURL, context: context)
            return
        }
        self.phase = .awaitingAuth(room: room)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = Self.unwrapInboundIn(data)
        switch frame.opcode {
        case .text:
            self.receivedText(Array(frame.unmaskedData.readableBytesView), context: context)
        case .ping:
            self.send(.pong, frame.unmaskedData, context: context)
        case .connectionClose:
            self.receivedClose(frame, context: context)
        default:
            break
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let kick = event as? OTTKick else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        // The room is already gone from memory; just say goodbye with its code.
        self.phase = .closing
        self.initiateClose(code: kick.code, immediate: kick.immediate, context: context)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.leave(context: context)
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.leave(context: context)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    private func receivedText(_ bytes: [UInt8], context: ChannelHandlerContext) {
        let message = OTTJSON.decodeObject(bytes)
        switch self.phase {
        case .awaitingAuth(let room):
            guard message?["action"] as? String == "auth", let token = message?["token"] as? String,
                  self.state.store.isValidToken(token)
            else {
                self.initiateClose(code: OTTCloseCode.missingToken, context: context)
                return
            }
            guard let joined = self.state.join(room, channel: context.channel, token: token) else {
                self.initiateClose(code: OTTCloseCode.roomNotFound, context: context)
                return
            }
            let (view, clientID) = (joined.view, joined.clientID)
            self.phase = .joined(room: view.snapshot.name, clientID: clientID)
            self.sendJSON([
                "action": "sync", "room": view.snapshot.name, "name": view.snapshot.name, "title": view.snapshot.title,
                "visibility": view.snapshot.visibility, "users": view.users, "loadEpoch": view.loadEpoch,
                "served_by": self.state.id,
            ], context: context)
            self.sendJSON(["action": "you", "info": ["id": clientID], "served_by": self.state.id], context: context)
        case .joined(let room, let clientID):
            guard message?["action"] as? String == "req" else { return }
            let event: [String: Any] = [
                "action": "event", "room": room, "request": message?["request"] ?? NSNull(), "user": ["id": clientID],
                "served_by": self.state.id,
            ]
            let frame = WebSocketFrame(fin: true, opcode: .text, data: ByteBuffer(string: OTTJSON.encode(event)))
            for member in self.state.members(of: room) {
                member.writeAndFlush(frame, promise: nil)
            }
        case .closing:
            break
        }
    }

    private func leave(context: ChannelHandlerContext) {
        if case .joined(let room, _) = self.phase {
            self.state.leave(room, channel: context.channel)
        }
        self.phase = .closing
    }

    private func receivedClose(_ frame: WebSocketFrame, context: ChannelHandlerContext) {
        self.leave(context: context)
        if self.sentClose {
            context.close(promise: nil)
            return
        }
        var data = frame.unmaskedData
        let code = data.readSlice(length: 2) ?? ByteBuffer()
        self.sentClose = true
        let channel = context.channel
        context.writeAndFlush(Self.wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: code)))
            .whenComplete { _ in channel.close(promise: nil) }
    }

    private func initiateClose(code: UInt16, immediate: Bool = false, context: ChannelHandlerContext) {
        self.leave(context: context)
        guard !self.sentClose else { return }
        self.sentClose = true
        var payload = context.channel.allocator.buffer(capacity: 2)
        payload.writeInteger(code)
        let channel = context.channel
        let written = context.writeAndFlush(Self.wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: payload)))
        if immediate {
            written.whenComplete { _ in channel.close(promise: nil) }
        } else {
            // Wait for the peer's reply (RFC 6455 §7.1.1), but not forever.
            context.eventLoop.scheduleTask(in: Self.closeHandshakeTimeout) { channel.close(promise: nil) }
        }
    }

    private func sendJSON(_ object: [String: Any], context: ChannelHandlerContext) {
        self.send(.text, context.channel.allocator.buffer(string: OTTJSON.encode(object)), context: context)
    }

    private func send(_ opcode: WebSocketOpcode, _ data: ByteBuffer, context: ChannelHandlerContext) {
        context.writeAndFlush(Self.wrapOutboundOut(WebSocketFrame(fin: true, opcode: opcode, data: data)), promise: nil)
    }
}
