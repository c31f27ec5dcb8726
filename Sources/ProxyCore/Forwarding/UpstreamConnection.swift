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

    var sink: UpstreamResponseSink? {
        get { self.handler.sink }
        set { self.handler.sink = newValue }
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

    /// Writes bytes below the HTTP encoder (a head the fast path serialized itself) and flushes.
    func writeRawAndFlush(_ bytes: ByteBuffer) {
        self.tap.writeAndFlush(bytes)
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

/// Sits first in an upstream pipeline (next to the socket). Without a sink it passes everything on to the HTTP codec;
/// with one (a fast-path lease) it hands response bytes to the sink and the codec behind it sees nothing, so its state
/// is still fresh for whichever path leases the connection next. Removed when the connection becomes a tunnel.
final class RawUpstreamTap: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// The fast-path handler that leased the connection. Strong on purpose, like `UpstreamHandler`'s references: a
    /// weak reference gives its target a side table, after which every retain and release of that object (NIO
    /// retains a handler on each event it delivers) goes through the runtime's slow path: `incrementSlow` and
    /// `doDecrementSlow` were 4 % of the proxy's user time (docs/benchmarks.md). The cycle this makes (handler →
    /// exchange → connection → tap → handler) is broken when the connection goes back to the pool, when its channel
    /// goes inactive, and when the tap is removed.
    var sink: RawUpstreamSink?
    private var context: ChannelHandlerContext?

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.sink = nil
    }

    func writeAndFlush(_ bytes: ByteBuffer) {
        self.context?.writeAndFlush(Self.wrapOutboundOut(bytes), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if let sink = self.sink {
            sink.rawUpstreamRead(Self.unwrapInboundIn(data))
        } else {
            context.fireChannelRead(data)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if let sink = self.sink {
            sink.rawUpstreamReadComplete()
        } else {
            context.fireChannelReadComplete()
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
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
