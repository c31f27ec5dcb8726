import NIOCore

/// Keeps a client connection's socket registered for reading while the handlers behind it hold `read()` back, up to a
/// bounded number of bytes.
///
/// NIO's `HTTPServerPipelineHandler` withholds `read()` from the moment a request has fully arrived until its response
/// has been written: HTTP/1.1 pipelining must not hand the next request over early. NIO then drops the socket's read
/// interest at the end of the read, and re-adds it when the response ends: two `epoll_ctl` calls per request, a third
/// of the proxy's system calls on a keep-alive connection (measured with `strace -c`: per request 2 `read`, 1 `write`,
/// 1 `writev`, 2 `epoll_ctl`). HAProxy and nginx keep reading and buffer what a pipelining client sends ahead.
///
/// This handler sits in front of the HTTP decoder and asks for the next read itself after each read, as long as fewer
/// than `limit` bytes arrived since the handlers behind it last asked: the pipelining handler then buffers what comes
/// early (as it does for bytes that arrive in the same read), and a client that pushes more than `limit` bytes ahead
/// is back-pressured exactly as before. It comes out of the pipeline with the HTTP handlers when a connection turns
/// into a tunnel, whose own back-pressure must not be overridden.
///
/// Reading ahead also reads a client's end of stream early, while its response is pending: a client that sends its
/// request and then shuts down its side (`shutdown(SHUT_WR)`, HTTP/1.0 tools) must still get that response. So client
/// channels allow half-closure: the `inputClosed` event passes the pipelining handler (after any request parts it
/// buffered) and `ProxyHandler` closes the connection once the response is written, or at once when the connection is
/// idle or the request can no longer complete.
final class ReadAheadHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Bytes that may arrive beyond what the handlers behind asked for.
    let limit: Int
    private var readAhead = 0

    init(limit: Int) {
        self.limit = limit
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.readAhead += Self.unwrapInboundIn(data).readableBytes
        context.fireChannelRead(data)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.fireChannelReadComplete()
        // Ask for the next read before NIO decides whether to keep the read interest (right after this event).
        // A duplicate of the read the handlers behind may ask for next is harmless: NIO keeps one read pending.
        if self.readAhead < self.limit, context.channel.isActive {
            context.read()
        }
    }

    func read(context: ChannelHandlerContext) {
        // The handlers behind want more: what arrived so far has been taken.
        self.readAhead = 0
        context.read()
    }
}
