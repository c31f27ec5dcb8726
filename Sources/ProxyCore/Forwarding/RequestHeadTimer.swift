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
///
/// An inbound handler only, so outbound events (`read()` after every read, writes, flushes) skip it.
final class RequestHeadTimer: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum State {
        case idle
        case readingHead
        case inRequest
    }

    private let headerTimeout: TimeAmount
    private let idleTimeout: TimeAmount
    private var state: State = .inRequest
    /// When the current state times out (nil while a request is in progress).
    private var deadline: NIODeadline?
    /// At most one timer is pending; it re-arms itself for a later deadline instead of being cancelled and
    /// rescheduled on every request, so a keep-alive request costs no timer allocation here.
    private var timer: Scheduled<Void>?
    private var timerFiresAt: NIODeadline = .distantFuture
    private var context: ChannelHandlerContext?
    /// When the first bytes of the current request head arrived (nil before they do): where a request's duration
    /// starts, as nginx's `$request_time` does. Read by the fast path instead of a clock read of its own.
    private(set) var headStartedAt: NIODeadline?

    init(headerTimeout: TimeAmount, idleTimeout: TimeAmount) {
        self.headerTimeout = headerTimeout
        self.idleTimeout = idleTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive {
            self.enter(.readingHead, for: self.headerTimeout)
        }
    }

    func channelActive(context: ChannelHandlerContext) {
        // The first request is held to the header timeout from accept: a client that connects and sends nothing
        // should not hold a slot for a whole keep-alive period.
        self.enter(.readingHead, for: self.headerTimeout)
        context.fireChannelActive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.stop()
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.stop()
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.state {
        case .idle:
            let now = NIODeadline.now()
            self.headStartedAt = now
            self.enter(.readingHead, for: self.headerTimeout, now: now)
        case .readingHead where self.headStartedAt == nil:
            self.headStartedAt = .now()
        case .readingHead, .inRequest:
            break
        }
        context.fireChannelRead(data)
    }

    /// Called directly by the request handler of the same connection (on its event loop), not sent as a pipeline
    /// event: an outbound user event would pass every handler in between and be cast back from `Any`, twice per
    /// request.
    /// `now` saves a clock read when the caller has just read it.
    func handle(_ event: RequestHeadTimerEvent, now: NIODeadline = .now()) {
        switch event {
        case .awaitingHead:
            self.headStartedAt = nil
            self.enter(.idle, for: self.idleTimeout, now: now)
        case .headReceived:
            self.state = .inRequest
            self.deadline = nil
        }
    }

    private func enter(_ state: State, for timeout: TimeAmount, now: NIODeadline = .now()) {
        self.state = state
        let deadline = now + timeout
        self.deadline = deadline
        if self.timer == nil || self.timerFiresAt > deadline {
            self.timer?.cancel()
            self.arm(at: deadline)
        }
    }

    private func arm(at deadline: NIODeadline) {
        guard let context = self.context else { return }
        self.timerFiresAt = deadline
        self.timer = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in
            self.timer = nil
            self.timerFiresAt = .distantFuture
            self.check()
        }
    }

    private func stop() {
        self.state = .inRequest
        self.deadline = nil
        self.headStartedAt = nil
        self.timer?.cancel()
        self.timer = nil
    }

    private func check() {
        guard let deadline = self.deadline, let context = self.context else { return }
        if NIODeadline.now() < deadline {
            self.arm(at: deadline)
            return
        }
        self.deadline = nil
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
