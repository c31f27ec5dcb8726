import CProxySys
import Foundation
import NIOCore
import NIOHTTP1
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One HTTP relay shard (`HTTPRelay`): its epoll instance, a wake-up eventfd for commands from other threads, a timer,
/// the connections it serves, its routing policies and its buffers. The relay's threads run it, one at a time
/// (`step()`): whichever is free when it has ready descriptors.
///
/// Level-triggered epoll. Per connection, the client side is read while no request is in flight (and, while one is,
/// up to one head's worth of bytes behind it); the backend side is read while the client has nothing pending, which
/// is back-pressure: a slow client holds the backend's bytes in the backend's socket, not here. Timers (keep-alive
/// idle, request head, response head) are checked by a sweep every 100 ms while any connection is served.
final class HTTPRelayShard: @unchecked Sendable {
    private enum Command {
        case adopt(RelayedHTTPConnection)
        case generation(HTTPRelayGeneration, CheckedContinuation<Void, Never>)
        case quiesce
        case stop(CheckedContinuation<Void, Never>)

        var isStop: Bool {
            if case .stop = self { return true }
            return false
        }
    }

    private typealias Connection = RelayedHTTPConnection

    /// The epoll instance, the wake-up and the command queue.
    private let core: RelayThreadCore<Command>
    private var epoll: Int32 { self.core.epoll }
    /// Connections served now, moved here, given back, and requests answered (read from any thread).
    let live = Atomic<Int>(0)
    let adopted = Atomic<Int>(0)
    let handedBack = Atomic<Int>(0)
    let requests = Atomic<Int>(0)
    /// Whether `discard` released the shard's descriptors (for tests).
    private(set) var isDiscarded = false

    /// Fires every `sweepInterval` while connections are served, so the sweep runs when nothing else happens (the
    /// shard runs only when it has ready descriptors).
    private let timer: Int32
    private static var timerToken: UInt64 { .max - 1 }
    private var timerArmed = false
    /// Passes run (`step()`): the release at the end of one and the acquire at the start of the next, on whichever
    /// threads they run.
    private let runs = Atomic<UInt64>(0)
    /// 64 ready descriptors per pass, as NIO's selector takes: against 256, p99 latency was lower in 6 of 6
    /// interleaved keep-alive rounds (2.01–2.53 against 2.34–2.64 ms) at the same throughput (docs/benchmarks.md,
    /// "Eleventh session").
    private let buffers = RelayThreadCore<Command>.PassBuffers(capacity: 64)

    // The thread running the shard only (one at a time: `step()`).
    private var generation: HTTPRelayGeneration
    private var connections = RelaySlots<Connection>()
    private var quiescing = false
    private let scratch: UnsafeMutableRawBufferPointer
    /// Where a response (head and what follows it in one read) is put together before one send.
    private var out = ByteBufferAllocator().buffer(capacity: 16 * 1024)
    private let allocator = ByteBufferAllocator()
    /// Answers for clients written at the end of the batch (see `writeHeld()`), and the connections they belong to.
    private var held = ByteBufferAllocator().buffer(capacity: 64 * 1024)
    private var heldConnections: [Connection] = []
    /// Sends the held answers (`writeHeld()`).
    private let sendBatch: SendBatch
    /// Something was sent (or held to be sent) to a client or a backend in the current batch.
    private var sentInBatch = false
    /// The connections of the answers in `sendBatch`, and where each answer is in `held`.
    private var heldBatch: [(Connection, Range<Int>)] = []
    private var nextSweep: UInt64 = .max

    private static let scratchSize = 64 * 1024
    private static let sweepInterval: UInt64 = 100_000_000
    /// Largest body copied behind its head into one send (as the fast path's `coalescedBodyLimit`).
    private static let coalescedBodyLimit = 16 * 1024

    /// `ioUring`: the answers held to the end of a batch go out in one system call (`SendBatch`, `threads.io_uring`).
    init(generation: HTTPRelayGeneration, ioUring: Bool = true) throws {
        self.sendBatch = SendBatch(useRing: ioUring)
        self.generation = generation
        let core = try RelayThreadCore<Command>(isStop: \.isStop)
        let timer = cproxy_timerfd()
        guard timer >= 0, cproxy_epoll_ctl(core.epoll, 1, timer, CPROXY_EV_IN, Self.timerToken) == 0 else {
            let error = IOError(errnoCode: errno, reason: "timerfd")
            if timer >= 0 { cproxy_close(timer) }
            core.discard()
            throw error
        }
        self.core = core
        self.timer = timer
        self.scratch = .allocate(byteCount: Self.scratchSize, alignment: 16)
    }

    /// Releases a shard that was never started.
    func discard() {
        precondition(!self.isDiscarded)
        self.isDiscarded = true
        self.core.discard()
        cproxy_close(self.timer)
        self.scratch.deallocate()
    }

    /// The shard's epoll instance: readable while the shard has work (`HTTPRelay` queues it then).
    var readiness: Int32 { self.core.epoll }

    /// Sets up the send ring (`SendBatch.prepare`); the errno when the kernel refused it.
    func prepare() -> Int32? { self.sendBatch.prepare() }

    // MARK: Commands (any thread)

    /// Takes over a connection; from here on the shard owns its descriptors.
    func adopt(_ connection: RelayedHTTPConnection) {
        self.live.add(1, ordering: .relaxed)
        self.adopted.add(1, ordering: .relaxed)
        self.send(.adopt(connection))
    }

    /// Routes new requests with `generation` from now on (a reload); returns once the shard does.
    func use(_ generation: HTTPRelayGeneration) async {
        await withCheckedContinuation { self.send(.generation(generation, $0)) }
    }

    func quiesce() {
        self.send(.quiesce)
    }

    func stop() async {
        await withCheckedContinuation { self.send(.stop($0)) }
    }

    private func send(_ command: Command) {
        if !self.core.send(command) { self.refuse(command) }
    }

    /// Answers a command the stopped shard will not run: a connection handed over now closes (shutdown).
    private func refuse(_ command: Command) {
        switch command {
        case .adopt(let connection):
            cproxy_close(connection.clientFD)
            cproxy_close(connection.upstreamFD)
            self.live.subtract(1, ordering: .relaxed)
            let closed = connection.closed
            connection.closed = nil
            closed?()
        case .quiesce:
            break
        case .generation(_, let done), .stop(let done):
            done.resume()
        }
    }

    // MARK: Running the shard

    /// Serves what is ready now, without waiting (one `epoll_wait` with a zero timeout): the ready descriptors, the
    /// commands, a due sweep, then the answers held in the batch (`writeHeld()`). Called by one relay thread at a
    /// time (`HTTPRelay`). `running` is false once the shard stopped (its descriptors are closed then); `sent` says
    /// whether anything was sent (the thread yields then, `threads.yield_after_batch`).
    func step() -> (running: Bool, sent: Bool) {
        // The queue hands the shard from thread to thread through the kernel (`EPOLL_CTL_MOD`, `epoll_wait`), whose
        // locks order the two threads' accesses in fact; this acquire (and the release at the end) says so in the
        // language's memory model too, so that the thread sanitizer sees the hand-over. Uncontended: a few ns.
        _ = self.runs.load(ordering: .acquiring)
        defer { self.runs.add(1, ordering: .releasing) }
        let running = self.core.pass(
            timeout: 0, self.buffers, nextSweep: { self.nextSweep },
            event: { token, events in
                if token == Self.timerToken {
                    cproxy_eventfd_drain(self.timer)  // (a timerfd holds a count as an eventfd does)
                    return
                }
                let slot = Int(token >> 1)
                guard let connection = self.connections[slot] else { return }
                self.event(connection, upstream: token & 1 == 1, events)
            },
            commands: self.runCommands,
            refuse: self.refuse,
            sweep: self.sweep,
            batchEnded: self.writeHeld)
        let sent = self.sentInBatch
        self.sentInBatch = false
        if !running {
            cproxy_close(self.timer)
            self.scratch.deallocate()
        } else {
            self.armTimer()
        }
        return (running, sent)
    }

    /// The timer runs while a sweep is due (connections are served), and stops with them.
    private func armTimer() {
        let wanted = self.nextSweep != .max
        guard wanted != self.timerArmed else { return }
        self.timerArmed = wanted
        _ = cproxy_timerfd_every(self.timer, wanted ? Self.sweepInterval : 0)
    }

    /// False once told to stop.
    private func runCommands(_ commands: [Command]) -> Bool {
        for command in commands {
            switch command {
            case .adopt(let connection):
                self.register(connection)
            case .generation(let generation, let done):
                self.generation = generation
                done.resume()
            case .quiesce:
                self.quiescing = true
                for connection in self.connections.all {
                    if connection.phase == .idle {
                        self.finish(connection)
                    } else {
                        connection.closeWhenIdle = true
                    }
                }
            case .stop(let done):
                for connection in self.connections.all { self.abort(connection) }
                done.resume()
                return false
            }
        }
        return true
    }

    private func register(_ connection: Connection) {
        let slot = self.connections.insert(connection)
        connection.slot = slot
        let now = Self.now()
        connection.idleSince = now
        if self.quiescing {
            self.finish(connection)
            return
        }
        let interest = CPROXY_EV_IN | CPROXY_EV_RDHUP
        guard cproxy_epoll_ctl(self.epoll, 1, connection.clientFD, interest, UInt64(slot) << 1) == 0,
            cproxy_epoll_ctl(self.epoll, 1, connection.upstreamFD, interest, UInt64(slot) << 1 | 1) == 0
        else {
            self.finish(connection)
            return
        }
        connection.interest = (interest, interest)
        if self.nextSweep == .max { self.nextSweep = now + Self.sweepInterval }
    }

    /// One side's readiness: an error or a hang-up of a side not read ends that side (the client's: the connection),
    /// writability flushes what waits for it, readability reads.
    private func event(_ connection: Connection, upstream: Bool, _ events: UInt32) {
        if upstream, connection.upstreamFD < 0 { return }  // (closed earlier in this batch)
        if events & CPROXY_EV_ERR != 0 {
            return self.sideEnded(connection, upstream: upstream)
        }
        if events & CPROXY_EV_OUT != 0 {
            guard self.flush(connection, toUpstream: upstream) else { return }
        }
        guard connection.slot >= 0, !upstream || connection.upstreamFD >= 0 else { return }
        let interest = upstream ? connection.interest.upstream : connection.interest.client
        if interest & CPROXY_EV_IN != 0 {
            if events & (CPROXY_EV_IN | CPROXY_EV_HUP | CPROXY_EV_RDHUP) != 0 {
                if upstream { self.upstreamReadable(connection) } else { self.clientReadable(connection) }
            }
        } else if events & CPROXY_EV_HUP != 0 {
            self.sideEnded(connection, upstream: upstream)
        }
    }

    private func sideEnded(_ connection: Connection, upstream: Bool) {
        if upstream { self.upstreamClosed(connection) } else { self.abort(connection) }
    }

    // MARK: Client side

    private func clientReadable(_ connection: Connection) {
        // recv(2), not read(2): read on a socket also goes through the VFS layer (vfs_read, fdget_pos, rw_verify_area,
        // sock_read_iter), about 2 % of the relay's CPU under keep-alive load by perf, against 0.4 % for HAProxy's
        // recvfrom (docs/benchmarks.md, "Fourteenth session"). The same in the tunnel relay.
        let count = recv(connection.clientFD, self.scratch.baseAddress, self.scratch.count, 0)
        if count > 0 {
            let bytes = UnsafeRawBufferPointer(rebasing: self.scratch[0..<count])
            if connection.inbound == nil {
                var buffer = self.allocator.buffer(capacity: max(count, 1024))
                buffer.writeBytes(bytes)
                connection.inbound = buffer
            } else {
                connection.inbound!.writeBytes(bytes)
            }
            if connection.phase == .idle {
                if connection.headStarted == 0 { connection.headStarted = Self.now() }
                self.processInbound(connection)
            } else {
                self.refresh(connection)
            }
        } else if count == 0 {
            // The client ended its side: close once idle (the response in flight still goes out, as on NIO with
            // half-closure).
            connection.clientEnded = true
            connection.closeWhenIdle = true
            if connection.phase == .idle {
                self.finish(connection)
            } else {
                self.refresh(connection)
            }
        } else if errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR {
            self.abort(connection)
        }
    }

    /// Serves the requests in `inbound`, one at a time, while the connection is idle.
    private func processInbound(_ connection: Connection) {
        // A request behind a response not yet written waits for it (`flush`, `writeHeld()` come back here).
        while connection.slot >= 0, connection.phase == .idle, connection.toClient == nil, connection.heldForClient == nil,
            let buffer = connection.inbound, buffer.readableBytes > 0
        {
            let config = self.generation.runtime.config
            let from = connection.scanned
            let end = buffer.withUnsafeReadableBytes { HTTP1Scan.headEnd($0, from: max(0, from - 3)) }
            guard let end else {
                if buffer.readableBytes > config.limits.maxHeaderBytes {
                    self.giveBack(connection)  // the full parser answers 431
                } else {
                    connection.scanned = buffer.readableBytes
                    self.refresh(connection)
                }
                return
            }
            let head = end > config.limits.maxHeaderBytes ? nil : buffer.withUnsafeReadableBytes {
                HTTP1Scan.parseRequestHead(UnsafeRawBufferPointer(rebasing: $0[..<end]), plainOnly: true)
            }
            guard let head, self.forward(head, headLength: end, connection) else {
                return self.giveBack(connection)
            }
        }
        if connection.slot >= 0 { self.refresh(connection) }
    }

    /// Routes and sends one plain request; false (nothing held) when it must go to NIO.
    private func forward(_ head: HTTPRequestHead, headLength: Int, _ connection: Connection) -> Bool {
        guard !self.quiescing, connection.upstreamFD >= 0, let held = connection.upstreamBackend else { return false }
        let generation = self.generation
        let runtime = generation.runtime
        guard let policy = generation.policies[connection.listener.name] else { return false }
        let request = ProxyHandler.routeRequest(
            for: head, isUpgrade: false, listener: connection.listener, clientIP: connection.clientIP)
        guard let decision = try? policy.route(request), case .forward(let target) = decision.action, !decision.responseBody,
            decision.path == nil, decision.setHeaders.isEmpty, decision.removeHeaders.isEmpty
        else { return false }
        // A pool-balanced request may go to any backend: it is NIO's (resolving it here would move the pool's cursor).
        if case .pool = target { return false }
        guard let (backend, ownership) = runtime.resolveNow(target, on: nil) else { return false }
        guard Self.sameBackend(backend, held) else {
            if let key = ownership?.key { runtime.directory.releaseLease(key: key) }
            return false
        }
        let now = NIODeadline.now()
        let exchange = Exchange(
            head: head, clientURI: head.uri, backend: backend, framing: .none, upgrade: nil,
            started: NIODeadline.uptimeNanoseconds(connection.headStarted == 0 ? now.uptimeNanoseconds : connection.headStarted))
        exchange.key = ownership?.key
        exchange.requestEnded = true
        exchange.upstreamReused = true
        backend.acquire()
        let added = ProxyHandler.ownershipFields(ownership, runtime: runtime)
        self.out.clear()
        connection.inbound!.withUnsafeReadableBytes { raw in
            ForwardedRequestHead.write(
                raw: UnsafeRawBufferPointer(rebasing: raw[..<headLength]), head: head, added: added,
                clientIP: connection.clientIP, scheme: connection.listener.scheme, into: &self.out)
        }
        connection.exchange = exchange
        connection.exchangeRuntime = runtime
        // A policy that sees responses gets each head before the client does (a claim made there is in force for the
        // client's next request), as on the fast path; a decision that wants the body went to NIO above.
        connection.observer = policy.observesResponses ? (policy, request) : nil
        connection.headLength = headLength
        connection.scanned = 0
        connection.phase = .awaitingResponse
        connection.trailingGarbage = false
        connection.responseDue = now.uptimeNanoseconds &+ UInt64(max(runtime.config.timeouts.upstreamResponseHeader.nanoseconds, 0))
        if !self.sendOut(connection, toUpstream: true) {
            // The backend connection is gone before the request left: NIO sends it on another one.
            self.undo(connection)
            return false
        }
        return true
    }

    // MARK: Backend side

    private func upstreamReadable(_ connection: Connection) {
        let count = recv(connection.upstreamFD, self.scratch.baseAddress, self.scratch.count, 0)
        if count == 0 {
            return self.upstreamClosed(connection)
        }
        if count < 0 {
            if errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR { self.upstreamClosed(connection) }
            return
        }
        let bytes = UnsafeRawBufferPointer(rebasing: self.scratch[0..<count])
        guard connection.exchange != nil, connection.phase == .awaitingResponse || connection.phase == .body else {
            // Bytes nobody asked for: this connection cannot carry another request.
            connection.trailingGarbage = true
            self.closeUpstream(connection)
            self.refresh(connection)
            return
        }
        self.out.clear()
        if connection.responseHead != nil {
            connection.responseHead!.writeBytes(bytes)
            var buffer = connection.responseHead!
            connection.responseHead = nil
            let consumed = buffer.withUnsafeReadableBytes { self.relayResponse($0, connection) }
            buffer.moveReaderIndex(forwardBy: consumed)
            if connection.slot >= 0, connection.phase == .awaitingResponse, buffer.readableBytes > 0 {
                connection.responseHead = buffer
            }
        } else {
            let consumed = self.relayResponse(bytes, connection)
            if connection.slot >= 0, connection.phase == .awaitingResponse, consumed < count {
                var buffer = self.allocator.buffer(capacity: count - consumed + 1024)
                buffer.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[consumed...]))
                connection.responseHead = buffer
            }
        }
        if connection.slot >= 0, connection.exchange != nil, self.out.readableBytes > 0 {
            guard self.sendOut(connection, toUpstream: false) else { return self.abort(connection) }
        }
        if connection.slot >= 0 { self.refresh(connection) }
    }

    /// Relays what the backend sent (`bytes`) into `out`: response heads, then the body by its framing. Returns how
    /// many bytes were used; the rest of an incomplete head is kept by the caller. Ends the exchange when the
    /// response ends (writing `out` first).
    private func relayResponse(_ bytes: UnsafeRawBufferPointer, _ connection: Connection) -> Int {
        var offset = 0
        while connection.slot >= 0, let exchange = connection.exchange {
            let rest = UnsafeRawBufferPointer(rebasing: bytes[offset...])
            if connection.phase == .body {
                let taken: (count: Int, ended: Bool)
                do {
                    taken = try connection.framing.take(rest)
                } catch {
                    self.badResponse(connection, "malformed chunked body from backend")
                    return bytes.count
                }
                exchange.bytesOut += taken.count
                if case .close = connection.framing {
                    if rest.count > 0 { LocalAnswer.writeChunk(rest, into: &self.out) }
                } else {
                    self.out.writeBytes(UnsafeRawBufferPointer(rebasing: rest[..<taken.count]))
                }
                if taken.count < rest.count { connection.trailingGarbage = true }
                if taken.ended { self.responseEnded(connection) }
                return bytes.count
            }
            guard connection.phase == .awaitingResponse else { return bytes.count }
            guard let end = HTTP1Scan.headEnd(rest) else {
                if rest.count > self.generation.runtime.config.limits.maxHeaderBytes {
                    self.badResponse(connection, "backend response head too large")
                    return bytes.count
                }
                return offset
            }
            let headBytes = UnsafeRawBufferPointer(rebasing: rest[..<end])
            let clientKeepAlive = exchange.clientKeepAlive && !connection.closeWhenIdle && !self.quiescing
            self.out.reserveCapacity(minimumWritableBytes: end + 64 + min(rest.count - end, Self.coalescedBodyLimit))
            if connection.observer == nil, let summary = HTTP1Scan.rewriteResponseHead(
                headBytes, requestMethod: exchange.head.method, clientKeepAlive: clientKeepAlive, into: &self.out)
            {
                exchange.status = summary.status
                exchange.upstreamKeepAlive = summary.upstreamKeepAlive
                exchange.closeAfter = summary.closeAfter
                connection.framing = ResponseBodyFraming(summary.framing)
            } else {
                guard let head = HTTP1Scan.parseResponseHead(headBytes) else {
                    self.badResponse(connection, "malformed response head from backend")
                    return bytes.count
                }
                if head.status.code < 200 {
                    guard head.status != .switchingProtocols else {
                        self.badResponse(connection, "backend switched protocols without being asked")
                        return bytes.count
                    }
                    LocalAnswer.writeInterim(head, into: &self.out)
                    offset += end
                    continue
                }
                switch ResponseBodyFraming.of(head, requestMethod: exchange.head.method) {
                case .success(let framing):
                    connection.framing = framing
                case .failure(let error):
                    self.badResponse(connection, error.message)
                    return bytes.count
                }
                exchange.status = Int(head.status.code)
                exchange.upstreamKeepAlive = head.isKeepAlive
                if let observed = connection.observer {
                    ProxyHandler.observeResponse(
                        policy: observed.policy, request: observed.request, head: head, body: nil, exchange: exchange,
                        runtime: connection.exchangeRuntime ?? self.generation.runtime)
                }
                let (responseHead, closeAfter) = ForwardingHeaders.downstreamResponseHead(
                    from: head, requestMethod: exchange.head.method, keepAlive: clientKeepAlive, clientVersion: .http1_1)
                exchange.closeAfter = closeAfter
                self.out.writeResponseHead(responseHead)
            }
            offset += end
            exchange.responseStarted = true
            exchange.backend.recordResponse(status: exchange.status)
            connection.phase = .body
            self.consumeRequestHead(connection)
            if case .none = connection.framing {
                if offset < bytes.count { connection.trailingGarbage = true }
                self.responseEnded(connection)
                return bytes.count
            }
            if offset == bytes.count { return offset }
        }
        return bytes.count
    }

    /// The backend closed its connection (or it failed).
    private func upstreamClosed(_ connection: Connection) {
        self.closeUpstream(connection)
        guard let exchange = connection.exchange else {
            // Idle: the next request goes to NIO, which opens a new connection.
            return self.refresh(connection)
        }
        if connection.phase == .body, case .close = connection.framing {
            // A close-delimited body is complete: end the chunked stream the client was promised.
            self.out.clear()
            self.out.writeStaticString("0\r\n\r\n")
            guard self.sendOut(connection, toUpstream: false) else { return self.abort(connection) }
            self.responseEnded(connection)
            return
        }
        if connection.phase == .awaitingResponse && !exchange.responseStarted {
            // A kept-alive connection the backend closed just as the request went out (or before): a request without a
            // body can be sent again on a fresh connection. NIO does that, with the request's bytes given back.
            if !exchange.retried {
                connection.responseHead = nil
                self.undo(connection)
                return self.giveBack(connection)
            }
            let runtime = self.generation.runtime
            runtime.metrics.countUpstreamError(.closedEarly)
            runtime.logger.warning(
                "backend closed the connection before responding", metadata: ["backend": "\(exchange.backend.id)", "error": "eof"])
            return self.fail(connection, status: .badGateway, reason: "bad gateway: backend closed the connection")
        }
        // Part of the response is already with the client: closing is the only honest signal that it is truncated.
        let runtime = self.generation.runtime
        runtime.metrics.countUpstreamError(.resetMidResponse)
        runtime.logger.warning("backend closed the connection mid-response", metadata: ["backend": "\(exchange.backend.id)"])
        self.abort(connection)
    }

    /// The backend sent something that cannot be relayed: `502` if the client has no response yet, else close.
    private func badResponse(_ connection: Connection, _ message: String) {
        guard let exchange = connection.exchange else { return }
        self.generation.runtime.logger.warning("\(message)", metadata: ["backend": "\(exchange.backend.id)"])
        self.closeUpstream(connection)
        if exchange.responseStarted {
            // What is good of the response (its head, say) goes out before the close, as on the fast path.
            if self.out.readableBytes > 0 { _ = self.sendOut(connection, toUpstream: false) }
            self.abort(connection)
        } else {
            self.out.clear()
            self.fail(connection, status: .badGateway, reason: "bad gateway: invalid response from backend")
        }
    }

    // MARK: Ending exchanges

    /// The response is complete (and in `out`, or sent): account for it, then serve the next request or close.
    private func responseEnded(_ connection: Connection) {
        guard let exchange = connection.exchange else { return }
        if self.out.readableBytes > 0 {
            guard self.sendOut(connection, toUpstream: false) else { return self.abort(connection) }
        }
        exchange.responseEnded = true
        if !exchange.upstreamKeepAlive || connection.trailingGarbage { self.closeUpstream(connection) }
        self.endExchange(connection, status: exchange.status)
        let keepAlive = exchange.clientKeepAlive && !exchange.closeAfter && !connection.closeWhenIdle && !self.quiescing
        self.afterExchange(connection, keepAlive: keepAlive)
    }

    /// Answers a request whose response has not started with the proxy's own error, and ends its exchange.
    private func fail(_ connection: Connection, status: HTTPResponseStatus, reason: String) {
        guard let exchange = connection.exchange else { return }
        self.closeUpstream(connection)
        self.consumeRequestHead(connection)
        exchange.status = Int(status.code)
        // (Interim heads still in `out` are dropped: the answer replaces the response.)
        self.out.clear()
        let keepAlive = exchange.clientKeepAlive && !connection.closeWhenIdle && !self.quiescing
        LocalAnswer.write(status: status, reason: reason, keepAlive: keepAlive, into: &self.out)
        guard self.sendOut(connection, toUpstream: false) else {
            self.endExchange(connection, status: exchange.status)
            return self.finish(connection)
        }
        self.endExchange(connection, status: exchange.status)
        self.afterExchange(connection, keepAlive: keepAlive)
    }

    /// Gives back what an exchange held and records it (metrics, access log).
    private func endExchange(_ connection: Connection, status: Int) {
        guard let (exchange, runtime) = self.releaseExchange(connection) else { return }
        let now = NIODeadline.now()
        connection.requestCounters?.count(status: status)
        runtime.metrics.requestDuration.recordNanoseconds((now - exchange.started).nanoseconds)
        ProxyHandler.logAccess(
            runtime: runtime, listener: connection.listener, clientIP: connection.clientIP, exchange: exchange, status: status)
        self.requests.add(1, ordering: .relaxed)
        connection.idleSince = now.uptimeNanoseconds
    }

    private func afterExchange(_ connection: Connection, keepAlive: Bool) {
        connection.responseHead = nil
        connection.framing = .none
        if keepAlive {
            connection.phase = .idle
            connection.headStarted = (connection.inbound?.readableBytes ?? 0) > 0 ? Self.now() : 0
            self.processInbound(connection)
        } else {
            connection.phase = .closing
            if connection.toClient == nil, connection.heldForClient == nil {
                self.finish(connection)
            } else {
                self.refresh(connection)
            }
        }
    }

    /// Undoes a request that was routed but not answered (it goes to NIO, which routes it again).
    private func undo(_ connection: Connection) {
        guard self.releaseExchange(connection) != nil else { return }
        connection.phase = .idle
        connection.scanned = 0
    }

    /// Takes the exchange in flight off the connection and gives back what it held (its backend slot, its key's lease,
    /// to the generation it was routed with); nil when there is none.
    private func releaseExchange(_ connection: Connection) -> (Exchange, ProxyRuntime)? {
        guard let exchange = connection.exchange else { return nil }
        let runtime = connection.exchangeRuntime ?? self.generation.runtime
        connection.exchange = nil
        connection.exchangeRuntime = nil
        connection.observer = nil
        exchange.backend.release()
        if let key = exchange.key { runtime.directory.releaseLease(key: key) }
        return (exchange, runtime)
    }

    /// The current request's head is answered: drop it from `inbound`.
    private func consumeRequestHead(_ connection: Connection) {
        guard connection.headLength > 0 else { return }
        connection.inbound?.moveReaderIndex(forwardBy: connection.headLength)
        connection.headLength = 0
        if connection.inbound?.readableBytes == 0 { connection.inbound!.clear() }
    }

    // MARK: Writing

    /// Sends `out` to the client or the backend: what the socket does not take is kept, and written when it has
    /// room. False when the socket failed.
    private func sendOut(_ connection: Connection, toUpstream: Bool) -> Bool {
        defer { self.out.clear() }
        self.sentInBatch = true
        let fd = toUpstream ? connection.upstreamFD : connection.clientFD
        guard fd >= 0 else { return false }
        if !toUpstream {
            if connection.heldForClient != nil {
                guard self.writeHeld(connection) else { return false }
            } else if connection.toClient == nil, self.out.readableBytes <= Self.coalescedBodyLimit {
                let start = self.held.writerIndex
                self.held.writeBuffer(&self.out)
                connection.heldForClient = start..<self.held.writerIndex
                self.heldConnections.append(connection)
                return true
            }
        }
        if toUpstream ? connection.toUpstream != nil : connection.toClient != nil {
            // Behind bytes already waiting.
            if toUpstream { connection.toUpstream!.writeBuffer(&self.out) } else { connection.toClient!.writeBuffer(&self.out) }
            return true
        }
        let count = self.out.readableBytes
        let written = self.out.withUnsafeReadableBytes { cproxy_send_nowait(fd, $0.baseAddress, UInt($0.count)) }
        if written == count { return true }
        guard written >= 0 || written == -Int(EAGAIN) else { return false }
        var rest = self.allocator.buffer(capacity: count - max(written, 0))
        self.out.moveReaderIndex(forwardBy: max(written, 0))
        rest.writeBuffer(&self.out)
        if toUpstream { connection.toUpstream = rest } else { connection.toClient = rest }
        self.refresh(connection)
        return true
    }

    /// Writes what waits for the client or the backend; false when the connection (or the backend's) ended.
    private func flush(_ connection: Connection, toUpstream: Bool) -> Bool {
        guard var pending = toUpstream ? connection.toUpstream : connection.toClient else { return true }
        let fd = toUpstream ? connection.upstreamFD : connection.clientFD
        let written = pending.withUnsafeReadableBytes { cproxy_send_nowait(fd, $0.baseAddress, UInt($0.count)) }
        if written < 0 && written != -Int(EAGAIN) {
            if toUpstream { self.upstreamClosed(connection) } else { self.abort(connection) }
            return false
        }
        pending.moveReaderIndex(forwardBy: max(written, 0))
        let rest = pending.readableBytes > 0 ? pending : nil
        if toUpstream { connection.toUpstream = rest } else { connection.toClient = rest }
        if rest == nil, !toUpstream {
            self.written(connection)
            return connection.slot >= 0
        }
        self.refresh(connection)
        return true
    }

    /// Everything for the client is written: a closing connection closes, an idle one serves what waits behind.
    private func written(_ connection: Connection) {
        switch connection.phase {
        case .closing: self.finish(connection)
        case .idle where (connection.inbound?.readableBytes ?? 0) > 0: self.processInbound(connection)
        default: self.refresh(connection)
        }
    }

    /// Writes what was held for the client of `connection` (see `writeHeld()`); what the socket does not take waits
    /// for it to have room. False when the socket failed.
    private func writeHeld(_ connection: Connection) -> Bool {
        guard let range = connection.heldForClient else { return true }
        connection.heldForClient = nil
        let written = self.held.withUnsafeReadableBytes { raw in
            cproxy_send_nowait(connection.clientFD, raw.baseAddress! + range.lowerBound, UInt(range.count))
        }
        return self.heldWritten(connection, range, written)
    }

    /// What a send of the answer held for `connection` (`range` of `held`) wrote, bytes or -errno: what the socket did
    /// not take waits for it to have room. False when the socket failed.
    private func heldWritten(_ connection: Connection, _ range: Range<Int>, _ written: Int) -> Bool {
        if written == range.count { return true }
        guard written >= 0 || written == -Int(EAGAIN) else { return false }
        var rest = self.allocator.buffer(capacity: range.count - max(written, 0))
        _ = self.held.withUnsafeReadableBytes { raw in
            rest.writeBytes(UnsafeRawBufferPointer(rebasing: raw[(range.lowerBound + max(written, 0))..<range.upperBound]))
        }
        connection.toClient = rest
        self.refresh(connection)
        return true
    }

    /// The end of a batch: the answers held for clients are written now, together: one system call for all of them
    /// where the kernel allows it (`SendBatch`). Holding them until every ready descriptor was served sends them
    /// together: a client woken by one (on a shared machine, the load generator on this CPU) finds the others ready as
    /// well, instead of being woken, and preempting this thread, once per answer while ready work waits behind it.
    /// Requests to backends are not held: that measured no better, and it delays them. Measured in
    /// docs/benchmarks.md, "Twelfth session" and "Sixteenth session".
    private func writeHeld() {
        guard !self.heldConnections.isEmpty else { return }
        // In rounds: serving a request that waited behind an answer may hold another, sent in the next round.
        var start = 0
        while start < self.heldConnections.count {
            let end = min(self.heldConnections.count, start + self.sendBatch.capacity)
            self.sendBatch.clear()
            self.heldBatch.removeAll(keepingCapacity: true)
            self.held.withUnsafeReadableBytes { raw in
                for connection in self.heldConnections[start..<end] {
                    // (A connection is listed again when it held a second answer after its first was written.)
                    guard connection.slot >= 0, let range = connection.heldForClient else { continue }
                    connection.heldForClient = nil
                    _ = self.sendBatch.append(
                        fd: connection.clientFD, bytes: raw.baseAddress! + range.lowerBound, count: range.count)
                    self.heldBatch.append((connection, range))
                }
                self.sendBatch.run()
            }
            for (index, (connection, range)) in self.heldBatch.enumerated() where connection.slot >= 0 {
                if !self.heldWritten(connection, range, self.sendBatch.result(index)) {
                    self.abort(connection)
                } else if connection.toClient == nil {
                    self.written(connection)
                }
            }
            start = end
        }
        self.sendBatch.clear()
        self.heldBatch.removeAll(keepingCapacity: true)
        self.heldConnections.removeAll(keepingCapacity: true)
        self.held.clear()
    }

    // MARK: Timers

    /// Every 100 ms while connections are served: idle keep-alive connections past `idle_keep_alive` close, heads
    /// slower than `request_header` get a 408, responses whose head is later than `upstream_response_header` a 504,
    /// and a connection idle for `upstream_idle` lets its backend connection go (as an idle pooled one would be
    /// closed): an idle client does not hold a backend socket, its next request goes to NIO.
    private func sweep() {
        let now = Self.now()
        let timeouts = self.generation.runtime.config.timeouts
        let idle = UInt64(max(timeouts.idleKeepAlive.nanoseconds, 0))
        let head = UInt64(max(timeouts.requestHeader.nanoseconds, 0))
        let upstreamIdle = UInt64(max(timeouts.upstreamIdle.nanoseconds, 0))
        for connection in self.connections.all {
            switch connection.phase {
            case .idle where connection.headStarted != 0:
                if now &- connection.headStarted >= head { self.headTimedOut(connection) }
            case .idle:
                if now &- connection.idleSince >= idle {
                    self.finish(connection)
                } else if connection.upstreamFD >= 0, now &- connection.idleSince >= upstreamIdle {
                    self.closeUpstream(connection)
                    self.refresh(connection)
                }
            case .awaitingResponse:
                if now >= connection.responseDue {
                    self.generation.runtime.metrics.countUpstreamError(.responseTimeout)
                    self.out.clear()
                    self.fail(connection, status: .gatewayTimeout, reason: "gateway timeout: backend did not answer in time")
                }
            case .body, .closing:
                break
            }
        }
        if self.connections.releaseIfEmpty() {
            self.nextSweep = .max
        } else {
            self.nextSweep = now + Self.sweepInterval
        }
    }

    /// As `RequestHeadTimer`: a head that did not complete in time gets a 408, and the connection closes.
    private func headTimedOut(_ connection: Connection) {
        let body = "request timeout: request head not received in time\n"
        self.out.clear()
        self.out.writeString(
            "HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: \(body.utf8.count)\r\n"
                + "Connection: close\r\n\r\n" + body)
        connection.phase = .closing
        guard self.sendOut(connection, toUpstream: false), connection.toClient != nil else { return self.finish(connection) }
        self.refresh(connection)
    }

    // MARK: Ending connections

    /// Gives the client connection back to NIO with its unanswered bytes; the backend connection closes.
    private func giveBack(_ connection: Connection) {
        guard connection.slot >= 0 else { return }
        // An answer held for this batch goes out first: the bytes NIO writes next come after it.
        guard self.writeHeld(connection), connection.toClient == nil else { return self.abort(connection) }
        _ = cproxy_epoll_ctl(self.epoll, 2, connection.clientFD, 0, 0)
        self.closeUpstream(connection)
        self.release(connection)
        self.handedBack.add(1, ordering: .relaxed)
        let unread = connection.inbound.flatMap { $0.readableBytes > 0 ? $0 : nil }
        connection.inbound = nil
        connection.closed = nil
        connection.handBack(connection.clientFD, unread)
    }

    /// The client went away, a socket failed, or shutdown ended the grace period: an exchange in flight is logged as
    /// 499 (as nginx does) unless its response was complete, and the connection closes.
    private func abort(_ connection: Connection) {
        if connection.exchange != nil {
            self.closeUpstream(connection)
            self.endExchange(connection, status: 499)
        }
        self.finish(connection)
    }

    /// Closes both sockets and frees the slot.
    private func finish(_ connection: Connection) {
        guard connection.slot >= 0 else { return }
        _ = self.writeHeld(connection)
        if connection.exchange != nil {
            self.closeUpstream(connection)
            self.endExchange(connection, status: 499)
        }
        self.closeUpstream(connection)
        cproxy_close(connection.clientFD)  // also leaves the epoll set
        self.release(connection)
        let closed = connection.closed
        connection.closed = nil
        closed?()
    }

    private func release(_ connection: Connection) {
        self.connections.remove(connection.slot)
        connection.slot = -1
        connection.toClient = nil
        connection.heldForClient = nil
        connection.toUpstream = nil
        connection.responseHead = nil
        self.live.subtract(1, ordering: .relaxed)
    }

    private func closeUpstream(_ connection: Connection) {
        guard connection.upstreamFD >= 0 else { return }
        cproxy_close(connection.upstreamFD)
        connection.upstreamFD = -1
        connection.upstreamBackend = nil
        connection.toUpstream = nil
        connection.interest.upstream = 0
    }

    // MARK: Small helpers

    /// Brings each side's epoll interest in line with the connection's state. The client is read while idle, and
    /// while a request is in flight up to one head's worth of bytes behind it (not after it ended its side, not while
    /// closing); the backend is read while the client has nothing pending. A side is watched for writability while
    /// bytes wait for it. A side with no interest leaves the epoll set (a hang-up would wake the thread in a loop).
    private func refresh(_ connection: Connection) {
        guard connection.slot >= 0 else { return }
        let limit = self.generation.runtime.config.limits.maxHeaderBytes
        var client: UInt32 = 0
        if !connection.clientEnded, connection.phase != .closing,
            (connection.phase == .idle && connection.toClient == nil) || (connection.inbound?.readableBytes ?? 0) <= limit
        {
            client |= CPROXY_EV_IN | CPROXY_EV_RDHUP
        }
        if connection.toClient != nil { client |= CPROXY_EV_OUT }
        self.setInterest(connection.clientFD, slot: connection.slot, side: 0, from: connection.interest.client, to: client)
        connection.interest.client = client
        if connection.upstreamFD >= 0 {
            var upstream: UInt32 = 0
            if connection.toClient == nil { upstream |= CPROXY_EV_IN | CPROXY_EV_RDHUP }
            if connection.toUpstream != nil { upstream |= CPROXY_EV_OUT }
            self.setInterest(connection.upstreamFD, slot: connection.slot, side: 1, from: connection.interest.upstream, to: upstream)
            connection.interest.upstream = upstream
        }
    }

    private func setInterest(_ fd: Int32, slot: Int, side: UInt64, from old: UInt32, to new: UInt32) {
        guard old != new else { return }
        let token = UInt64(slot) << 1 | side
        if new == 0 {
            _ = cproxy_epoll_ctl(self.epoll, 2, fd, 0, 0)
        } else {
            _ = cproxy_epoll_ctl(self.epoll, old == 0 ? 1 : 3, fd, new, token)
        }
    }

    /// The same backend as the one whose connection is held: the same object, or (after a reload made new ones) the
    /// same id and address.
    private static func sameBackend(_ a: Backend, _ b: Backend) -> Bool {
        a === b || (a.id == b.id && a.config.host == b.config.host && a.config.port == b.config.port)
    }

    /// The clock `NIODeadline` reads (an exchange's start is one of these).
    private static func now() -> UInt64 { RelayThreadCore<Command>.now() }
}
