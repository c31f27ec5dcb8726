import NIOCore
import NIOHTTP1

/// An upgraded connection (WebSocket or any `Upgrade` protocol): relays raw bytes between the client's channel and
/// the backend's, unchanged, with back-pressure, and keeps what the tunnel's access-log line and lease need.
///
/// One object per tunnel, added to both pipelines: it tells the two sides apart by their contexts (both channels run
/// on one event loop). An idle WebSocket costs the proxy mostly NIO's two channels; on top, a handler object per
/// side, a close closure capturing the log fields and an idle-sweep dictionary entry came to about 500 bytes per
/// tunnel, where this one object (with its record and sweep slot) and the registry's closure take about 340
/// (heaptrack, docs/benchmarks.md).
///
/// Reading stops on a side while the other side cannot take more, so a slow reader bounds what the proxy holds for
/// it to a socket's worth of buffers rather than growing without limit.
final class TunnelHandler: ChannelDuplexHandler, IdleSweepable {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// What the access-log line, the metrics and the lease need when the tunnel closes.
    struct Record {
        let runtime: ProxyRuntime
        let idleSweeper: TunnelIdleSweeper<TunnelHandler>
        let listener: ListenerContext
        let clientIP: String
        let method: HTTPMethod
        let clientURI: String
        let backend: Backend
        let key: String?
        let started: NIODeadline
        /// Bytes of the upgrade request and its `101`, before the tunnel.
        let bytesIn: Int
        let bytesOut: Int
    }

    private struct Flags: OptionSet {
        let rawValue: UInt8
        static let clientReadPending = Flags(rawValue: 1 << 0)
        static let backendReadPending = Flags(rawValue: 1 << 1)
        static let closing = Flags(rawValue: 1 << 2)
        static let closed = Flags(rawValue: 1 << 3)
        /// Set by every read, cleared by the idle sweep (`TunnelIdleSweeper`).
        static let active = Flags(rawValue: 1 << 4)
    }

    private var client: ChannelHandlerContext?
    private var backend: ChannelHandlerContext?
    private var flags: Flags = []
    /// Bytes relayed from the client to the backend, and back.
    private(set) var bytesFromClient = 0
    private(set) var bytesFromBackend = 0
    /// For WebSocket tunnels: where frames start in what goes to the client.
    private var frameTracker: WebSocketFrameTracker?
    let record: Record
    /// Bookkeeping of this loop's `TunnelIdleSweeper`.
    var idleSweep = IdleSweepSlot()
    /// The `TunnelRegistry` token, unregistered on close.
    var registryToken: UInt64?
    /// Called once, when the first side closes (before the other side is told).
    var onClose: ((TunnelHandler) -> Void)?

    init(webSocket: Bool, record: Record) {
        self.frameTracker = webSocket ? WebSocketFrameTracker() : nil
        self.record = record
    }

    // MARK: Pipeline events (both sides)

    func handlerAdded(context: ChannelHandlerContext) {
        // The client side is added first (`ProxyHandler.spliceTunnel`).
        if self.client == nil {
            self.client = context
        } else {
            self.backend = context
        }
        if self.flags.contains(.closed) {
            // The side added first had already closed.
            context.close(promise: nil)
        } else if !context.channel.isActive {
            // Closed before the tunnel was spliced: take the other side down too.
            self.sideClosed(context)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        if context === self.client { self.client = nil }
        if context === self.backend { self.backend = nil }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = Self.unwrapInboundIn(data)
        self.flags.insert(.active)
        if context === self.client {
            self.bytesFromClient &+= buffer.readableBytes
            self.backend?.write(data, promise: nil)
        } else {
            self.bytesFromBackend &+= buffer.readableBytes
            self.frameTracker?.consume(buffer)
            self.client?.write(data, promise: nil)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.partner(of: context)?.flush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.sideClosed(context)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            // This side drained: the other side may read again if it was held.
            let held: Flags = context === self.client ? .backendReadPending : .clientReadPending
            if self.flags.contains(held), let partner = self.partner(of: context) {
                self.flags.remove(held)
                partner.read()
            }
        }
        context.fireChannelWritabilityChanged()
    }

    func read(context: ChannelHandlerContext) {
        if let partner = self.partner(of: context), partner.channel.isWritable {
            context.read()
        } else {
            self.flags.insert(context === self.client ? .clientReadPending : .backendReadPending)
        }
    }

    // MARK: Control from outside the pipelines

    /// True when either side read anything since the last call.
    func takeActivity() -> Bool {
        defer { self.flags.remove(.active) }
        return self.flags.contains(.active)
    }

    /// The tunnel passed no bytes for its idle timeout: close it.
    func closeIdle() {
        self.client?.close(promise: nil)
    }

    /// Closes the tunnel from the proxy's side (its key moved, or its backend is migrated). At a frame boundary of a
    /// WebSocket tunnel, the client first gets a close frame with `code`, so it knows to reconnect; otherwise the TCP
    /// connection just closes (which clients also treat as a reason to reconnect).
    func close(code: UInt16) {
        guard let client = self.client, !self.flags.contains(.closing) else { return }
        self.flags.insert(.closing)
        if let tracker = self.frameTracker, tracker.atFrameBoundary, client.channel.isActive {
            let frame = WebSocketFrameTracker.closeFrame(code: code, allocator: client.channel.allocator)
            client.writeAndFlush(Self.wrapOutboundOut(frame)).assumeIsolated().whenComplete { _ in
                client.close(promise: nil)
            }
        } else {
            client.close(promise: nil)
        }
    }

    /// Runs `onClose`, once: when the first side closes, or when the tunnel could not be set up.
    func reportClosed() {
        guard !self.flags.contains(.closed) else { return }
        self.flags.insert(.closed)
        self.onClose?(self)
        self.onClose = nil
    }

    // MARK: Private

    private func partner(of context: ChannelHandlerContext) -> ChannelHandlerContext? {
        context === self.client ? self.backend : self.client
    }

    /// One side went away: report the tunnel closed (once), then deliver what is already queued to the other side
    /// and close it.
    private func sideClosed(_ context: ChannelHandlerContext) {
        self.reportClosed()
        guard let other = self.partner(of: context), other.channel.isActive else { return }
        let empty = other.channel.allocator.buffer(capacity: 0)
        other.writeAndFlush(Self.wrapOutboundOut(empty)).assumeIsolated().whenComplete { _ in
            other.close(promise: nil)
        }
    }
}
