import CProxySys
import Logging
import NIOCore
import NIOHTTP1

/// The fast path of a client connection: forwards plain requests from their raw bytes, past NIO's HTTP codec.
///
/// It sits where the full HTTP pipeline (decoder, pipelining handler, encoder, `ProxyHandler`) would start; that
/// pipeline is only built behind it when it hands the connection over. For each request head it:
/// - parses the head strictly (`HTTP1Scan`) and routes it with the same policy and resolution as `ProxyHandler`;
/// - writes the forwarded head on a pooled backend connection, below that connection's codec (`RawUpstreamTap`):
///   from the client's bytes (`HTTP1Scan.rewriteRequestHead`), or through `ForwardingHeaders` when a decision
///   rewrites the request or the head has fields that are merged;
/// - relays the response: the head rewritten byte for byte (`HTTP1Scan.rewriteResponseHead`, or `ForwardingHeaders`
///   for unusual heads and for policies with `on_response`), the body verbatim, framed by `Content-Length`, followed
///   by `ChunkedBodyScanner`, or chunk-encoded here when the backend delimits it by closing.
///
/// Anything it does not handle hands the connection over, at a request boundary, to the full pipeline, built then and
/// given every byte held here; from then on it is a pass-through for the connection's life. That covers a head that
/// is not a plain HTTP/1.1 request without a body (a body, `Upgrade`, `Expect`, HTTP/1.0, obs-text, anything
/// malformed: the full parser answers those), a decision that wants the response body, a decision other than a
/// forward (a local answer, `needBody`, a fan-out), a forward the runtime cannot resolve (no backend, a malformed
/// decision, no owner from the shared store), and a failing script. A forward whose key the shared store (Redis) is
/// still being asked about waits here (`waitForOwner`), as on the full path. After a hand-over the policy runs a
/// second time for that request, as it does after `needBody`: routing scripts are documented to be deterministic per
/// request (docs/routing-api.md).
///
/// What `ProxyHandler` does per exchange is done here too, with the same messages and metrics: connection and lease
/// accounting, the response-head deadline, the stale keep-alive retry, `502`/`504` answers, back-pressure, the access
/// log and request metrics, `on_response` claims, and closing after the response when the client or a shutdown asks.
///
/// With `threads.http_relay`, a connection whose last two exchanges ended cleanly on keyed or named-backend routes
/// moves to an HTTP relay thread with its backend connection (`moveToRelay`, `HTTPRelay`), which serves its later
/// plain requests the same way; one the relay gives back comes through here again, for good.
final class FastPathHandler: ChannelDuplexHandler, RemovableChannelHandler, RawUpstreamSink, ResponseDeadlineWatcher {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// One request in flight on the fast path: an `Exchange` with the fast path's own fields, one object per request
    /// instead of two.
    private final class FastExchange: Exchange {
        /// The exchange as the code shared with `ProxyHandler` sees it.
        var exchange: Exchange { self }
        /// The client's head as received, when it goes to the backend unchanged apart from the proxy's own fields
        /// (no path or header rewrites): `HTTP1Scan.rewriteRequestHead` then writes it without `HTTPHeaders`.
        var rawHead: ByteBuffer?
        /// The pool's key and epoch fields (replace-or-add), for `rawHead`.
        var addedFields: [(name: String, value: String)] = []
        /// Set when the policy has `on_response` (head only: a decision that wants the body is handed over).
        var observer: (policy: RoutingPolicy, request: RouteRequest)?
        var responseHeadBytes: ByteBuffer?
        /// How the response body is delimited (`framing` is the request's).
        var bodyFraming: ResponseBodyFraming = .none
        /// The backend sent something after the response's end: its connection cannot be pooled.
        var trailingGarbage = false
        /// A keyed or named-backend route with no rewrites: the relay threads could serve this connection's next
        /// requests the same way (`HTTPRelay`).
        var relayable = false

        init(head: HTTPRequestHead, clientURI: String, backend: Backend, started: NIODeadline) {
            super.init(head: head, clientURI: clientURI, backend: backend, framing: .none, upgrade: nil, started: started)
        }
    }

    private enum State {
        case idle
        /// A shared ownership store (Redis) is being asked who owns the request's key; the head waits in `inbound`.
        case resolving(Resolution)
        case proxying(FastExchange)
        case closed
    }

    /// Tells one resolution's answer from a later one's.
    private final class Resolution {}

    /// A request is being resolved or served: what the client sends meanwhile is bounded (`read`).
    private var isBusy: Bool {
        switch self.state {
        case .resolving, .proxying: return true
        case .idle, .closed: return false
        }
    }

    /// Largest body copied behind its head into one buffer (see `readResponseHeads`).
    private static let coalescedBodyLimit = 16 * 1024

    private let listener: ListenerContext
    private let loop: ProxyServer.LoopState
    private let headTimer: RequestHeadTimer
    private var runtime: ProxyRuntime
    private var context: ChannelHandlerContext?
    private var clientIP = ""
    private var passthrough = false
    private var state: State = .idle
    /// Client bytes not yet consumed: a partial head, or requests sent behind the one in flight.
    private var inbound: ByteBuffer?
    /// Where the search for the end of the head in `inbound` resumes.
    private var scannedHeadBytes = 0
    private var readPending = false
    /// The client ended its side, or a shutdown asked the connection to close after the current response.
    private var closeWhenIdle = false
    var deadlineTimer = LazyDeadlineTimer()
    /// Responses go to the client with `send(2)` from the connection's second exchange on (`DirectWriter`).
    private var direct = DirectWriter()
    /// Bytes were handed to NIO without a flush (only while direct writes are off).
    private var unflushed = false
    private var exchangesStarted = 0
    /// Relayable exchanges in a row (`FastExchange.relayable`): a connection moves to the HTTP relay after two, so one
    /// that mixes pool-balanced requests in (a browser loading pages between room requests) stays here instead of
    /// moving and coming back.
    private var relayableStreak = 0
    /// This listener's request counters (`ProxyMetrics` is shared by every generation, so they stay valid).
    private lazy var requestCounters = self.runtime.metrics.requestCounters(listener: self.listener.name)

    /// Adds the full HTTP pipeline behind this handler (at hand-over).
    private let installFullPipeline: (ChannelPipeline.SynchronousOperations, FastPathHandler) throws -> Void
    /// Whether the connection may move to the HTTP relay threads (not TLS, not one they gave back).
    private let mayRelay: Bool

    init(
        listener: ListenerContext, loop: ProxyServer.LoopState, headTimer: RequestHeadTimer, mayRelay: Bool = true,
        installFullPipeline: @escaping (ChannelPipeline.SynchronousOperations, FastPathHandler) throws -> Void
    ) {
        self.listener = listener
        self.loop = loop
        self.headTimer = headTimer
        self.installFullPipeline = installFullPipeline
        self.runtime = loop.generation.runtime
        // A TLS listener's bytes must pass its TLS handler: never written to the socket directly.
        if listener.scheme != "http" { self.direct.disable() }
        self.mayRelay = mayRelay && listener.scheme == "http" && loop.httpRelay != nil
    }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.clientIP = context.channel.remoteAddress?.ipAddress ?? "unknown"
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.passthrough else {
            context.fireChannelRead(data)
            return
        }
        // Once closing, whatever else the client sends is dropped.
        if case .closed = self.state { return }
        var bytes = Self.unwrapInboundIn(data)
        if self.inbound == nil {
            self.inbound = bytes
        } else {
            self.inbound!.writeBuffer(&bytes)
        }
        if case .idle = self.state { self.processInbound(context: context) }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if self.passthrough { context.fireChannelReadComplete() }
    }

    func read(context: ChannelHandlerContext) {
        // Reading goes on while a request is in flight (holding it would cost two `epoll_ctl` calls per request), but
        // what a client sends behind it is bounded: past one head's worth of bytes, the rest waits in the socket.
        if !self.passthrough, self.isBusy, (self.inbound?.readableBytes ?? 0) > self.runtime.config.limits.maxHeaderBytes
        {
            self.readPending = true
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if !self.passthrough, case .proxying(let fast) = self.state {
            fast.exchange.upstream?.holdReads(!context.channel.isWritable)
        }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard !self.passthrough else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        // The full pipeline has seen no request: it must not act on these (its pipelining handler would close at once).
        if event is ChannelShouldQuiesceEvent || (event as? ChannelEvent) == .inputClosed {
            self.closeWhenIdle = true
            if case .idle = self.state {
                self.state = .closed
                context.close(promise: nil)
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard !self.passthrough else {
            context.fireErrorCaught(error)
            return
        }
        // `channelInactive` releases what a current exchange holds.
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.cancelDeadlineTimer()
        self.direct.disable()
        if case .proxying(let fast) = self.state {
            let exchange = fast.exchange
            exchange.responseDeadline = nil
            self.abandonUpstream(exchange)
            self.release(exchange)
            // 499 as nginx logs it: the client went away before the response was complete.
            self.logAccess(exchange, status: exchange.responseEnded ? exchange.status : 499)
        }
        self.state = .closed
        context.fireChannelInactive()
    }

    // MARK: Requests

    private func processInbound(context: ChannelHandlerContext) {
        while !self.passthrough, case .idle = self.state, let buffer = self.inbound, buffer.readableBytes > 0 {
            let from = self.scannedHeadBytes
            let end = buffer.withUnsafeReadableBytes { HTTP1Scan.headEnd($0, from: max(0, from - 3)) }
            guard let end else {
                if buffer.readableBytes > self.runtime.config.limits.maxHeaderBytes {
                    self.handOff(context: context)  // the full parser answers 431
                } else {
                    self.scannedHeadBytes = buffer.readableBytes
                }
                return
            }
            // A head over the limit that arrived whole is the full parser's to refuse (431), as one that did not.
            let head = end > self.runtime.config.limits.maxHeaderBytes ? nil : buffer.withUnsafeReadableBytes {
                HTTP1Scan.parseRequestHead(UnsafeRawBufferPointer(rebasing: $0[..<end]), plainOnly: true)
            }
            guard let head, self.forward(head, headLength: end, context: context) else {
                self.handOff(context: context)
                return
            }
        }
    }

    /// From now on the full pipeline serves this connection, starting with every byte held here.
    private func handOff(context: ChannelHandlerContext) {
        self.passthrough = true
        self.direct.disable()
        self.runtime.metrics.fastPathHandoffs.increment()
        do {
            try self.installFullPipeline(context.pipeline.syncOperations, self)
        } catch {
            self.runtime.logger.error("could not set up the HTTP pipeline", metadata: ["error": "\(error)"])
            self.inbound = nil
            context.close(promise: nil)
            return
        }
        if let bytes = self.inbound, bytes.readableBytes > 0 {
            self.inbound = nil
            context.fireChannelRead(Self.wrapInboundOut(bytes))
            context.fireChannelReadComplete()
        }
        self.inbound = nil
        if self.readPending {
            self.readPending = false
            context.read()
        }
    }

    /// Routes and sends one request (a plain head: `HTTP1Scan.parseRequestHead(_:plainOnly:)`); `false` when the fast
    /// path does not handle it (nothing was changed then).
    private func forward(_ head: HTTPRequestHead, headLength: Int, context: ChannelHandlerContext) -> Bool {
        let generation = self.loop.generation
        let runtime = generation.runtime
        let policy = generation.policy(for: self.listener.name)
        let request = ProxyHandler.routeRequest(for: head, isUpgrade: false, listener: self.listener, clientIP: self.clientIP)
        guard let decision = try? policy.route(request), case .forward(let target) = decision.action, !decision.responseBody
        else { return false }
        // A keyed answer comes with its lease (released in `release` when the exchange ends).
        let route = Route(head: head, headLength: headLength, decision: decision, request: request, policy: policy, target: target)
        switch runtime.resolve(target, on: context.eventLoop, acquiringLease: true) {
        case .backend(let backend):
            self.begin(route, backend: backend, ownership: nil, runtime: runtime, started: nil, context: context)
        case .owned(let backend, let ownership):
            self.begin(route, backend: backend, ownership: ownership, runtime: runtime, started: nil, context: context)
        case .pending(let future):
            self.waitForOwner(future, for: route, runtime: runtime)
        case .noBackend, .unknownPool, .unknownBackend, .unknownPlacement:
            return false  // the full pipeline answers these
        }
        return true
    }

    /// What `forward` routed, for `begin`.
    private struct Route {
        let head: HTTPRequestHead
        let headLength: Int
        let decision: RouteDecision
        let request: RouteRequest
        let policy: RoutingPolicy
        let target: RouteTarget
    }

    /// The shared store is asked who owns the key (Redis, on a key this proxy does not know yet): the request waits
    /// here, as it does in `ProxyHandler`, and goes on on the fast path when the owner is known, so the connection can
    /// still move to the HTTP relay later. No owner (or the store failing) hands the connection to the full pipeline,
    /// which routes the request again and answers it.
    private func waitForOwner(_ future: EventLoopFuture<Ownership?>, for route: Route, runtime: ProxyRuntime) {
        let started = self.headTimer.headStartedAt ?? .now()
        self.headTimer.handle(.headReceived)
        let resolution = Resolution()
        self.state = .resolving(resolution)
        future.assumeIsolated().whenComplete { [self] result in
            guard case .resolving(let current) = self.state, current === resolution, let context = self.context else { return }
            self.state = .idle
            guard case .success(let ownership?) = result, let backend = runtime.table.backends[ownership.backend] else {
                self.handOff(context: context)
                if self.closeWhenIdle {
                    // The quiesce (or the client's end) came while the request waited: the full pipeline, which has
                    // seen the request now, closes after answering it.
                    context.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
                }
                return
            }
            // A resolution that waited holds no lease yet (`ProxyHandler` takes it the same way).
            runtime.directory.acquireLease(key: ownership.key)
            self.begin(route, backend: backend, ownership: ownership, runtime: runtime, started: started, context: context)
        }
    }

    /// Starts the exchange `forward` routed, on `backend`.
    private func begin(
        _ route: Route, backend: Backend, ownership: Ownership?, runtime: ProxyRuntime, started: NIODeadline?,
        context: ChannelHandlerContext
    ) {
        let (head, headLength, decision, request, policy, target) =
            (route.head, route.headLength, route.decision, route.request, route.policy, route.target)
        self.runtime = runtime
        let rawHead = self.inbound!.readSlice(length: headLength)
        self.scannedHeadBytes = 0
        if self.inbound!.readableBytes == 0 { self.inbound = nil }
        // Without path or header rewrites the head goes out from the client's bytes (`rawHead`), with the ownership
        // fields added there; the `HTTPRequestHead` is then only read (method, keep-alive, the log), unless
        // `attach` must fall back to writing it, which adds the fields itself.
        let unchanged = decision.path == nil && decision.setHeaders.isEmpty && decision.removeHeaders.isEmpty
        let forwardedHead =
            unchanged ? head : ProxyHandler.forwardedHead(head, decision: decision, ownership: ownership, runtime: runtime)
        let fast = FastExchange(
            head: forwardedHead, clientURI: head.uri, backend: backend, started: started ?? self.headTimer.headStartedAt ?? .now())
        self.headTimer.handle(.headReceived)
        fast.key = ownership?.key
        fast.requestEnded = true
        backend.acquire()
        if policy.observesResponses {
            fast.observer = (policy, request)
        }
        if unchanged {
            fast.rawHead = rawHead
            fast.addedFields = ProxyHandler.ownershipFields(ownership, runtime: runtime)
            if self.mayRelay {
                switch target {
                case .keyed, .backend: fast.relayable = true
                case .pool: break
                }
            }
        }
        self.state = .proxying(fast)
        self.exchangesStarted += 1
        if self.exchangesStarted > 1 { self.direct.prepare(context.channel) }
        self.connectUpstream(fast, allowPooled: true)
    }

    // MARK: Upstream

    private func connectUpstream(_ fast: FastExchange, allowPooled: Bool) {
        if allowPooled, let connection = self.loop.pool.leaseIdle(fast.exchange.backend) {
            // Sent in the same event the head arrived in: the deadline counts from the exchange's start.
            self.attach(connection, to: fast, now: fast.exchange.started)
            return
        }
        self.loop.pool.lease(fast.exchange.backend, allowPooled: false) { [self] result in
            guard case .proxying(let current) = self.state, current === fast else {
                if case .success(let connection) = result { self.loop.pool.release(connection) }
                return
            }
            let exchange = fast.exchange
            switch result {
            case .success(let connection):
                self.attach(connection, to: fast, now: .now())
            case .failure(let error):
                let answer = error.recordAndAnswer(backend: exchange.backend, runtime: self.runtime)
                self.fail(fast, status: answer.status, reason: answer.reason)
            }
        }
    }

    private func attach(_ connection: UpstreamConnection, to fast: FastExchange, now: NIODeadline) {
        guard let context = self.context else { return }
        let exchange = fast.exchange
        exchange.upstream = connection
        exchange.upstreamReused = connection.hasBeenUsed
        connection.hasBeenUsed = true
        connection.rawSink = self
        let loop = self.loop
        loop.requestHeads.clear(minimumCapacity: (fast.rawHead?.readableBytes ?? 0) + 160)
        if let rawHead = fast.rawHead {
            rawHead.withUnsafeReadableBytes { raw in
                ForwardedRequestHead.write(
                    raw: raw, head: exchange.head, added: fast.addedFields, clientIP: self.clientIP,
                    scheme: self.listener.scheme, into: &loop.requestHeads)
            }
        } else {
            ForwardedRequestHead.write(
                raw: nil, head: exchange.head, added: fast.addedFields, clientIP: self.clientIP,
                scheme: self.listener.scheme, into: &loop.requestHeads)
        }
        connection.writeRawAndFlush(loop.requestHeads, reused: exchange.upstreamReused, counts: &loop.directWrites.backend)
        self.armResponseDeadline(exchange, now: now, context: context)
        connection.holdReads(!context.channel.isWritable)
    }

    func rawUpstreamRead(_ bytes: ByteBuffer) {
        guard case .proxying(let fast) = self.state, let context = self.context else { return }
        if fast.exchange.responseEnded {
            fast.trailingGarbage = true
            return
        }
        if fast.exchange.responseStarted {
            self.relayBody(bytes, fast: fast, context: context)
            return
        }
        var bytes = bytes
        if fast.responseHeadBytes == nil {
            fast.responseHeadBytes = bytes
        } else {
            fast.responseHeadBytes!.writeBuffer(&bytes)
        }
        self.readResponseHeads(fast, context: context)
    }

    private func readResponseHeads(_ fast: FastExchange, context: ChannelHandlerContext) {
        let exchange = fast.exchange
        while let buffer = fast.responseHeadBytes, !exchange.responseStarted {
            guard let end = buffer.withUnsafeReadableBytes({ HTTP1Scan.headEnd($0) }) else {
                if buffer.readableBytes > self.runtime.config.limits.maxHeaderBytes {
                    self.badResponse(fast, "backend response head too large")
                }
                return
            }
            // The common case: rewritten byte for byte, no strings or `HTTPHeaders` built. (A policy that sees
            // responses needs their fields: the general path below.)
            // Room for a small body that came with the head too, so coalescing it below does not reallocate.
            let following = min(buffer.readableBytes - end, Self.coalescedBodyLimit)
            let loop = self.loop
            loop.responseHeads.clear(minimumCapacity: end + 64 + following)
            let clientKeepAlive = exchange.clientKeepAlive && !self.closeWhenIdle
            if fast.observer == nil, let summary = buffer.withUnsafeReadableBytes({
                HTTP1Scan.rewriteResponseHead(
                    UnsafeRawBufferPointer(rebasing: $0[..<end]), requestMethod: exchange.head.method,
                    clientKeepAlive: clientKeepAlive, into: &loop.responseHeads)
            }) {
                fast.responseHeadBytes!.moveReaderIndex(forwardBy: end)
                exchange.responseDeadline = nil
                exchange.status = summary.status
                exchange.backend.recordResponse(status: summary.status)
                exchange.upstreamKeepAlive = summary.upstreamKeepAlive
                exchange.closeAfter = summary.closeAfter
                exchange.responseStarted = true
                fast.bodyFraming = ResponseBodyFraming(summary.framing)
                // A small body that came with the head goes out in the same buffer: one write, not two.
                if case .length(let length) = summary.framing, length <= Self.coalescedBodyLimit,
                    var rest = fast.responseHeadBytes, rest.readableBytes >= length, var body = rest.readSlice(length: length)
                {
                    loop.responseHeads.writeBuffer(&body)
                    exchange.bytesOut += length
                    fast.responseHeadBytes = nil
                    fast.trailingGarbage = rest.readableBytes > 0
                    self.writeToClient(loop.responseHeads, context: context)
                    self.responseEnded(fast, context: context)
                    return
                }
                self.writeToClient(loop.responseHeads, context: context)
                self.relayRest(fast, context: context)
                return
            }
            guard let head = buffer.withUnsafeReadableBytes({ HTTP1Scan.parseResponseHead(UnsafeRawBufferPointer(rebasing: $0[..<end])) })
            else {
                self.badResponse(fast, "malformed response head from backend")
                return
            }
            fast.responseHeadBytes!.moveReaderIndex(forwardBy: end)
            if head.status.code < 200 {
                guard head.status != .switchingProtocols else {
                    self.badResponse(fast, "backend switched protocols without being asked")
                    return
                }
                // Interim answers (103 Early Hints) go to the client as they are, as on the full path.
                var bytes = context.channel.allocator.buffer(capacity: 128)
                LocalAnswer.writeInterim(head, into: &bytes)
                self.writeToClient(bytes, context: context)
                self.flushClient(context: context)
                continue
            }
            guard self.startResponse(head, fast: fast, context: context) else { return }
            self.relayRest(fast, context: context)
        }
    }

    /// After the response head: relays what came with it, or ends a response without a body.
    private func relayRest(_ fast: FastExchange, context: ChannelHandlerContext) {
        let rest = fast.responseHeadBytes
        fast.responseHeadBytes = nil
        if let rest, rest.readableBytes > 0 {
            self.relayBody(rest, fast: fast, context: context)
        } else if case .none = fast.bodyFraming {
            self.responseEnded(fast, context: context)
        }
    }

    /// Writes the client's response head and sets up the body's framing; `false` when the head is unusable.
    private func startResponse(_ head: HTTPResponseHead, fast: FastExchange, context: ChannelHandlerContext) -> Bool {
        let exchange = fast.exchange
        let framing: ResponseBodyFraming
        switch ResponseBodyFraming.of(head, requestMethod: exchange.head.method) {
        case .success(let planned):
            framing = planned
        case .failure(let error):
            self.badResponse(fast, "\(error.message)")
            return false
        }
        exchange.responseDeadline = nil
        exchange.status = Int(head.status.code)
        exchange.backend.recordResponse(status: exchange.status)
        exchange.upstreamKeepAlive = head.isKeepAlive
        let (responseHead, closeAfter) = ForwardingHeaders.downstreamResponseHead(
            from: head, requestMethod: exchange.head.method, keepAlive: exchange.clientKeepAlive && !self.closeWhenIdle,
            clientVersion: .http1_1)
        exchange.closeAfter = closeAfter
        exchange.responseStarted = true
        fast.bodyFraming = framing
        if let observed = fast.observer {
            // Before the client has the response: its next request for a claimed key finds the new owner.
            ProxyHandler.observeResponse(
                policy: observed.policy, request: observed.request, head: head, body: nil, exchange: exchange,
                runtime: self.runtime)
        }
        var bytes = context.channel.allocator.buffer(capacity: 256)
        bytes.writeResponseHead(responseHead)
        self.writeToClient(bytes, context: context)
        return true
    }

    private func relayBody(_ bytes: ByteBuffer, fast: FastExchange, context: ChannelHandlerContext) {
        let exchange = fast.exchange
        var bytes = bytes
        let taken: (count: Int, ended: Bool)
        do {
            taken = try bytes.withUnsafeReadableBytes { bytes throws(ChunkedBodyScanner.Malformed) in
                try fast.bodyFraming.take(bytes)
            }
        } catch {
            self.badResponse(fast, "malformed chunked body from backend")
            return
        }
        if taken.count < bytes.readableBytes { fast.trailingGarbage = true }
        exchange.bytesOut += taken.count
        if case .close = fast.bodyFraming {
            var chunk = context.channel.allocator.buffer(capacity: bytes.readableBytes + 16)
            bytes.withUnsafeReadableBytes { LocalAnswer.writeChunk($0, into: &chunk) }
            self.writeToClient(chunk, context: context)
        } else if taken.count > 0 {
            self.writeToClient(bytes.readSlice(length: taken.count)!, context: context)
        }
        if taken.ended { self.responseEnded(fast, context: context) }
    }

    func rawUpstreamReadComplete() {
        if let context = self.context { self.flushClient(context: context) }
    }

    func rawUpstreamClosed() {
        guard case .proxying(let fast) = self.state, let context = self.context else { return }
        let exchange = fast.exchange
        guard !exchange.responseEnded else { return }
        exchange.upstream = nil
        exchange.responseDeadline = nil
        if case .close = fast.bodyFraming, exchange.responseStarted {
            // A close-delimited body is complete: end the chunked stream the client was promised.
            self.writeToClient(context.channel.allocator.buffer(staticString: "0\r\n\r\n"), context: context)
            self.responseEnded(fast, context: context)
            return
        }
        if !exchange.responseStarted {
            // A reused keep-alive connection may have been closed by the backend just as we sent on it; a request
            // with no body can safely be sent again on a fresh connection (what HAProxy's `retry-on` does).
            if exchange.upstreamReused && !exchange.retried {
                exchange.retried = true
                fast.responseHeadBytes = nil
                self.connectUpstream(fast, allowPooled: false)
                return
            }
            self.runtime.metrics.countUpstreamError(.closedEarly)
            self.runtime.logger.warning(
                "backend closed the connection before responding", metadata: ["backend": "\(exchange.backend.id)", "error": "eof"])
            self.fail(fast, status: .badGateway, reason: "bad gateway: backend closed the connection")
            return
        }
        // Part of the response is already with the client: closing is the only honest signal that it is truncated.
        self.runtime.metrics.countUpstreamError(.resetMidResponse)
        self.runtime.logger.warning("backend closed the connection mid-response", metadata: ["backend": "\(exchange.backend.id)"])
        self.release(exchange)
        self.logAccess(exchange, status: exchange.status)
        self.state = .closed
        context.close(promise: nil)
    }

    /// The backend sent something the fast path cannot relay: `502` if the client has no response yet, else close.
    private func badResponse(_ fast: FastExchange, _ message: String) {
        let exchange = fast.exchange
        self.runtime.logger.warning("\(message)", metadata: ["backend": "\(exchange.backend.id)"])
        self.abandonUpstream(exchange)
        if exchange.responseStarted {
            self.release(exchange)
            self.logAccess(exchange, status: exchange.status)
            self.state = .closed
            self.context?.close(promise: nil)
        } else {
            self.fail(fast, status: .badGateway, reason: "bad gateway: invalid response from backend")
        }
    }

    // MARK: Writing to the client

    /// Every byte the fast path sends the client goes through here: straight to the socket when direct writes are on
    /// and NIO holds nothing (`DirectWriter`); what the socket does not take goes to NIO, flushed, and is counted until
    /// written. Without direct writes: to NIO, flushed by `flushClient` at the end of the read or the exchange.
    private func writeToClient(_ bytes: ByteBuffer, context: ChannelHandlerContext) {
        guard self.direct.isDirect else {
            context.write(Self.wrapOutboundOut(bytes), promise: nil)
            self.unflushed = true
            return
        }
        guard let rest = self.direct.write(bytes, counts: &self.loop.directWrites.client) else { return }
        self.direct.willQueueInNIO()
        let promise = context.eventLoop.makePromise(of: Void.self)
        promise.futureResult.assumeIsolated().whenComplete { [self] _ in self.direct.nioWriteCompleted() }
        context.writeAndFlush(Self.wrapOutboundOut(rest), promise: promise)
    }

    private func flushClient(context: ChannelHandlerContext) {
        guard self.unflushed else { return }
        self.unflushed = false
        context.flush()
    }

    // MARK: Completion

    private func responseEnded(_ fast: FastExchange, context: ChannelHandlerContext) {
        let exchange = fast.exchange
        exchange.responseEnded = true
        // One clock read for the pool's idle stamp, the request's duration and the keep-alive timer.
        let now = NIODeadline.now()
        let keepAlive = exchange.clientKeepAlive && !exchange.closeAfter && !self.closeWhenIdle
        var reusable: UpstreamConnection?
        if let upstream = exchange.upstream {
            // (A close-delimited body ends with the connection, which is gone by now.)
            exchange.upstream = nil
            if exchange.upstreamKeepAlive && !fast.trailingGarbage {
                reusable = upstream
            } else {
                upstream.rawSink = nil
                upstream.channel.close(promise: nil)
            }
        }
        self.release(exchange)
        self.logAccess(exchange, status: exchange.status, now: now)
        self.relayableStreak = fast.relayable ? self.relayableStreak + 1 : 0
        if let upstream = reusable {
            if keepAlive, self.relayableStreak >= 2, self.moveToRelay(with: upstream, context: context) { return }
            self.loop.pool.release(upstream, now: now)
        }
        self.finishExchange(keepAlive: keepAlive, now: now, context: context)
    }

    /// Moves the connection, with the backend connection its exchange just used, to an HTTP relay thread (`HTTPRelay`,
    /// the loop's next in turn), between two exchanges: only with no bytes read ahead and nothing of either side
    /// queued in NIO, so every byte is either answered or still in a socket. Both descriptors are duplicated and both
    /// channels closed (NIO's close is a plain `close(2)`: the connections live on in the copies). False (nothing
    /// changed) when any of that is not so.
    private func moveToRelay(with upstream: UpstreamConnection, context: ChannelHandlerContext) -> Bool {
        guard let link = self.loop.httpRelay, self.mayRelay, self.inbound == nil, !self.readPending, !self.unflushed,
            let clientFD = self.direct.descriptorIfDrained(), upstream.channel.isActive,
            DirectWriter.nioQueueIsEmpty(upstream.channel), let upstreamFD = TunnelHandler.descriptor(of: upstream.channel)
        else { return false }
        let clientCopy = cproxy_dup(clientFD)
        let upstreamCopy = clientCopy >= 0 ? cproxy_dup(upstreamFD) : -1
        guard upstreamCopy >= 0 else {
            if clientCopy >= 0 { cproxy_close(clientCopy) }
            return false
        }
        guard link.connections.handOff(context.channel) else {
            cproxy_close(clientCopy)
            cproxy_close(upstreamCopy)
            return false
        }
        let connections = link.connections
        let metrics = self.runtime.metrics
        let listener = self.listener
        let handBack = link.handBack
        let relayed = RelayedHTTPConnection(
            clientFD: clientCopy, upstreamFD: upstreamCopy, upstreamBackend: upstream.backend, listener: listener,
            clientIP: self.clientIP, requestCounters: self.requestCounters,
            handBack: { fd, unread in
                metrics.httpRelayed.decrement()
                handBack(fd, unread, listener)
            },
            closed: {
                metrics.httpRelayed.decrement()
                connections.relayedClosed()
                metrics.connectionClosed(listener: listener.name)
            })
        metrics.httpRelayed.increment()
        upstream.rawSink = nil
        upstream.channel.close(promise: nil)
        self.state = .closed
        self.direct.disable()
        self.cancelDeadlineTimer()
        context.close(promise: nil)
        link.nextShard().adopt(relayed)
        return true
    }

    /// The response is written (or queued): flush it, then serve the next request or close.
    private func finishExchange(keepAlive: Bool, now: NIODeadline = .now(), context: ChannelHandlerContext) {
        if keepAlive {
            self.state = .idle
            self.headTimer.handle(.awaitingHead, now: now)
            self.flushClient(context: context)
            if self.readPending {
                self.readPending = false
                context.read()
            }
            self.processInbound(context: context)
        } else {
            self.state = .closed
            context.writeAndFlush(Self.wrapOutboundOut(context.channel.allocator.buffer(capacity: 0))).assumeIsolated()
                .whenComplete { _ in context.close(promise: nil) }
        }
    }

    /// Fails an exchange that has not started its response: answers locally and releases what it held.
    private func fail(_ fast: FastExchange, status: HTTPResponseStatus, reason: String) {
        guard let context = self.context else { return }
        let exchange = fast.exchange
        exchange.responseDeadline = nil
        self.abandonUpstream(exchange)
        self.release(exchange)
        exchange.status = Int(status.code)
        self.logAccess(exchange, status: Int(status.code))
        let keepAlive = exchange.clientKeepAlive && !self.closeWhenIdle
        var bytes = context.channel.allocator.buffer(capacity: 160 + reason.utf8.count)
        LocalAnswer.write(status: status, reason: reason, keepAlive: keepAlive, into: &bytes)
        self.writeToClient(bytes, context: context)
        self.finishExchange(keepAlive: keepAlive, context: context)
    }

    private func abandonUpstream(_ exchange: Exchange) {
        exchange.responseDeadline = nil
        if let upstream = exchange.upstream {
            exchange.upstream = nil
            upstream.rawSink = nil
            upstream.channel.close(promise: nil)
        }
    }

    /// Gives back what an exchange held: its backend's connection slot and its key's lease.
    private func release(_ exchange: Exchange) {
        exchange.backend.release()
        if let key = exchange.key { self.runtime.directory.releaseLease(key: key) }
    }

    private func logAccess(_ exchange: Exchange, status: Int, now: NIODeadline = .now()) {
        self.requestCounters?.count(status: status)
        self.runtime.metrics.requestDuration.recordNanoseconds((now - exchange.started).nanoseconds)
        ProxyHandler.logAccess(runtime: self.runtime, listener: self.listener, clientIP: self.clientIP, exchange: exchange, status: status)
    }

    // MARK: Response-head deadline (`ResponseDeadlineWatcher`)

    var pendingResponseDeadline: NIODeadline? {
        guard case .proxying(let fast) = self.state, self.context != nil else { return nil }
        return fast.exchange.responseDeadline
    }

    func responseDeadlinePassed() {
        guard case .proxying(let fast) = self.state, !fast.exchange.responseStarted else { return }
        self.runtime.metrics.countUpstreamError(.responseTimeout)
        self.fail(fast, status: .gatewayTimeout, reason: "gateway timeout: backend did not answer in time")
    }

    private func armResponseDeadline(_ exchange: Exchange, now: NIODeadline, context: ChannelHandlerContext) {
        let deadline = now + self.runtime.config.timeouts.upstreamResponseHeader
        exchange.responseDeadline = deadline
        self.watchResponseDeadline(deadline, on: context.eventLoop)
    }
}

extension ByteBuffer {
    /// HTTP/1.1 request head as NIO's encoder writes it (`name: value`, CRLF line ends).
    mutating func writeRequestHead(_ head: HTTPRequestHead) {
        self.writeString(head.method.rawValue)
        self.writeStaticString(" ")
        self.writeString(head.uri)
        self.writeStaticString(head.version == .http1_0 ? " HTTP/1.0\r\n" : " HTTP/1.1\r\n")
        self.writeHeaderFields(head.headers)
    }

    /// HTTP/1.x response head as NIO's encoder writes it.
    mutating func writeResponseHead(_ head: HTTPResponseHead) {
        self.writeStaticString(head.version == .http1_0 ? "HTTP/1.0 " : "HTTP/1.1 ")
        self.writeString(String(head.status.code))
        self.writeStaticString(" ")
        self.writeString(head.status.reasonPhrase)
        self.writeStaticString("\r\n")
        self.writeHeaderFields(head.headers)
    }

    private mutating func writeHeaderFields(_ headers: HTTPHeaders) {
        for (name, value) in headers {
            self.writeString(name)
            self.writeStaticString(": ")
            self.writeString(value)
            self.writeStaticString("\r\n")
        }
        self.writeStaticString("\r\n")
    }
}
