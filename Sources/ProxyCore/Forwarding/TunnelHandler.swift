import NIOCore

/// One side of an upgraded connection (WebSocket or any `Upgrade` protocol): relays raw bytes to its partner on the
/// other channel, unchanged, with back-pressure.
///
/// Reading stops while the partner cannot take more, so a slow reader on one side bounds what the proxy holds for it
/// to a socket's worth of buffers rather than growing without limit. Both channels share one event loop.
final class TunnelHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var partner: TunnelHandler?
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    private var closing = false
    /// Set by every read, cleared by the idle sweep (`TunnelIdleSweeper`).
    private var active = false
    /// Bytes this side received and passed to the partner.
    private(set) var bytesRelayed = 0
    /// On the backend side of a WebSocket tunnel: where frames start in what goes to the client.
    var frameTracker: WebSocketFrameTracker?
    var onClose: (() -> Void)?

    static func pair() -> (TunnelHandler, TunnelHandler) {
        let a = TunnelHandler()
        let b = TunnelHandler()
        a.partner = b
        b.partner = a
        return (a, b)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if !context.channel.isActive {
            // Closed before the tunnel was spliced: take the other side down too.
            self.partner?.partnerClosed()
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.partner = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = Self.unwrapInboundIn(data)
        self.active = true
        self.bytesRelayed += buffer.readableBytes
        self.frameTracker?.consume(buffer)
        self.partner?.partnerWrite(buffer)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.partner?.partnerFlush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.onClose?()
        self.onClose = nil
        self.partner?.partnerClosed()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    /// True when this side read anything since the last call.
    func takeActivity() -> Bool {
        defer { self.active = false }
        return self.active
    }

    /// The tunnel passed no bytes for its idle timeout: close this side (the partner follows).
    func closeIdle() {
        self.context?.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            self.partner?.partnerBecameWritable()
        }
        context.fireChannelWritabilityChanged()
    }

    func read(context: ChannelHandlerContext) {
        if let partner = self.partner, partner.isWritable {
            context.read()
        } else {
            self.pendingRead = true
        }
    }

    /// Closes the tunnel from the proxy's side (its key moved, or its backend is migrated). On the client side of a
    /// WebSocket tunnel at a frame boundary, the client first gets a close frame with `code`, so it knows to
    /// reconnect; otherwise the TCP connection just closes (which clients also treat as a reason to reconnect).
    func close(code: UInt16) {
        guard let context = self.context, !self.closing else { return }
        self.closing = true
        if let tracker = self.partner?.frameTracker, tracker.atFrameBoundary, context.channel.isActive {
            let frame = WebSocketFrameTracker.closeFrame(code: code, allocator: context.channel.allocator)
            context.writeAndFlush(Self.wrapOutboundOut(frame)).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
        } else {
            context.close(promise: nil)
        }
    }

    private var isWritable: Bool {
        self.context?.channel.isWritable ?? false
    }

    private func partnerWrite(_ buffer: ByteBuffer) {
        self.context?.write(Self.wrapOutboundOut(buffer), promise: nil)
    }

    private func partnerFlush() {
        self.context?.flush()
    }

    private func partnerBecameWritable() {
        if self.pendingRead, let context = self.context {
            self.pendingRead = false
            context.read()
        }
    }

    /// The other side went away: deliver what is already queued, then close.
    private func partnerClosed() {
        guard !self.closing, let context = self.context else { return }
        self.closing = true
        guard context.channel.isActive else { return }
        let buffer = context.channel.allocator.buffer(capacity: 0)
        context.writeAndFlush(Self.wrapOutboundOut(buffer)).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }
}
