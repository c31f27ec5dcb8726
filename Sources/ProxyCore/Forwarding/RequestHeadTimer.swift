import NIOCore

/// Told by the request handler where a client connection is in its request cycle.
enum RequestHeadTimerEvent {
    /// A response finished: the connection now waits, idle, for the next request head.
    case awaitingHead
    /// A complete request head arrived: no head timer runs until the next `awaitingHead`.
    case headReceived
}

/// Guards a client connection against idling and against slow request heads (slowloris).
///
/// Sits first in the pipeline so it sees raw bytes before the HTTP decoder. While a head is awaited, an idle connection
/// is closed silently after the keep-alive timeout; once the first byte of a head arrives, the head must complete within
/// the request-header timeout or the client gets a 408 and the connection closes (HAProxy's `timeout http-request`).
final class RequestHeadTimer: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum State {
        case idle(Scheduled<Void>?)
        case readingHead(Scheduled<Void>?)
        case inRequest
    }

    private let headerTimeout: TimeAmount
    private let idleTimeout: TimeAmount
    private var state: State = .inRequest

    init(headerTimeout: TimeAmount, idleTimeout: TimeAmount) {
        self.headerTimeout = headerTimeout
        self.idleTimeout = idleTimeout
    }

    func channelActive(context: ChannelHandlerContext) {
        // The first request is held to the header timeout from accept: a client that connects and sends nothing
        // should not hold a slot for a whole keep-alive period.
        self.state = .readingHead(self.schedule(context, after: self.headerTimeout))
        context.fireChannelActive()
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive {
            self.state = .readingHead(self.schedule(context, after: self.headerTimeout))
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.cancel()
        self.state = .inRequest
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.cancel()
        self.state = .inRequest
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .idle(let timer) = self.state {
            timer?.cancel()
            self.state = .readingHead(self.schedule(context, after: self.headerTimeout))
        }
        context.fireChannelRead(data)
    }

    func triggerUserOutboundEvent(context: ChannelHandlerContext, event: Any, promise: EventLoopPromise<Void>?) {
        guard let event = event as? RequestHeadTimerEvent else {
            context.triggerUserOutboundEvent(event, promise: promise)
            return
        }
        self.cancel()
        switch event {
        case .awaitingHead:
            self.state = .idle(self.schedule(context, after: self.idleTimeout))
        case .headReceived:
            self.state = .inRequest
        }
        promise?.succeed()
    }

    private func cancel() {
        switch self.state {
        case .idle(let timer), .readingHead(let timer): timer?.cancel()
        case .inRequest: break
        }
    }

    private func schedule(_ context: ChannelHandlerContext, after delay: TimeAmount) -> Scheduled<Void> {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        return context.eventLoop.scheduleTask(in: delay) {
            let (timer, context) = loopBound.value
            timer.fire(context)
        }
    }

    private func fire(_ context: ChannelHandlerContext) {
        switch self.state {
        case .idle:
            self.state = .inRequest
            context.close(promise: nil)
        case .readingHead:
            self.state = .inRequest
            // Written below the HTTP encoder on purpose: no response is in progress, and the connection closes.
            let body = "request timeout: request head not received in time\n"
            let response =
                "HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: \(body.utf8.count)\r\n"
                + "Connection: close\r\n\r\n" + body
            let buffer = context.channel.allocator.buffer(string: response)
            context.writeAndFlush(Self.wrapOutboundOut(buffer)).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
        case .inRequest:
            break
        }
    }
}
