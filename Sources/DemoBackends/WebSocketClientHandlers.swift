import NIOCore
import NIOHTTP1
import NIOWebSocket

/// Sits behind the HTTP client handlers until the upgrade resolves. `NIOHTTPClientUpgradeHandler`
/// only forwards a response when the server did *not* switch protocols, so any response head seen
/// here is a refusal; its status code goes into the error so callers (and tests) can see it.
final class WebSocketUpgradeOutcomeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart

    private let upgraded: EventLoopPromise<Void>

    init(upgraded: EventLoopPromise<Void>) {
        self.upgraded = upgraded
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .head(let head) = Self.unwrapInboundIn(data) {
            self.upgraded.fail(WebSocketClient.ConnectError.upgradeRejected(status: Int(head.status.code)))
            context.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.upgraded.fail(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        // Completing an already-succeeded promise is a no-op, so this only fires for early closes.
        self.upgraded.fail(WebSocketClient.ConnectError.closedBeforeUpgrade)
        context.fireChannelInactive()
    }
}

/// Turns inbound (already aggregated) frames into `WebSocketClient.Message`s and runs the
/// client's side of the protocol: answering pings and completing the close handshake.
final class WebSocketClientFrameHandler: ChannelDuplexHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    private let messages: AsyncStream<WebSocketClient.Message>.Continuation
    private var sentClose = false
    private var receivedClose = false

    init(messages: AsyncStream<WebSocketClient.Message>.Continuation) {
        self.messages = messages
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = Self.unwrapInboundIn(data)
        switch frame.opcode {
        case .text:
            self.messages.yield(.text(String(buffer: frame.unmaskedData)))
        case .binary:
            self.messages.yield(.binary(Array(frame.unmaskedData.readableBytesView)))
        case .pong:
            self.messages.yield(.pong(Array(frame.unmaskedData.readableBytesView)))
        case .ping:
            let pong = WebSocketFrame(fin: true, opcode: .pong, maskKey: .random(), data: frame.unmaskedData)
            context.writeAndFlush(Self.wrapOutboundOut(pong), promise: nil)
        case .connectionClose:
            self.receivedClose(frame, context: context)
        default:
            break
        }
    }

    /// Watches outbound frames so a second close frame (e.g. `sendClose` then `close()`) is not sent.
    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let frame = Self.unwrapOutboundIn(data)
        if frame.opcode == .connectionClose {
            guard !self.sentClose else {
                promise?.succeed()
                return
            }
            self.sentClose = true
        }
        context.write(data, promise: promise)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.messages.finish()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.messages.finish()
        context.close(promise: nil)
    }

    private func receivedClose(_ frame: WebSocketFrame, context: ChannelHandlerContext) {
        guard !self.receivedClose else { return }
        self.receivedClose = true
        var data = frame.unmaskedData
        let code = data.readInteger(as: UInt16.self)
        self.messages.yield(.close(code: code))
        self.messages.finish()

        let channel = context.channel
        if self.sentClose {
            // This was the reply to our close: the handshake is done.
            channel.close(promise: nil)
            return
        }
        // Server-initiated close: echo the code back, then let TCP go.
        var payload = channel.allocator.buffer(capacity: 2)
        if let code { payload.writeInteger(code) }
        let reply = WebSocketFrame(fin: true, opcode: .connectionClose, maskKey: .random(), data: payload)
        let written = context.eventLoop.makePromise(of: Void.self)
        self.write(context: context, data: Self.wrapOutboundOut(reply), promise: written)
        context.flush()
        written.futureResult.whenComplete { _ in channel.close(promise: nil) }
    }
}
