import Logging
import NIOCore
import NIOHTTP1

/// The handlers of a client connection's HTTP pipeline that an upgrade must remove to turn it into a byte tunnel.
struct DownstreamHTTPHandlers {
    let headTimer: RequestHeadTimer
    /// In front of the HTTP codec when the listener's fast path is on; a pass-through once it has handed over.
    var fastPath: FastPathHandler?
    let readAhead: ReadAheadHandler
    let encoder: HTTPResponseEncoder
    let decoder: ByteToMessageHandler<HTTPRequestDecoder>
    let pipelining: HTTPServerPipelineHandler
}

/// One request in flight on a client connection, from head to the end of its response. (Not final: the fast path's
/// exchange extends it with fields of its own.)
class Exchange {
    /// The head as it goes to the backend (after the policy's path and header rewrites).
    let head: HTTPRequestHead
    /// The request target as the client sent it (what the access log shows).
    let clientURI: String
    let backend: Backend
    let framing: RequestFraming
    let upgrade: String?
    /// When the first byte of the request head arrived (`RequestHeadTimer.headStartedAt`), as nginx's `$request_time`
    /// counts: the access log's `duration_ms` and `ott_proxy_request_duration_seconds` measure from here. (Before the
    /// head completes there is no exchange; a request buffered behind another starts when it is taken up.)
    let started: NIODeadline
    let clientKeepAlive: Bool
    var upstream: UpstreamConnection?
    /// The key whose lease this exchange holds (keyed decisions only).
    var key: String?
    /// Request parts received while no upstream connection is attached yet.
    var pending: [HTTPClientRequestPart] = []
    var requestEnded = false
    var responseStarted = false
    var responseEnded = false
    /// The response's end went to the client before the request's end arrived (an early backend answer).
    var wroteEnd = false
    var upstreamReused = false
    var upstreamKeepAlive = false
    var closeAfter = false
    var retried = false
    /// When the backend's response head is due (set once the request head went out, cleared when it arrived).
    var responseDeadline: NIODeadline?
    var status = 0
    var bytesIn = 0
    var bytesOut = 0

    /// Set when the policy observes responses: what it is called with.
    var observed: (policy: RoutingPolicy, request: RouteRequest, wantsBody: Bool)?
    var observedHead: HTTPResponseHead?
    var observedBody: ByteBuffer?
    var observedBodyTooLarge = false

    init(
        head: HTTPRequestHead, clientURI: String, backend: Backend, framing: RequestFraming, upgrade: String?,
        started: NIODeadline = .now()
    ) {
        self.head = head
        self.clientURI = clientURI
        self.backend = backend
        self.framing = framing
        self.upgrade = upgrade
        self.started = started
        self.clientKeepAlive = head.isKeepAlive
    }
}

/// The client side of the data path: one per client connection, on that connection's event loop.
///
/// It routes each request head through the `RoutingPolicy`, leases a connection to the chosen backend from this loop's
/// `UpstreamPool`, and streams both bodies with back-pressure: client reads stop while the backend cannot take more,
/// and backend reads stop while the client cannot. On a `101` it turns both connections into a byte tunnel.
///
/// Re-entrancy rule: state is updated *before* any write, because writing a response end lets the pipelining handler
/// deliver the next buffered request synchronously.
final class ProxyHandler: ChannelDuplexHandler, RemovableChannelHandler, UpstreamResponseSink, ResponseDeadlineWatcher {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private enum State {
        case idle
        case proxying(Exchange)
        /// A local answer was written for a bodiless request whose `.end` has not been read yet.
        case answered(keepAlive: Bool)
        /// The policy asked for the body: it is being read (bounded) before routing again.
        case bufferingBody(BufferedRequest)
        /// The key's owner is being asked of a shared store.
        case resolving(PendingForward)
        /// The request went to every backend of a pool; waiting for the answers to merge.
        case fanningOut(FanoutState)
        case tunnel
        case closed
    }

    /// A request whose body is being collected for a second routing pass.
    final class BufferedRequest {
        let head: HTTPRequestHead
        let framing: RequestFraming
        let upgrade: String?
        var request: RouteRequest
        var body: ByteBuffer

        init(head: HTTPRequestHead, framing: RequestFraming, upgrade: String?, request: RouteRequest, body: ByteBuffer) {
            self.head = head
            self.framing = framing
            self.upgrade = upgrade
            self.request = request
            self.body = body
        }
    }

    /// The configuration generation and policy in force; refreshed from the loop state at every request head, so a
    /// reload applies to the next request while the current one finishes under what it started with.
    private var runtime: ProxyRuntime
    private var policy: RoutingPolicy
    /// When the current request's head began to arrive (`RequestHeadTimer.headStartedAt`): its exchange's start.
    private var requestStarted: NIODeadline = .now()
    private let listener: ListenerContext
    private let loop: ProxyServer.LoopState
    private var upstreamPool: UpstreamPool { self.loop.pool }
    private let httpHandlers: DownstreamHTTPHandlers
    private var state: State = .idle
    private var context: ChannelHandlerContext?
    private var readsHeld = false
    private var readPending = false
    private var upstreamNeedsFlush = false
    private var clientIP = ""

    init(listener: ListenerContext, loop: ProxyServer.LoopState, httpHandlers: DownstreamHTTPHandlers) {
        self.listener = listener
        self.loop = loop
        self.runtime = loop.generation.runtime
        self.policy = loop.generation.policy(for: listener.name)
        self.httpHandlers = httpHandlers
    }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.clientIP = context.channel.remoteAddress?.ipAddress ?? "unknown"
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.cancelDeadlineTimer()
        self.context = nil
    }

    /// The client ended its sending side (half-close, see `ReadAheadHandler`): no request can follow the current one,
    /// so the connection closes once its response is written.
    private var clientEnded = false
    /// The current request's `.end` has arrived (or no request has started).
    private var requestComplete = true

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let event = event as? ChannelEvent, event == .inputClosed else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        self.clientEnded = true
        switch self.state {
        case .tunnel, .closed:
            return
        case .idle:
            self.state = .closed
            context.close(promise: nil)
        case .proxying, .answered, .bufferingBody, .resolving, .fanningOut:
            // The pipelining handler delivers every request part that arrived before the end of stream first: a
            // request not complete by now never will be. A complete one gets its response, then the close (every
            // keep-alive decision below includes `clientEnded`).
            if !self.requestComplete {
                context.close(promise: nil)
            }
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = Self.unwrapInboundIn(data)
        switch part {
        case .head: self.requestComplete = false
        case .end: self.requestComplete = true
        case .body: break
        }
        switch part {
        case .head(let head):
            self.receivedHead(head, context: context)
        case .body(var buffer):
            if case .bufferingBody(let pending) = self.state {
                guard pending.body.readableBytes + buffer.readableBytes <= self.runtime.config.limits.maxBufferedBody else {
                    self.state = .closed
                    self.countLocal(.payloadTooLarge)
                    self.writeLocalResponse(
                        status: .payloadTooLarge, body: "payload too large: the routing policy reads the body, which is limited",
                        headers: [], keepAlive: false, context: context)
                    return
                }
                pending.body.writeBuffer(&buffer)
                return
            }
            if case .resolving(let pending) = self.state {
                pending.parts.append(.body(.byteBuffer(buffer)))
                return
            }
            guard case .proxying(let exchange) = self.state, !exchange.responseEnded else { return }
            exchange.bytesIn += buffer.readableBytes
            let part = HTTPClientRequestPart.body(.byteBuffer(buffer))
            if let upstream = exchange.upstream {
                upstream.write(part)
                self.upstreamNeedsFlush = true
            } else {
                exchange.pending.append(part)
            }
        case .end(let trailers):
            self.receivedEnd(trailers, context: context)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if self.upstreamNeedsFlush, case .proxying(let exchange) = self.state, let upstream = exchange.upstream {
            self.upstreamNeedsFlush = false
            upstream.flush()
        }
        context.fireChannelReadComplete()
    }

    func read(context: ChannelHandlerContext) {
        if self.readsHeld {
            self.readPending = true
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if case .proxying(let exchange) = self.state, let upstream = exchange.upstream {
            upstream.holdReads(!context.channel.isWritable)
        }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if case .fanningOut(let fanout) = self.state {
            fanout.executor?.cancel()
        }
        // The deadline timer holds this handler: let it go with the connection.
        self.cancelDeadlineTimer()
        if case .proxying(let exchange) = self.state {
            exchange.responseDeadline = nil
            if let upstream = exchange.upstream {
                exchange.upstream = nil
                upstream.sink = nil
                upstream.channel.close(promise: nil)
            }
            self.release(exchange)
            // 499 as nginx logs it: the client went away before the response was complete.
            self.logAccess(exchange, status: exchange.responseEnded ? exchange.status : 499)
        }
        self.state = .closed
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard let parserError = error as? HTTPParserError else {
            self.runtime.logger.debug("client connection error", metadata: ["error": "\(error)"])
            context.close(promise: nil)
            return
        }
        let status: HTTPResponseStatus = parserError == .headerOverflow ? .requestHeaderFieldsTooLarge : .badRequest
        let reason = status == .badRequest ? "bad request: malformed HTTP" : "request header fields too large"
        switch self.state {
        case .fanningOut(let fanout):
            fanout.executor?.cancel()
            self.state = .closed
            self.writeLocalResponse(status: status, body: reason, headers: [], keepAlive: false, context: context)
            self.countLocal(status)
        case .idle, .answered, .bufferingBody, .resolving:
            self.state = .closed
            self.writeLocalResponse(status: status, body: reason, headers: [], keepAlive: false, context: context)
            self.countLocal(status)
        case .proxying(let exchange) where !exchange.responseStarted:
            self.abandonUpstream(exchange)
            self.state = .closed
            self.writeLocalResponse(status: status, body: reason, headers: [], keepAlive: false, context: context)
            self.logAccess(exchange, status: Int(status.code))
        case .proxying, .tunnel, .closed:
            context.close(promise: nil)
        }
    }

    // MARK: Request path

    private func receivedHead(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        guard case .idle = self.state else {
            // The pipelining handler delivers one request at a time, so this is a broken invariant: fail closed.
            context.close(promise: nil)
            return
        }
        self.requestStarted = self.httpHandlers.headTimer.headStartedAt ?? .now()
        self.httpHandlers.headTimer.handle(.headReceived)
        let generation = self.loop.generation
        self.runtime = generation.runtime
        self.policy = generation.policy(for: self.listener.name)

        let framing: RequestFraming
        do {
            framing = try RequestValidator.framing(of: head)
            try RequestValidator.validateHost(of: head)
        } catch {
            self.state = .closed
            self.writeLocalResponse(status: .badRequest, body: error.reason, headers: [], keepAlive: false, context: context)
            self.countLocal(.badRequest)
            return
        }
        let upgrade = RequestValidator.upgradeProtocol(of: head)
        self.decide(self.routeRequest(for: head, isUpgrade: upgrade != nil), head: head, framing: framing,
                    upgrade: upgrade, bufferedBody: nil, context: context)
    }

    /// Asks the policy and acts on its decision. `bufferedBody` is set on the second pass of a `needBody` decision,
    /// when the client's request has been read completely.
    private func decide(
        _ request: RouteRequest,
        head: HTTPRequestHead,
        framing: RequestFraming,
        upgrade: String?,
        bufferedBody: ByteBuffer?,
        context: ChannelHandlerContext
    ) {
        let requestEnded = bufferedBody != nil
        var decision: RouteDecision
        do {
            decision = try self.policy.route(request)
        } catch {
            self.runtime.logger.error(
                "routing policy failed",
                metadata: ["error": "\(error)", "method": "\(head.method.rawValue)", "uri": "\(head.uri)"])
            self.runtime.metrics.countRoutingError()
            guard let fallback = self.listenerFallbackPool else {
                self.answerLocally(head: head, framing: framing, requestEnded: requestEnded,
                                   status: .internalServerError, body: "routing error", context: context)
                return
            }
            decision = .pool(fallback)
        }

        switch decision.action {
        case .respond(let response):
            self.answerLocally(
                head: head, framing: framing, requestEnded: requestEnded, status: response.status, body: response.body,
                headers: response.headers.map { ($0.name, $0.value) }, bodyAsGiven: true, context: context)
        case .needBody:
            if bufferedBody != nil {
                self.runtime.logger.error("routing policy asked for the body again after receiving it", metadata: ["uri": "\(head.uri)"])
                self.answerLocally(head: head, framing: framing, requestEnded: true, status: .internalServerError,
                                   body: "routing error", context: context)
            } else if framing == .none {
                var again = request
                again.body = context.channel.allocator.buffer(capacity: 0)
                self.decide(again, head: head, framing: framing, upgrade: upgrade, bufferedBody: again.body, context: context)
            } else {
                if case .contentLength(let length) = framing, length > self.runtime.config.limits.maxBufferedBody {
                    self.state = .closed
                    self.countLocal(.payloadTooLarge)
                    self.writeLocalResponse(
                        status: .payloadTooLarge, body: "payload too large: the routing policy reads the body, which is limited",
                        headers: [], keepAlive: false, context: context)
                    return
                }
                self.state = .bufferingBody(
                    BufferedRequest(head: head, framing: framing, upgrade: upgrade, request: request,
                                    body: context.channel.allocator.buffer(capacity: 0)))
            }
        case .fanout(let fanout):
            self.startFanout(fanout, decision: decision, request: request, head: head, framing: framing,
                             requestEnded: requestEnded, context: context)
        case .forward(let target):
            let pending = PendingForward(
                head: head, framing: framing, upgrade: upgrade, request: request, decision: decision,
                bufferedBody: bufferedBody)
            switch self.runtime.resolve(target, on: context.eventLoop) {
            case .backend(let backend):
                self.startExchange(pending, backend: backend, ownership: nil, context: context)
            case .owned(let backend, let ownership):
                self.startExchange(pending, backend: backend, ownership: ownership, context: context)
            case .pending(let future):
                // Only a shared store answers later; hold the client (and keep what it already sent) meanwhile.
                self.state = .resolving(pending)
                self.readsHeld = true
                future.assumeIsolated().whenComplete { [self] result in
                    guard case .resolving(let current) = self.state, current === pending, let context = self.context else { return }
                    if case .success(let ownership?) = result, let backend = self.runtime.table.backends[ownership.backend] {
                        self.startExchange(pending, backend: backend, ownership: ownership, context: context)
                    } else {
                        self.answerLocally(head: head, framing: framing, requestEnded: pending.requestEnded,
                                           status: .serviceUnavailable, body: "no backend available", context: context)
                    }
                }
            case .noBackend:
                self.answerLocally(head: head, framing: framing, requestEnded: requestEnded,
                                   status: .serviceUnavailable, body: "no backend available", context: context)
            case .unknownPool(let name):
                self.refuseMalformed("routing decision names an unknown pool", ["pool": "\(name)"], pending, context)
            case .unknownBackend(let id):
                self.refuseMalformed("routing decision names an unknown backend", ["backend": "\(id)"], pending, context)
            case .unknownPlacement(let name):
                self.refuseMalformed("routing decision names an unknown placement strategy", ["place": "\(name)"], pending, context)
            }
        }
    }

    /// A fan-out in progress for the current request.
    final class FanoutState {
        var requestEnded: Bool
        var executor: FanoutExecutor?

        init(requestEnded: Bool) {
            self.requestEnded = requestEnded
        }
    }

    private func startFanout(
        _ fanout: Fanout, decision: RouteDecision, request: RouteRequest, head: HTTPRequestHead, framing: RequestFraming,
        requestEnded: Bool, context: ChannelHandlerContext
    ) {
        guard let pool = self.runtime.table.pools[fanout.pool] else {
            self.runtime.logger.error("fan-out names an unknown pool", metadata: ["pool": "\(fanout.pool)"])
            self.runtime.metrics.countRoutingError()
            self.answerLocally(head: head, framing: framing, requestEnded: requestEnded, status: .internalServerError,
                               body: "routing error", context: context)
            return
        }
        guard framing == .none || requestEnded else {
            // A fan-out repeats the request to every backend: only a request without a body can be repeated as is.
            self.runtime.logger.error("fan-out of a request with a body is not supported", metadata: ["uri": "\(head.uri)"])
            self.runtime.metrics.countRoutingError()
            self.answerLocally(head: head, framing: framing, requestEnded: requestEnded, status: .internalServerError,
                               body: "routing error", context: context)
            return
        }
        let upstreamHead = ForwardingHeaders.upstreamRequestHead(
            from: Self.rewrite(head, with: decision), framing: .none, upgrade: nil, clientIP: self.clientIP,
            scheme: self.listener.scheme)
        let state = FanoutState(requestEnded: requestEnded)
        self.state = .fanningOut(state)
        let executor = FanoutExecutor(
            head: upstreamHead, backends: pool.backends.filter { $0.canServeExistingKeys }, pool: self.upstreamPool,
            timeout: fanout.timeout, maxBody: self.runtime.config.limits.maxBufferedBody, logger: self.runtime.logger)
        state.executor = executor
        let policy = self.policy
        executor.run { [self] responses in
            guard case .fanningOut(let current) = self.state, current === state, let context = self.context else { return }
            var merged: LocalResponse
            if fanout.merge == Fanout.jsonArrayMerge {
                merged = FanoutMerge.jsonArray(responses, logger: self.runtime.logger)
            } else {
                do {
                    merged = try policy.mergeFanout(request, function: fanout.merge, responses: responses)
                } catch {
                    self.runtime.logger.error("fan-out merge failed", metadata: ["error": "\(error)", "uri": "\(head.uri)"])
                    self.runtime.metrics.countRoutingError()
                    merged = LocalResponse(status: .internalServerError, body: "routing error")
                }
            }
            self.answerLocally(
                head: head, framing: framing, requestEnded: state.requestEnded, status: merged.status, body: merged.body,
                headers: merged.headers.map { ($0.name, $0.value) }, bodyAsGiven: true, context: context)
        }
    }

    /// A forwarding decision waiting for its backend (normally only for the time of a dictionary lookup).
    final class PendingForward {
        let head: HTTPRequestHead
        let framing: RequestFraming
        let upgrade: String?
        let request: RouteRequest
        let decision: RouteDecision
        let bufferedBody: ByteBuffer?
        /// Parts the client sent while a shared ownership store was being asked.
        var parts: [HTTPClientRequestPart] = []
        var requestEnded: Bool

        init(head: HTTPRequestHead, framing: RequestFraming, upgrade: String?, request: RouteRequest,
             decision: RouteDecision, bufferedBody: ByteBuffer?) {
            self.head = head
            self.framing = framing
            self.upgrade = upgrade
            self.request = request
            self.decision = decision
            self.bufferedBody = bufferedBody
            self.requestEnded = bufferedBody != nil
        }
    }

    private func refuseMalformed(
        _ message: String, _ metadata: Logger.Metadata, _ pending: PendingForward, _ context: ChannelHandlerContext
    ) {
        self.runtime.logger.error("\(message)", metadata: metadata)
        self.runtime.metrics.countRoutingError()
        self.answerLocally(head: pending.head, framing: pending.framing, requestEnded: pending.requestEnded,
                           status: .internalServerError, body: "routing error", context: context)
    }

    private func startExchange(
        _ pending: PendingForward, backend: Backend, ownership: Ownership?, context: ChannelHandlerContext
    ) {
        let forwardedHead = Self.forwardedHead(pending.head, decision: pending.decision, ownership: ownership, runtime: self.runtime)
        let bodyFraming: RequestFraming = pending.bufferedBody.map { .contentLength($0.readableBytes) } ?? pending.framing
        let exchange = Exchange(
            head: forwardedHead, clientURI: pending.head.uri, backend: backend, framing: bodyFraming, upgrade: pending.upgrade,
            started: self.requestStarted)
        exchange.key = ownership?.key
        if let bufferedBody = pending.bufferedBody {
            exchange.requestEnded = true
            if bufferedBody.readableBytes > 0 {
                exchange.pending.append(.body(.byteBuffer(bufferedBody)))
                exchange.bytesIn = bufferedBody.readableBytes
            }
            exchange.pending.append(.end(nil))
        } else {
            exchange.pending = pending.parts
            exchange.requestEnded = pending.requestEnded
        }
        if self.policy.observesResponses {
            exchange.observed = (self.policy, pending.request, pending.decision.responseBody)
        }
        backend.acquire()
        if let key = exchange.key { self.runtime.directory.acquireLease(key: key) }
        self.state = .proxying(exchange)
        self.readsHeld = true
        // An upgrade gets a fresh connection: servers such as SwiftNIO's upgrader only switch protocols on the
        // first request of a connection (and the tunnel consumes the connection anyway).
        self.connectUpstream(exchange, allowPooled: pending.upgrade == nil)
    }

    /// Gives back what an exchange held: its backend's connection slot and its key's lease.
    private func release(_ exchange: Exchange) {
        exchange.backend.release()
        if let key = exchange.key { self.runtime.directory.releaseLease(key: key) }
    }

    private var listenerFallbackPool: String? {
        self.runtime.config.listeners.first { $0.name == self.listener.name }?.routing?.fallbackPool
    }

    /// The request head as it goes to the backend before the hop-by-hop and `X-Forwarded-*` treatment: the decision's
    /// rewrites, and the pool's key and epoch headers for an owned key. Shared with the fast path.
    static func forwardedHead(
        _ head: HTTPRequestHead, decision: RouteDecision, ownership: Ownership?, runtime: ProxyRuntime
    ) -> HTTPRequestHead {
        Self.adding(Self.ownershipFields(ownership, runtime: runtime), to: Self.rewrite(head, with: decision))
    }

    /// `head` with `fields` set (replace-or-add), as the ownership fields are.
    static func adding(_ fields: [(name: String, value: String)], to head: HTTPRequestHead) -> HTTPRequestHead {
        var head = head
        for field in fields {
            head.headers.replaceOrAdd(name: field.name, value: field.value)
        }
        return head
    }

    /// The pool's key and epoch fields for an owned key (`key_header`, `epoch_header`), set with replace-or-add.
    static func ownershipFields(_ ownership: Ownership?, runtime: ProxyRuntime) -> [(name: String, value: String)] {
        guard let ownership, let pool = runtime.pools[ownership.pool] else { return [] }
        var fields: [(name: String, value: String)] = []
        if let name = pool.config.keyHeader { fields.append((name, ownership.key)) }
        if let name = pool.config.epochHeader { fields.append((name, String(ownership.epoch))) }
        return fields
    }

    /// Applies a decision's path and header rewrites. Framing fields are the proxy's to decide and are left alone.
    static func rewrite(_ head: HTTPRequestHead, with decision: RouteDecision) -> HTTPRequestHead {
        guard decision.path != nil || !decision.setHeaders.isEmpty || !decision.removeHeaders.isEmpty else { return head }
        var head = head
        let protected: Set<String> = ["content-length", "transfer-encoding", "connection", "upgrade"]
        for name in decision.removeHeaders where !protected.contains(name.lowercased()) {
            head.headers.remove(name: name)
        }
        for header in decision.setHeaders where !protected.contains(header.name.lowercased()) {
            head.headers.replaceOrAdd(name: header.name, value: header.value)
        }
        if let path = decision.path {
            if let mark = head.uri.firstIndex(of: "?") {
                head.uri = path + head.uri[mark...]
            } else {
                head.uri = path
            }
        }
        return head
    }

    private func receivedEnd(_ trailers: HTTPHeaders?, context: ChannelHandlerContext) {
        switch self.state {
        case .proxying(let exchange):
            exchange.requestEnded = true
            if exchange.responseEnded {
                // The backend answered before the body was complete; the rest of it was discarded.
                self.finish(exchange, trailers: nil, context: context)
            } else if let upstream = exchange.upstream {
                upstream.write(.end(trailers))
                upstream.flush()
                self.upstreamNeedsFlush = false
            } else {
                exchange.pending.append(.end(trailers))
            }
        case .resolving(let pending):
            pending.parts.append(.end(trailers))
            pending.requestEnded = true
        case .fanningOut(let fanout):
            fanout.requestEnded = true
        case .bufferingBody(let pending):
            var request = pending.request
            request.body = pending.body
            self.decide(request, head: pending.head, framing: pending.framing, upgrade: pending.upgrade,
                        bufferedBody: pending.body, context: context)
        case .answered(let keepAlive):
            if keepAlive {
                self.state = .idle
                self.httpHandlers.headTimer.handle(.awaitingHead)
            } else {
                self.state = .closed
            }
        case .idle, .tunnel, .closed:
            break
        }
    }

    private func routeRequest(for head: HTTPRequestHead, isUpgrade: Bool) -> RouteRequest {
        Self.routeRequest(for: head, isUpgrade: isUpgrade, listener: self.listener, clientIP: self.clientIP)
    }

    /// What the policy is asked about a request head. Shared with the fast path.
    static func routeRequest(for head: HTTPRequestHead, isUpgrade: Bool, listener: ListenerContext, clientIP: String) -> RouteRequest {
        RouteRequest(head: head, isUpgrade: isUpgrade, scheme: listener.scheme, clientIP: clientIP, listener: listener.name)
    }

    // MARK: Upstream

    private func connectUpstream(_ exchange: Exchange, allowPooled: Bool) {
        self.upstreamPool.lease(exchange.backend, allowPooled: allowPooled) { [self] result in
            guard case .proxying(let current) = self.state, current === exchange else {
                if case .success(let connection) = result { self.upstreamPool.release(connection) }
                return
            }
            switch result {
            case .success(let connection):
                self.attach(connection, to: exchange)
            case .failure(let error):
                let answer = error.recordAndAnswer(backend: exchange.backend, runtime: self.runtime)
                self.fail(exchange, status: answer.status, reason: answer.reason)
            }
        }
    }

    private func attach(_ connection: UpstreamConnection, to exchange: Exchange) {
        guard let context = self.context else { return }
        exchange.upstream = connection
        exchange.upstreamReused = connection.hasBeenUsed
        connection.hasBeenUsed = true
        connection.sink = self

        let head = ForwardingHeaders.upstreamRequestHead(
            from: exchange.head,
            framing: exchange.framing,
            upgrade: exchange.upgrade,
            clientIP: self.clientIP,
            scheme: self.listener.scheme
        )
        connection.write(.head(head))
        if exchange.retried && exchange.requestEnded {
            connection.write(.end(nil))
        }
        for part in exchange.pending {
            connection.write(part)
        }
        exchange.pending.removeAll()
        connection.flush()

        self.armResponseDeadline(exchange, context: context)
        self.setReadsHeld(!connection.channel.isWritable, context: context)
        connection.holdReads(!context.channel.isWritable)
    }

    /// The response-head deadline timer (`ResponseDeadlineWatcher`).
    var deadlineTimer = LazyDeadlineTimer()

    var pendingResponseDeadline: NIODeadline? {
        guard case .proxying(let exchange) = self.state, self.context != nil else { return nil }
        return exchange.responseDeadline
    }

    func responseDeadlinePassed() {
        guard case .proxying(let exchange) = self.state else { return }
        self.responseHeadTimedOut(exchange)
    }

    private func armResponseDeadline(_ exchange: Exchange, context: ChannelHandlerContext) {
        let deadline = NIODeadline.now() + self.runtime.config.timeouts.upstreamResponseHeader
        exchange.responseDeadline = deadline
        self.watchResponseDeadline(deadline, on: context.eventLoop)
    }

    private func responseHeadTimedOut(_ exchange: Exchange) {
        guard case .proxying(let current) = self.state, current === exchange, !exchange.responseStarted else { return }
        self.runtime.metrics.countUpstreamError(.responseTimeout)
        self.abandonUpstream(exchange)
        self.fail(exchange, status: .gatewayTimeout, reason: "gateway timeout: backend did not answer in time")
    }

    func upstreamReceived(_ part: HTTPClientResponsePart) {
        guard case .proxying(let exchange) = self.state, let context = self.context else { return }
        switch part {
        case .head(let head):
            self.receivedResponseHead(head, exchange: exchange, context: context)
        case .body(let buffer):
            guard exchange.responseStarted, !exchange.responseEnded else { return }
            exchange.bytesOut += buffer.readableBytes
            if exchange.observedBody != nil && !exchange.observedBodyTooLarge {
                if exchange.observedBody!.readableBytes + buffer.readableBytes <= self.runtime.config.limits.maxBufferedBody {
                    var copy = buffer
                    exchange.observedBody!.writeBuffer(&copy)
                } else {
                    // Too large to hand to the policy: it sees the head only (documented).
                    exchange.observedBodyTooLarge = true
                    exchange.observedBody = nil
                }
            }
            context.write(Self.wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        case .end(let trailers):
            guard exchange.responseStarted, !exchange.responseEnded else { return }
            self.receivedResponseEnd(trailers, exchange: exchange, context: context)
        }
    }

    private func receivedResponseHead(_ head: HTTPResponseHead, exchange: Exchange, context: ChannelHandlerContext) {
        if head.status.code < 200 && head.status != .switchingProtocols {
            // Interim answers (100 Continue, 103 Early Hints) go to HTTP/1.1 clients as they are.
            if exchange.head.version.minor >= 1 && !exchange.responseStarted {
                var interim = HTTPResponseHead(version: .http1_1, status: head.status, headers: head.headers)
                ForwardingHeaders.stripHopByHop(&interim.headers)
                context.writeAndFlush(Self.wrapOutboundOut(.head(interim)), promise: nil)
            }
            return
        }
        guard !exchange.responseStarted else { return }
        exchange.responseDeadline = nil
        exchange.status = Int(head.status.code)
        exchange.backend.recordResponse(status: exchange.status)
        exchange.upstreamKeepAlive = head.isKeepAlive

        if head.status == .switchingProtocols {
            guard exchange.upgrade != nil else {
                self.runtime.logger.warning("backend switched protocols without being asked", metadata: ["backend": "\(exchange.backend.id)"])
                self.abandonUpstream(exchange)
                self.fail(exchange, status: .badGateway, reason: "bad gateway: invalid response from backend")
                return
            }
            self.startTunnel(exchange, responseHead: head, context: context)
            return
        }
        // After an upgrade request the client-side parser has stopped: this connection cannot carry another request.
        if exchange.upgrade != nil { exchange.closeAfter = true }
        let (responseHead, closeAfter) = ForwardingHeaders.downstreamResponseHead(
            from: head,
            requestMethod: exchange.head.method,
            keepAlive: exchange.clientKeepAlive && !exchange.closeAfter,
            clientVersion: exchange.head.version
        )
        exchange.closeAfter = exchange.closeAfter || closeAfter
        exchange.responseStarted = true
        if let observed = exchange.observed {
            if observed.wantsBody {
                exchange.observedHead = head
                exchange.observedBody = context.channel.allocator.buffer(capacity: 0)
            } else {
                self.observeResponse(exchange, head: head, body: nil)
            }
        }
        context.write(Self.wrapOutboundOut(.head(responseHead)), promise: nil)
    }

    /// Lets the policy see a response; a claim takes effect before the client has the complete response, so the
    /// client's next request for that key already finds its owner.
    private func observeResponse(_ exchange: Exchange, head: HTTPResponseHead, body: ByteBuffer?) {
        guard let observed = exchange.observed else { return }
        Self.observeResponse(
            policy: observed.policy, request: observed.request, head: head, body: body, exchange: exchange, runtime: self.runtime)
    }

    /// Hands a response to the policy's `onResponse` and applies a claim. Shared with the fast path.
    static func observeResponse(
        policy: RoutingPolicy, request: RouteRequest, head: HTTPResponseHead, body: ByteBuffer?, exchange: Exchange,
        runtime: ProxyRuntime
    ) {
        let response = RouteResponse(status: Int(head.status.code), headers: head.headers, body: body, backend: exchange.backend.id)
        do {
            switch try policy.onResponse(request, response) {
            case .claim(let key):
                let pool = runtime.table.pools.values.first { $0.backends.contains { $0 === exchange.backend } }
                let ttl = pool.flatMap { runtime.poolConfig(named: $0.name) }?.idleTTL ?? PoolConfig(name: "").idleTTL
                runtime.directory.claim(key: key, pool: pool?.name ?? "", backend: exchange.backend.id, idleTTL: ttl)
                runtime.logger.debug("key claimed from a response", metadata: ["key": "\(key)", "backend": "\(exchange.backend.id)"])
            case nil:
                break
            }
        } catch {
            runtime.metrics.countRoutingError()
            runtime.logger.error("routing policy failed in on_response", metadata: ["error": "\(error)", "uri": "\(exchange.clientURI)"])
        }
    }

    private func receivedResponseEnd(_ trailers: HTTPHeaders?, exchange: Exchange, context: ChannelHandlerContext) {
        exchange.responseEnded = true
        if let head = exchange.observedHead {
            exchange.observedHead = nil
            self.observeResponse(exchange, head: head, body: exchange.observedBody)
            exchange.observedBody = nil
        }
        if let upstream = exchange.upstream {
            exchange.upstream = nil
            // A refused upgrade request leaves the backend's parser stopped (it saw `Connection: upgrade`), so that
            // connection cannot carry another request.
            if exchange.requestEnded && exchange.upstreamKeepAlive && exchange.upgrade == nil {
                self.upstreamPool.release(upstream)
            } else {
                // The backend answered before the request body was complete (or refused an upgrade): the connection's
                // state is unknown.
                upstream.sink = nil
                upstream.channel.close(promise: nil)
            }
        }
        if exchange.requestEnded {
            self.finish(exchange, trailers: trailers, context: context)
        } else {
            // Keep reading (and discarding) the rest of the request body, so the client sees its response rather than
            // a reset; the exchange finishes at the request's end.
            self.setReadsHeld(false, context: context)
            exchange.wroteEnd = true
            context.writeAndFlush(Self.wrapOutboundOut(.end(trailers)), promise: nil)
        }
    }

    func upstreamReadComplete() {
        self.context?.flush()
    }

    func upstreamWritabilityChanged(isWritable: Bool) {
        guard case .proxying = self.state, let context = self.context else { return }
        self.setReadsHeld(!isWritable, context: context)
    }

    func upstreamClosed(error: Error?) {
        guard case .proxying(let exchange) = self.state, let context = self.context, !exchange.responseEnded else { return }
        exchange.upstream = nil
        exchange.responseDeadline = nil
        if !exchange.responseStarted {
            // A reused keep-alive connection may have been closed by the backend just as we sent on it; a request
            // with no body can safely be sent again on a fresh connection (what HAProxy's `retry-on` does).
            if exchange.upstreamReused && exchange.framing == .none && exchange.upgrade == nil && !exchange.retried {
                exchange.retried = true
                self.connectUpstream(exchange, allowPooled: false)
                return
            }
            self.runtime.metrics.countUpstreamError(.closedEarly)
            self.runtime.logger.warning(
                "backend closed the connection before responding",
                metadata: ["backend": "\(exchange.backend.id)", "error": "\(error.map { "\($0)" } ?? "eof")"])
            self.fail(exchange, status: .badGateway, reason: "bad gateway: backend closed the connection")
            return
        }
        // Part of the response is already with the client: closing is the only honest signal that it is truncated.
        self.runtime.metrics.countUpstreamError(.resetMidResponse)
        self.runtime.logger.warning(
            "backend closed the connection mid-response", metadata: ["backend": "\(exchange.backend.id)"])
        self.release(exchange)
        self.logAccess(exchange, status: exchange.status)
        self.state = .closed
        context.close(promise: nil)
    }

    // MARK: Completion

    private func finish(_ exchange: Exchange, trailers: HTTPHeaders?, context: ChannelHandlerContext) {
        self.release(exchange)
        self.logAccess(exchange, status: exchange.status)
        let keepAlive = exchange.clientKeepAlive && !exchange.closeAfter && !self.clientEnded
        self.state = keepAlive ? .idle : .closed
        self.setReadsHeld(false, context: context)
        if keepAlive {
            self.httpHandlers.headTimer.handle(.awaitingHead)
        }
        if exchange.wroteEnd {
            if !keepAlive { context.close(promise: nil) }
            return
        }
        exchange.wroteEnd = true
        let written = context.writeAndFlush(Self.wrapOutboundOut(.end(trailers)))
        if !keepAlive {
            written.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        }
    }

    /// Fails an exchange that has not started its response: answers locally and releases what it held.
    private func fail(_ exchange: Exchange, status: HTTPResponseStatus, reason: String) {
        guard let context = self.context else { return }
        exchange.responseDeadline = nil
        self.release(exchange)
        exchange.status = Int(status.code)
        self.logAccess(exchange, status: Int(status.code))
        // The request body may be half read; only a bodiless request leaves the connection in a known state.
        let keepAlive = exchange.clientKeepAlive && exchange.upgrade == nil && !self.clientEnded
            && (exchange.requestEnded || exchange.framing == .none)
        if keepAlive && !exchange.requestEnded {
            self.state = .answered(keepAlive: true)
        } else {
            self.state = keepAlive ? .idle : .closed
        }
        self.setReadsHeld(false, context: context)
        if case .idle = self.state {
            self.httpHandlers.headTimer.handle(.awaitingHead)
        }
        self.writeLocalResponse(status: status, body: reason, headers: [], keepAlive: keepAlive, context: context)
    }

    private func abandonUpstream(_ exchange: Exchange) {
        exchange.responseDeadline = nil
        if let upstream = exchange.upstream {
            exchange.upstream = nil
            upstream.sink = nil
            upstream.channel.close(promise: nil)
        }
    }

    /// Answers a request without a backend (a routing decision, or no backend to send it to).
    private func answerLocally(
        head: HTTPRequestHead,
        framing: RequestFraming,
        requestEnded: Bool,
        status: HTTPResponseStatus,
        body: String,
        headers: [(String, String)] = [],
        bodyAsGiven: Bool = false,
        context: ChannelHandlerContext
    ) {
        let keepAlive = head.isKeepAlive && (framing == .none || requestEnded) && !self.clientEnded
            && RequestValidator.upgradeProtocol(of: head) == nil
        if requestEnded {
            self.state = keepAlive ? .idle : .closed
            if keepAlive {
                self.httpHandlers.headTimer.handle(.awaitingHead)
            }
        } else {
            self.state = .answered(keepAlive: keepAlive)
        }
        self.countLocal(status)
        self.logLocal(head: head, status: status)
        self.writeLocalResponse(
            status: status, body: body, headers: headers, keepAlive: keepAlive, bodyAsGiven: bodyAsGiven, context: context)
    }

    /// - Parameter bodyAsGiven: send `body` byte for byte (a policy's `respond`); the proxy's own messages get a
    ///   final newline.
    private func writeLocalResponse(
        status: HTTPResponseStatus,
        body: String,
        headers extra: [(String, String)],
        keepAlive: Bool,
        bodyAsGiven: Bool = false,
        context: ChannelHandlerContext
    ) {
        let text = bodyAsGiven || body.hasSuffix("\n") || body.isEmpty ? body : body + "\n"
        var headers = HTTPHeaders(extra)
        if !headers.contains(name: "content-type") {
            headers.add(name: "content-type", value: "text/plain; charset=utf-8")
        }
        headers.replaceOrAdd(name: "content-length", value: String(text.utf8.count))
        headers.add(name: "connection", value: keepAlive ? "keep-alive" : "close")
        context.write(Self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        if !text.isEmpty {
            context.write(Self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: text)))), promise: nil)
        }
        let written = context.writeAndFlush(Self.wrapOutboundOut(.end(nil)))
        if !keepAlive {
            self.state = .closed
            written.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        }
    }

    private func setReadsHeld(_ held: Bool, context: ChannelHandlerContext) {
        self.readsHeld = held
        if !held && self.readPending {
            self.readPending = false
            context.read()
        }
    }

    // MARK: Tunnel

    private func startTunnel(_ exchange: Exchange, responseHead: HTTPResponseHead, context: ChannelHandlerContext) {
        guard let upstream = exchange.upstream else { return }
        exchange.upstream = nil
        exchange.responseStarted = true
        exchange.responseEnded = true
        self.state = .tunnel
        let (head, _) = ForwardingHeaders.downstreamResponseHead(
            from: responseHead, requestMethod: exchange.head.method, keepAlive: true, clientVersion: exchange.head.version)
        context.writeAndFlush(Self.wrapOutboundOut(.head(head)), promise: nil)
        self.runtime.metrics.tunnelsOpen.increment()
        // The decoders are still inside their decode loops (the 101's `.end` follows synchronously); rebuild the
        // pipelines once they have returned. Bytes that arrive meanwhile stay buffered in the stopped decoders.
        context.eventLoop.assumeIsolated().execute {
            self.spliceTunnel(exchange, upstream: upstream, context: context)
        }
    }

    private func spliceTunnel(_ exchange: Exchange, upstream: UpstreamConnection, context: ChannelHandlerContext) {
        let runtime = self.runtime
        // The tunnel keeps only what its access-log line needs, not the exchange with its request head: an idle
        // WebSocket should cost the proxy as little memory as possible.
        let tunnel = TunnelHandler(
            webSocket: exchange.upgrade?.lowercased() == "websocket",
            record: TunnelHandler.Record(
                runtime: runtime, idleSweeper: self.loop.tunnelIdle, listener: self.listener, clientIP: self.clientIP, method: exchange.head.method,
                clientURI: exchange.clientURI, backend: exchange.backend, key: exchange.key, started: exchange.started,
                bytesIn: exchange.bytesIn, bytesOut: exchange.bytesOut))
        // Registered so an owner change, a forced re-placement or a migration can close exactly this tunnel.
        let loop = context.eventLoop
        let bound = NIOLoopBound(tunnel, eventLoop: loop)
        tunnel.registryToken = runtime.tunnels.register(key: exchange.key, backend: exchange.backend.id) { code in
            loop.execute { bound.value.close(code: code) }
        }
        self.loop.tunnelIdle.add(tunnel, timeout: runtime.config.timeouts.tunnelIdle)
        // A function, not a closure capturing the tunnel's state: that would be one more allocation per tunnel.
        tunnel.onClose = ProxyHandler.tunnelClosed
        do {
            let downstream = context.pipeline.syncOperations
            // A tunnel closes when the client ends its side, as NIO does without half-closure (which the HTTP phase
            // enabled for `ReadAheadHandler`). NIO reads this option when the end of stream arrives.
            try context.channel.syncOptions?.setOption(.allowRemoteHalfClosure, value: false)
            // The client side first: the tunnel tells its sides apart by the order they are added in.
            try downstream.addHandler(tunnel)
            let upstreamPipeline = upstream.channel.pipeline.syncOperations
            try upstreamPipeline.addHandler(tunnel)
            // Removing the decoders last forwards any bytes that arrived right behind the heads (a first WebSocket
            // frame) to the tunnel handlers, in order. That delivery comes with no `channelReadComplete`, so the
            // tunnel would never flush those bytes: flush the partner once each decoder is gone.
            upstream.sink = nil
            let clientChannel = context.channel
            let upstreamChannel = upstream.channel
            upstreamPipeline.removeHandler(upstream.handler, promise: nil)
            upstreamPipeline.removeHandler(upstream.tap, promise: nil)
            // (Installed: this exchange set the connection's sink.)
            assert(upstream.codecInstalled)
            upstreamPipeline.removeHandler(upstream.encoder, promise: nil)
            let upstreamDecoderRemoved = upstreamPipeline.removeHandler(upstream.decoder)
            upstreamDecoderRemoved.whenComplete { _ in clientChannel.flush() }
            downstream.removeHandler(self.httpHandlers.headTimer, promise: nil)
            if let fastPath = self.httpHandlers.fastPath {
                downstream.removeHandler(fastPath, promise: nil)
            }
            downstream.removeHandler(self.httpHandlers.readAhead, promise: nil)
            downstream.removeHandler(self.httpHandlers.pipelining, promise: nil)
            downstream.removeHandler(self.httpHandlers.encoder, promise: nil)
            downstream.removeHandler(context: context, promise: nil)
            let downstreamDecoderRemoved = downstream.removeHandler(self.httpHandlers.decoder)
            downstreamDecoderRemoved.whenComplete { _ in upstreamChannel.flush() }
            if self.clientEnded {
                // The client ended its side while the upgrade was answered: nothing will come from it.
                context.close(promise: nil)
            } else if let relay = self.loop.relay, self.listener.scheme == "http" {
                // Once both pipelines are bare, the relay threads take the tunnel over (`TunnelRelay`); a TLS
                // listener's tunnel stays here, where its encryption is.
                upstreamDecoderRemoved.and(downstreamDecoderRemoved).assumeIsolated().whenComplete { _ in
                    tunnel.handOff(to: relay)
                }
            }
        } catch {
            self.runtime.logger.error("could not set up tunnel", metadata: ["error": "\(error)"])
            tunnel.reportClosed(.error)
            upstream.channel.close(promise: nil)
            context.close(promise: nil)
        }
    }

    /// A tunnel's first side closed: its registration, lease and metrics end, and its access-log line is written.
    private static func tunnelClosed(_ tunnel: TunnelHandler) {
        let record = tunnel.record
        let runtime = record.runtime
        record.idleSweeper.remove(tunnel)
        if let token = tunnel.registryToken { runtime.tunnels.unregister(token) }
        record.backend.release()
        if let key = record.key { runtime.directory.releaseLease(key: key) }
        runtime.metrics.tunnelsOpen.decrement()
        runtime.metrics.countRequest(listener: record.listener.name, status: 101)
        ProxyHandler.logAccess(
            runtime: runtime, listener: record.listener, clientIP: record.clientIP, method: record.method,
            clientURI: record.clientURI, backend: record.backend.id, bytesIn: record.bytesIn + tunnel.bytesFromClient,
            bytesOut: record.bytesOut + tunnel.bytesFromBackend, started: record.started, status: 101,
            end: tunnel.end ?? .error)
    }

    // MARK: Logging and metrics

    private func countLocal(_ status: HTTPResponseStatus) {
        self.runtime.metrics.countRequest(listener: self.listener.name, status: Int(status.code))
    }

    private func logLocal(head: HTTPRequestHead, status: HTTPResponseStatus) {
        guard self.runtime.accessLog else { return }
        self.runtime.accessLogger.info(
            "request",
            metadata: [
                "listener": "\(self.listener.name)",
                "client": "\(self.clientIP)",
                "method": "\(head.method.rawValue)",
                "path": "\(head.uri)",
                "status": "\(status.code)",
                "backend": "-",
                "bytes_in": "0",
                "bytes_out": "0",
                "duration_ms": "0",
            ]
        )
    }

    private func logAccess(_ exchange: Exchange, status: Int) {
        self.runtime.metrics.countRequest(listener: self.listener.name, status: status)
        self.runtime.metrics.requestDuration.recordNanoseconds((NIODeadline.now() - exchange.started).nanoseconds)
        Self.logAccess(runtime: self.runtime, listener: self.listener, clientIP: self.clientIP, exchange: exchange, status: status)
    }

    static func logAccess(
        runtime: ProxyRuntime, listener: ListenerContext, clientIP: String, exchange: Exchange, status: Int
    ) {
        // Before the arguments are gathered: with the access log off (the default) this is all a request pays.
        guard runtime.accessLog else { return }
        Self.logAccess(
            runtime: runtime, listener: listener, clientIP: clientIP, method: exchange.head.method,
            clientURI: exchange.clientURI, backend: exchange.backend.id, bytesIn: exchange.bytesIn,
            bytesOut: exchange.bytesOut, started: exchange.started, status: status)
    }

    private static func logAccess(
        runtime: ProxyRuntime, listener: ListenerContext, clientIP: String, method: HTTPMethod, clientURI: String,
        backend: String, bytesIn: Int, bytesOut: Int, started: NIODeadline, status: Int, end: TunnelEnd? = nil
    ) {
        guard runtime.accessLog else { return }
        let elapsed = NIODeadline.now() - started
        var metadata: Logger.Metadata = [
            "listener": "\(listener.name)",
            "client": "\(clientIP)",
            "method": "\(method.rawValue)",
            "path": "\(clientURI)",
            "status": "\(status)",
            "backend": "\(backend)",
            "bytes_in": "\(bytesIn)",
            "bytes_out": "\(bytesOut)",
            "duration_ms": "\(Double(elapsed.nanoseconds / 1000) / 1000)",
        ]
        // A tunnel's line (status 101, written when it ends) also says why it ended.
        if let end { metadata["end"] = "\(end.rawValue)" }
        runtime.accessLogger.info("request", metadata: metadata)
    }
}
