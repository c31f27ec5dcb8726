import CProxySys
import NIOCore

/// Writes a plain TCP channel's outgoing bytes with one `send(2)` of its own instead of through NIO's pipeline and
/// write queue, for the fast path (`FastPathHandler` to clients, `RawUpstreamTap` to backends).
///
/// Why: NIO's write and flush machinery (pipeline traversal, the pending-writes queue, promises, the channel's
/// lifecycle checks, and the retains and releases of all of it) was about a sixth of the proxy's user time per
/// keep-alive request, for what is one `send` of a few hundred bytes that the socket almost always takes whole
/// (docs/benchmarks.md, seventh session).
///
/// How it stays correct:
/// - **Only with an empty NIO queue.** Bytes written here must never overtake bytes NIO still holds. A channel is
///   switched to direct writes only when NIO reports nothing buffered (`bufferedWritableBytes`), and from then on every
///   write its owner hands to NIO is counted until it completes (`willQueueInNIO`/`nioWriteCompleted`); while any is
///   outstanding, writes go to NIO behind it. Anything else that may write to the channel through NIO switches it
///   back to unverified first (`pipelineWrote`).
/// - **Only an open channel's descriptor.** The descriptor comes from the channel's description and is verified with
///   the kernel (`TunnelHandler.descriptor`), and every write first checks `isActive`: NIO marks a channel inactive
///   before it closes the socket and before any user code runs, so an active channel's descriptor is its own.
/// - **Whatever the socket does not take goes to NIO**, which waits for writability as usual, so back-pressure
///   (the high water mark, `channelWritabilityChanged`) works as before. A write error is left for NIO to meet too:
///   its own write fails the same way and closes the channel through the usual paths.
/// - **Never for TLS** (the bytes must go through the TLS handler); the owner does not enable it there.
/// - **Not for a connection's first exchange**: finding the descriptor costs a formatted description and two system
///   calls, which a connection that serves one request would pay for nothing.
struct DirectWriter {
    private enum Mode {
        /// Not looked up yet (or not yet possible: NIO had bytes queued).
        case unknown
        case direct(Int32)
        /// Known, but something else wrote through NIO since: usable again once NIO's queue is seen empty.
        case unverified(Int32)
        case off
    }

    private var mode = Mode.unknown
    /// The channel whose socket it is (kept so a write does not fetch it through the pipeline, a retain each time).
    private var channel: Channel?
    /// Writes handed to NIO after direct writes began, not completed yet.
    private var queuedInNIO = 0

    /// Direct writes are on (though a write may still have to wait behind NIO's queue): the owner must count what it
    /// hands to NIO.
    var isDirect: Bool {
        if case .direct = self.mode { return true }
        return false
    }

    /// Turns direct writes on when possible: the descriptor is looked up once, and used only while NIO has nothing
    /// of this channel's queued. Call before writing an exchange's first bytes, on the channel's event loop.
    mutating func prepare(_ channel: Channel) {
        switch self.mode {
        case .direct, .off:
            return
        case .unknown:
            guard Self.nioQueueIsEmpty(channel) else { return }
            guard let fd = TunnelHandler.descriptor(of: channel) else {
                self.mode = .off
                return
            }
            self.mode = .direct(fd)
            self.channel = channel
        case .unverified(let fd):
            if self.queuedInNIO == 0, Self.nioQueueIsEmpty(channel) { self.mode = .direct(fd) }
        }
    }

    /// Never again (TLS, a connection handed to another path).
    mutating func disable() {
        self.mode = .off
        self.channel = nil
    }

    /// Something other than the owner wrote through NIO: direct writes wait until its queue is seen empty again.
    mutating func pipelineWrote() {
        if case .direct(let fd) = self.mode { self.mode = .unverified(fd) }
    }

    /// Writes as much of `bytes` as the socket takes now (the channel `prepare` was given). Returns what is left for
    /// NIO: nil when everything was written; all of it when direct writes are off, something is queued in NIO, or the
    /// channel is closing.
    mutating func write(_ bytes: ByteBuffer, counts: inout DirectWriteCounts.Side) -> ByteBuffer? {
        guard case .direct(let fd) = self.mode, self.queuedInNIO == 0, bytes.readableBytes > 0, self.channel?.isActive == true
        else {
            return bytes
        }
        let written = bytes.withUnsafeReadableBytes { cproxy_send_nowait(fd, $0.baseAddress, UInt($0.count)) }
        if written == bytes.readableBytes {
            counts.whole += 1
            return nil
        }
        counts.partial += 1
        // Partly written, or -EAGAIN (the socket is full): NIO writes the rest when the socket has room. Another
        // error: NIO's own write meets it and closes the channel as it always does.
        var rest = bytes
        if written > 0 { rest.moveReaderIndex(forwardBy: written) }
        return rest
    }

    /// The socket's descriptor when nothing of the channel's is queued anywhere (no direct write left to NIO, NIO's
    /// queue empty): every byte given so far is in the kernel. For moving the connection off NIO (`HTTPRelay`).
    func descriptorIfDrained() -> Int32? {
        guard case .direct(let fd) = self.mode, self.queuedInNIO == 0, let channel = self.channel, channel.isActive,
            Self.nioQueueIsEmpty(channel)
        else { return nil }
        return fd
    }

    /// The owner hands a write to NIO; `nioWriteCompleted` when that write's promise completes.
    mutating func willQueueInNIO() {
        self.queuedInNIO += 1
    }

    mutating func nioWriteCompleted() {
        self.queuedInNIO -= 1
    }

    static func nioQueueIsEmpty(_ channel: Channel) -> Bool {
        (try? channel.syncOptions?.getOption(.bufferedWritableBytes)) == 0
    }
}

/// How many of the fast path's writes went to a socket directly (`DirectWriter`): a diagnostic, summed over the event
/// loops by `ProxyServer.directWriteCounts()` (no shared counter on the request path).
public struct DirectWriteCounts: Sendable, Equatable {
    public struct Side: Sendable, Equatable {
        /// Written whole with one `send`.
        public var whole = 0
        /// Tried, but the socket took only part (or none): the rest went to NIO.
        public var partial = 0

        public init() {}
    }

    /// Responses to clients.
    public var client = Side()
    /// Request heads to backends.
    public var backend = Side()

    public init() {}

    mutating func add(_ other: DirectWriteCounts) {
        self.client.whole += other.client.whole
        self.client.partial += other.client.partial
        self.backend.whole += other.backend.whole
        self.backend.partial += other.backend.partial
    }
}
