import NIOCore
import NIOWebSocket

/// One WebSocket member of a room. Frames arrive already aggregated (see `RoomServer`), so
/// there are no continuation frames to handle here.
final class RoomWebSocketHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    /// How long to wait for the peer's close reply after we sent a close frame (RFC 6455 §7.1.1:
    /// the server should close TCP only after the close handshake, to avoid resetting the peer).
    private static let closeHandshakeTimeout = TimeAmount.seconds(2)

    private let state: RoomServerState
    private let room: String
    private var joined = false
    private var sentClose = false

    init(state: RoomServerState, room: String) {
        self.state = state
        self.room = room
    }

    func handlerAdded(context: ChannelHandlerContext) {
        // Added right after the upgrade, so the channel is active and the 101 has been sent.
        let members = self.state.rooms.join(self.room, channel: context.channel)
        self.joined = true
        let event = JoinedEvent(room: self.room, backend: self.state.backendID, members: members)
        self.send(.text, context.channel.allocator.buffer(string: RoomJSON.encode(event)), context: context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.leaveRoom(context: context)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.leaveRoom(context: context)
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = Self.unwrapInboundIn(data)
        switch frame.opcode {
        case .text:
            self.receivedText(String(buffer: frame.unmaskedData), context: context)
        case .binary:
            self.send(.binary, frame.unmaskedData, context: context)
        case .ping:
            self.send(.pong, frame.unmaskedData, context: context)
        case .connectionClose:
            self.receivedClose(frame, context: context)
        default:
            // Pongs need no answer; the aggregator never forwards continuation frames.
            break
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    private func receivedText(_ text: String, context: ChannelHandlerContext) {
        // Test hook: lets tests check that arbitrary close codes survive a proxy unchanged.
        if text.hasPrefix("close:"), let code = UInt16(text.dropFirst("close:".count)) {
            self.initiateClose(code: code, context: context)
            return
        }
        let event = MessageEvent(room: self.room, backend: self.state.backendID, text: text)
        let payload = context.channel.allocator.buffer(string: RoomJSON.encode(event))
        let frame = WebSocketFrame(fin: true, opcode: .text, data: payload)
        for member in self.state.rooms.members(of: self.room) {
            // Members may live on other event loops; Channel.writeAndFlush hops there for us.
            member.writeAndFlush(frame, promise: nil)
        }
    }

    private func receivedClose(_ frame: WebSocketFrame, context: ChannelHandlerContext) {
        if self.sentClose {
            // The peer answered our close: the handshake is complete.
            context.close(promise: nil)
            return
        }
        // Echo only the status code (not the reason), as the RFC suggests for a close reply.
        var data = frame.unmaskedData
        let code = data.readSlice(length: 2) ?? ByteBuffer()
        self.sentClose = true
        let written = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(Self.wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: code)),
                              promise: written)
        let channel = context.channel
        written.futureResult.whenComplete { _ in channel.close(promise: nil) }
    }

    private func initiateClose(code: UInt16, context: ChannelHandlerContext) {
        guard !self.sentClose else { return }
        self.sentClose = true
        var payload = context.channel.allocator.buffer(capacity: 2)
        payload.writeInteger(code)
        self.send(.connectionClose, payload, context: context)
        // Don't wait forever for a peer that never answers the close.
        let channel = context.channel
        context.eventLoop.scheduleTask(in: Self.closeHandshakeTimeout) { channel.close(promise: nil) }
    }

    private func send(_ opcode: WebSocketOpcode, _ data: ByteBuffer, context: ChannelHandlerContext) {
        context.writeAndFlush(Self.wrapOutboundOut(WebSocketFrame(fin: true, opcode: opcode, data: data)), promise: nil)
    }

    private func leaveRoom(context: ChannelHandlerContext) {
        guard self.joined else { return }
        self.joined = false
        self.state.rooms.leave(self.room, channel: context.channel)
    }
}
