import CProxySys
import Logging
import NIOCore
import NIOHTTP1
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

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
///
/// With `threads.tunnel_relay` (the default) the tunnel runs here only until both pipelines are bare: `handOff(to:)`
/// then gives its sockets to a relay thread (`TunnelRelay`) and closes the channels. This object stays as the
/// tunnel's record: the registry closes the tunnel through it (`close(code:)` forwards to the relay), and the relay
/// reports the end back to it on this loop (`relayEnded`), which writes the access-log line and releases the lease
/// as for a tunnel that stayed here.
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
        /// Reads are held while the tunnel is being handed to the relay.
        static let holding = Flags(rawValue: 1 << 5)
        /// The relay carries the tunnel; the NIO channels are closed.
        static let relayed = Flags(rawValue: 1 << 6)
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
    /// While relayed: the shard and the tunnel's entry there.
    private var relay: (shard: RelayShard, tunnel: RelayedTunnel)?
    /// Reads delivered while reads were held for the hand-over (each one is a write to the other side).
    private var readsWhileHolding = 0
    /// Why the tunnel ended (the first reason; nil while it is open).
    private(set) var end: TunnelEnd?

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
        if self.flags.contains(.holding) { self.readsWhileHolding += 1 }
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
        // Relayed: the channels were closed by the hand-over, not by a peer.
        if !self.flags.contains(.relayed) {
            self.sideClosed(context)
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if self.end == nil { self.end = .error }
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, !self.flags.contains(.holding) {
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
        if !self.flags.contains(.holding), let partner = self.partner(of: context), partner.channel.isWritable {
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
        if self.end == nil { self.end = .idle }
        self.client?.close(promise: nil)
    }

    /// Closes the tunnel from the proxy's side (its key moved, or its backend is migrated). At a frame boundary of a
    /// WebSocket tunnel, the client first gets a close frame with `code`, so it knows to reconnect; otherwise the TCP
    /// connection just closes (which clients also treat as a reason to reconnect).
    func close(code: UInt16) {
        if let relay = self.relay {
            relay.shard.close(relay.tunnel, code: code)
            return
        }
        guard let client = self.client, !self.flags.contains(.closing) else { return }
        self.flags.insert(.closing)
        if self.end == nil { self.end = .proxy }
        if let tracker = self.frameTracker, tracker.atFrameBoundary, client.channel.isActive {
            let frame = WebSocketFrameTracker.closeFrame(code: code, allocator: client.channel.allocator)
            client.writeAndFlush(Self.wrapOutboundOut(frame)).assumeIsolated().whenComplete { _ in
                client.close(promise: nil)
            }
        } else {
            client.close(promise: nil)
        }
    }

    /// Runs `onClose`, once: when the first side closes, or when the tunnel could not be set up (`end` is kept when
    /// a reason was already known).
    func reportClosed(_ end: TunnelEnd) {
        if self.end == nil { self.end = end }
        guard !self.flags.contains(.closed) else { return }
        self.flags.insert(.closed)
        self.onClose?(self)
        self.onClose = nil
    }

    // MARK: Handing the tunnel to the relay

    /// Moves the tunnel off its two NIO channels onto `link`'s relay shard (`TunnelRelay`): holds reads on both sides,
    /// waits until both channels have written everything they were given, then takes their descriptors and closes the
    /// channels. Where any step cannot be done the tunnel simply stays on NIO.
    func handOff(to link: ProxyServer.RelayLink, attempt: Int = 0) {
        guard let client = self.client, let backend = self.backend, !self.flags.contains(.closing),
            !self.flags.contains(.closed), client.channel.isActive, backend.channel.isActive
        else { return self.resumeReads() }
        self.flags.insert(.holding)
        self.readsWhileHolding = 0
        // A write's promise completes once it and every write before it went to the socket.
        let clientWritten = client.writeAndFlush(Self.wrapOutboundOut(client.channel.allocator.buffer(capacity: 0)))
        let backendWritten = backend.writeAndFlush(Self.wrapOutboundOut(backend.channel.allocator.buffer(capacity: 0)))
        clientWritten.and(backendWritten).assumeIsolated().whenComplete { result in
            guard case .success = result else { return self.resumeReads() }
            if self.readsWhileHolding > 0 {
                // Reads in flight when the hold began were written behind the marks: wait for those too.
                guard attempt < 3 else { return self.resumeReads() }
                return self.handOff(to: link, attempt: attempt + 1)
            }
            self.detach(to: link)
        }
    }

    private func detach(to link: ProxyServer.RelayLink) {
        guard let client = self.client, let backend = self.backend, !self.flags.contains(.closing),
            !self.flags.contains(.closed), client.channel.isActive, backend.channel.isActive
        else { return self.resumeReads() }
        guard let clientFD = Self.descriptor(of: client.channel), let backendFD = Self.descriptor(of: backend.channel) else {
            Self.warnOnce(self.record.runtime, "could not identify a tunnel's sockets: tunnels stay on NIO channels")
            return self.resumeReads()
        }
        let clientCopy = cproxy_dup(clientFD)
        let backendCopy = clientCopy >= 0 ? cproxy_dup(backendFD) : -1
        guard backendCopy >= 0 else {
            // Out of descriptors (`ulimit -n`): this tunnel stays on its channels.
            let code = errno
            if clientCopy >= 0 { cproxy_close(clientCopy) }
            Self.warnOnce(self.record.runtime, "could not duplicate a tunnel's sockets (errno \(code)): it stays on NIO channels")
            return self.resumeReads()
        }
        let counted = link.connections.handOff(client.channel)
        let connections = link.connections
        let metrics = self.record.runtime.metrics
        let listener = self.record.listener.name
        let loop = client.eventLoop
        let bound = NIOLoopBound(self, eventLoop: loop)
        let relayed = RelayedTunnel(
            clientFD: clientCopy, backendFD: backendCopy, tracker: self.frameTracker,
            idleTimeout: self.record.runtime.config.timeouts.tunnelIdle
        ) { fromClient, fromBackend, end in
            metrics.tunnelsRelayed.decrement()
            if counted {
                connections.relayedClosed()
                metrics.connectionClosed(listener: listener)
            }
            loop.execute { bound.value.relayEnded(fromClient: fromClient, fromBackend: fromBackend, end: end) }
        }
        self.flags.insert(.relayed)
        metrics.tunnelsRelayed.increment()
        self.relay = (link.shard, relayed)
        self.frameTracker = nil
        self.record.idleSweeper.remove(self)
        // NIO's close is a plain close(2) of its descriptor: the connections live on in the copies.
        client.close(promise: nil)
        backend.close(promise: nil)
        link.shard.adopt(relayed)
    }

    private func relayEnded(fromClient: Int, fromBackend: Int, end: TunnelEnd) {
        self.bytesFromClient &+= fromClient
        self.bytesFromBackend &+= fromBackend
        self.relay = nil
        self.reportClosed(end)
    }

    private static let warned = Atomic<Bool>(false)

    /// A hand-over that fails once fails for every tunnel (a NIO that describes channels differently) or for many at
    /// once (the descriptor limit): say so once per process, not per tunnel.
    private static func warnOnce(_ runtime: ProxyRuntime, _ message: Logger.Message) {
        guard !Self.warned.exchange(true, ordering: .relaxed) else { return }
        runtime.logger.warning("tunnel relay: \(message)")
    }

    /// The hand-over did not happen: reads resume where they were held.
    private func resumeReads() {
        guard self.flags.contains(.holding) else { return }
        self.flags.remove(.holding)
        if self.flags.contains(.clientReadPending), let client = self.client, self.backend?.channel.isWritable == true {
            self.flags.remove(.clientReadPending)
            client.read()
        }
        if self.flags.contains(.backendReadPending), let backend = self.backend, self.client?.channel.isWritable == true {
            self.flags.remove(.backendReadPending)
            backend.read()
        }
    }

    /// The descriptor of a socket channel. NIO has no public accessor: it is read from the channel's description
    /// (`SocketChannel { BaseSocket { fd=N }, ... }`) and trusted only when the kernel says that descriptor is a TCP
    /// socket with exactly the channel's local and peer addresses.
    static func descriptor(of channel: Channel) -> Int32? {
        guard let fd = Self.describedDescriptor(of: channel), let local = channel.localAddress,
            let remote = channel.remoteAddress
        else { return nil }
        let matches = local.withSockAddr { local, localLength in
            remote.withSockAddr { remote, remoteLength in
                cproxy_socket_is(fd, local, UInt32(localLength), remote, UInt32(remoteLength))
            }
        }
        return matches == 1 ? fd : nil
    }

    /// The `fd=N` in a channel's description, unchecked: callers confirm it with the kernel before they use it.
    static func describedDescriptor(of channel: Channel) -> Int32? {
        let description = String(describing: channel)
        guard let range = description.range(of: "fd=") else { return nil }
        guard let fd = Int32(description[range.upperBound...].prefix(while: \.isNumber)), fd >= 0 else { return nil }
        return fd
    }

    // MARK: Private

    private func partner(of context: ChannelHandlerContext) -> ChannelHandlerContext? {
        context === self.client ? self.backend : self.client
    }

    /// One side went away: report the tunnel closed (once), then deliver what is already queued to the other side
    /// and close it.
    private func sideClosed(_ context: ChannelHandlerContext) {
        self.reportClosed(context === self.client ? .client : .backend)
        guard let other = self.partner(of: context), other.channel.isActive else { return }
        let empty = other.channel.allocator.buffer(capacity: 0)
        other.writeAndFlush(Self.wrapOutboundOut(empty)).assumeIsolated().whenComplete { _ in
            other.close(promise: nil)
        }
    }
}
