import NIOCore
import NIOHTTP1

/// Receives what a leased upstream connection produces. Implemented by the client-side handler that leased it.
protocol UpstreamResponseSink: AnyObject {
    func upstreamReceived(_ part: HTTPClientResponsePart)
    func upstreamReadComplete()
    func upstreamWritabilityChanged(isWritable: Bool)
    func upstreamClosed(error: Error?)
}

/// One keep-alive HTTP/1.1 connection to a backend, confined to its event loop.
final class UpstreamConnection {
    let channel: Channel
    let backend: Backend
    let handler: UpstreamHandler
    /// First in the pipeline: lets the fast path exchange raw bytes with the backend, past the HTTP codec.
    let tap: RawUpstreamTap
    let encoder: HTTPRequestEncoder
    let decoder: ByteToMessageHandler<HTTPResponseDecoder>
    /// True once the connection has carried a request: a failure before any response byte may then be the
    /// backend closing an idle connection at the same moment we reused it, which is safe to retry.
    var hasBeenUsed = false
    /// Set while the connection sits idle in the pool, so the pool can forget it if the backend closes it. (The pool
    /// itself rather than a closure: that was one allocation per request.) Strong, and cleared by every path that
    /// takes the connection out of the pool: a weak reference gives its target a side table, and every later
    /// retain and release of that object takes the runtime's slow path (see `RawUpstreamTap.sink`).
    var idleIn: UpstreamPool?

    init(
        channel: Channel,
        backend: Backend,
        handler: UpstreamHandler,
        tap: RawUpstreamTap,
        encoder: HTTPRequestEncoder,
        decoder: ByteToMessageHandler<HTTPResponseDecoder>
    ) {
        self.channel = channel
        self.backend = backend
        self.handler = handler
        self.tap = tap
        self.encoder = encoder
        self.decoder = decoder
        handler.connection = self
    }

    /// The HTTP codec (`encoder`, `decoder`) is in the pipeline, between the tap and the handler. It is added the first
    /// time the full path leases the connection (`sink`) and stays from then on: a connection only the fast path
    /// uses never needs it, and without it each `read()` NIO issues after a read, and every other event, passes two
    /// handlers fewer.
    private(set) var codecInstalled = false

    /// The full path's lease (`ProxyHandler`, fan-out): setting a sink puts the HTTP codec in place first.
    var sink: UpstreamResponseSink? {
        get { self.handler.sink }
        set {
            if newValue != nil && !self.codecInstalled { self.installCodec() }
            self.handler.sink = newValue
        }
    }

    private func installCodec() {
        self.codecInstalled = true
        do {
            try self.channel.pipeline.syncOperations.addHandlers([self.encoder, self.decoder], position: .after(self.tap))
        } catch {
            // Only possible once the channel is closing (a leased connection is active when it is handed out). The
            // sink hears of it as of any connection that closed under it, once it is set.
            self.channel.close(promise: nil)
            let handler = self.handler
            self.channel.eventLoop.assumeIsolated().execute {
                if let sink = handler.sink {
                    handler.sink = nil
                    sink.upstreamClosed(error: error)
                }
            }
        }
    }

    func write(_ part: HTTPClientRequestPart) {
        self.channel.write(part, promise: nil)
    }

    func flush() {
        self.channel.flush()
    }

    /// While set, response bytes go to this sink raw instead of through the HTTP decoder (the fast path's lease).
    var rawSink: RawUpstreamSink? {
        get { self.tap.sink }
        set { self.tap.sink = newValue }
    }

    /// Writes bytes below the HTTP encoder (a head the fast path serialized itself) and flushes; `reused` says the
    /// connection served an exchange before (direct writes are tried only then, see `DirectWriter`).
    func writeRawAndFlush(_ bytes: ByteBuffer, reused: Bool, counts: inout DirectWriteCounts.Side) {
        self.tap.writeAndFlush(bytes, reused: reused, counts: &counts)
    }

    /// Stops or resumes reading from the backend (back-pressure from a slow client).
    func holdReads(_ hold: Bool) {
        self.handler.holdReads(hold)
    }
}

/// Receives a leased connection's raw bytes on the fast path. (The fast path writes only a request head to the
/// backend, so the backend's writability is of no use to it.)
protocol RawUpstreamSink: AnyObject {
    func rawUpstreamRead(_ bytes: ByteBuffer)
    func rawUpstreamReadComplete()
    func rawUpstreamClosed()
}

/// Sits first in an upstream pipeline (next to the socket). Without a sink it passes everything on to the HTTP codec
/// (or, before the full path first leased the connection and added the codec, to `UpstreamHandler`, which closes an
/// idle connection that receives anything); with one (a fast-path lease) it hands response bytes to the sink and the
/// codec behind it sees nothing, so its state is still fresh for whichever path leases the connection next. Removed when the connection becomes a tunnel.
final class RawUpstreamTap: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// The fast-path handler that leased the connection. Strong on purpose, like `UpstreamHandler`'s references: a
    /// weak reference gives its target a side table, after which every retain and release of that object (NIO
    /// retains a handler on each event it delivers) goes through the runtime's slow path: `incrementSlow` and
    /// `doDecrementSlow` were 4 % of the proxy's user time (docs/benchmarks.md). The cycle this makes (handler →
    /// exchange → connection → tap → handler) is broken when the connection goes back to the pool, when its channel
    /// goes inactive, and when the tap is removed.
    var sink: RawUpstreamSink?
    private var context: ChannelHandlerContext?
    /// This read cycle's bytes went to a sink: its `channelReadComplete` is the sink's too, even when the sink let go
    /// of the connection meanwhile (the response ended and it went back to the pool). The HTTP handlers behind the
    /// tap saw none of those bytes, so the event stops here instead of passing through three handlers for nothing.
    private var readBySink = false
    /// The fast path's request heads go out with `send(2)` when the connection is reused (`DirectWriter`).
    private var direct = DirectWriter()

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.sink = nil
        self.direct.disable()
    }

    /// Writes bytes the fast path serialized itself: straight to the socket on a reused connection when NIO holds
    /// nothing of it (`DirectWriter`), else (and for what the socket did not take) through NIO, flushed.
    func writeAndFlush(_ bytes: ByteBuffer, reused: Bool, counts: inout DirectWriteCounts.Side) {
        guard let context = self.context else { return }
        if reused { self.direct.prepare(context.channel) }
        guard self.direct.isDirect else {
            context.writeAndFlush(Self.wrapOutboundOut(bytes), promise: nil)
            return
        }
        guard let rest = self.direct.write(bytes, counts: &counts) else { return }
        self.direct.willQueueInNIO()
        let promise = context.eventLoop.makePromise(of: Void.self)
        promise.futureResult.assumeIsolated().whenComplete { [self] _ in self.direct.nioWriteCompleted() }
        context.writeAndFlush(Self.wrapOutboundOut(rest), promise: promise)
    }

    /// A write from the HTTP encoder behind (the full path's lease): the fast path's next direct write waits until
    /// NIO has written it.
    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        self.direct.pipelineWrote()
        context.write(data, promise: promise)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if let sink = self.sink {
            self.readBySink = true
            sink.rawUpstreamRead(Self.unwrapInboundIn(data))
        } else {
            context.fireChannelRead(data)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        let readBySink = self.readBySink
        self.readBySink = false
        if let sink = self.sink {
            sink.rawUpstreamReadComplete()
        } else if !readBySink {
            context.fireChannelReadComplete()
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.direct.disable()
        if let sink = self.sink {
            self.sink = nil
            sink.rawUpstreamClosed()
        }
        context.fireChannelInactive()
    }
}

/// Sits last in an upstream pipeline: hands response parts to the current sink and applies back-pressure by
/// withholding `read()`.
final class UpstreamHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundIn = HTTPClientRequestPart
    typealias OutboundOut = HTTPClientRequestPart

    /// Strong references, cleared when the connection goes back to the pool (`sink`), when the channel goes inactive,
    /// and when this handler is removed: weak ones would slow down every retain and release of their targets (see
    /// `RawUpstreamTap.sink`).
    var sink: UpstreamResponseSink?
    var connection: UpstreamConnection?
    private var context: ChannelHandlerContext?
    private var readsHeld = false
    private var readPending = false

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.sink = nil
        self.connection = nil
        if self.readPending {
            self.readPending = false
            context.read()
        }
    }

    func holdReads(_ hold: Bool) {
        self.readsHeld = hold
        if !hold && self.readPending, let context = self.context {
            self.readPending = false
            context.read()
        }
    }

    func read(context: ChannelHandlerContext) {
        if self.readsHeld {
            self.readPending = true
        } else {
            context.read()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let sink = self.sink else {
            // An idle pooled connection must not receive anything; if it does, its framing is unknowable.
            context.close(promise: nil)
            return
        }
        sink.upstreamReceived(Self.unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.sink?.upstreamReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        self.sink?.upstreamWritabilityChanged(isWritable: context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        let sink = self.sink
        self.sink = nil
        context.close(promise: nil)
        sink?.upstreamClosed(error: error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let sink = self.sink {
            self.sink = nil
            sink.upstreamClosed(error: nil)
        } else if let connection = self.connection, let pool = connection.idleIn {
            connection.idleIn = nil
            pool.remove(connection)
        }
        self.connection = nil
        context.fireChannelInactive()
    }
}
