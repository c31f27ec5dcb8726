import CProxySys
import Foundation
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Serves established keep-alive HTTP/1.1 connections on the proxy's own threads (`threads.http_relay`), owning the
/// client's socket and its backend connection's socket instead of two NIO channels.
///
/// Why: on NIO's channels a keep-alive request costs about 5 µs of user CPU, a third of it in NIO's per-event work
/// (the selector, the channel's read path, the pipeline); the same per-request work on plain epoll threads costs about
/// 3 µs (`raw-relay`, docs/benchmarks.md). Throughput on a small machine follows CPU per request, so this is where the
/// HTTP numbers against HAProxy and nginx are decided.
///
/// How a connection gets here (`FastPathHandler`): a plain (non-TLS) connection whose last two fast-path exchanges ended
/// cleanly on keyed or named-backend routes, with nothing read ahead and nothing queued in NIO on either side, moves with the
/// backend connection it just used: both descriptors are duplicated and both channels closed (as tunnels move to
/// `TunnelRelay`). From then on its shard (an epoll instance, one per event loop by default, run by whichever relay
/// thread is free) does what the fast path did per request: the head scan, the routing script (on the shard's own
/// policy instance: a Lua state is used by one thread at a time), the owner lookup, the head rewrites, the body relay
/// by its framing, the response-head deadline, the keep-alive and head timers, metrics and the access log.
///
/// Anything else goes back to NIO before a request is sent (`HandBack`): a head that is not plain (a body, `Upgrade`,
/// `Expect`, anything the strict scanner refuses), a decision that is not a plain forward (a local answer, rewrites,
/// `need_body`, a response body for `on_response`, a pool-balanced request), an owner the shared store must be asked for, a backend other
/// than the one whose connection the shard holds, or no backend connection at all (the backend closed it). The bytes
/// read so far are given back with the socket, and the connection then stays on NIO for its life, so a connection that
/// keeps needing NIO does not move back and forth. A request whose backend connection turns out to be closed by the
/// backend before any answer goes back the same way, and NIO sends it again (the stale keep-alive retry).
final class HTTPRelay: Sendable {
    let shards: [HTTPRelayShard]
    /// The queue of shards with work: an epoll instance holding each shard's own epoll instance with `EPOLLONESHOT`,
    /// so a shard with ready descriptors is handed to one thread, and to no other until that thread re-arms it.
    private let queue: Int32
    /// Readable once the threads are to end (`stop()`).
    private let exit: Int32
    private let threadsLeft: Atomic<Int>
    private let stopped = Atomic<Bool>(false)

    private static var exitToken: UInt64 { .max }

    /// Makes `count` shards, routing with `generations[i]` (one per shard), and `count` threads that serve them from
    /// one queue; with `cpus`, thread `i` is bound to `cpus[i]`, wrapping round when there are more threads than CPUs
    /// listed (`threads.http_relay_count` above the loop count). When a shard cannot be made, those made before it
    /// release their descriptors.
    ///
    /// Why one queue: with a thread per shard, a request waits for its own shard's thread even while another thread
    /// has nothing to do. On a machine shared with busy neighbours (the backends, or in the benchmark the load
    /// generator and the origin), whichever thread's CPU they use at the moment falls behind, and its requests made
    /// the latency tail (docs/benchmarks.md, "Seventeenth session"). Here a shard with work goes to whichever thread
    /// is free.
    init(
        count: Int, cpus: [Int?] = [], generations: [HTTPRelayGeneration], ioUring: Bool = true,
        yieldAfterBatch: Bool = true
    ) throws {
        precondition(generations.count >= max(count, 1))
        let shards = try makeRelayShards(
            count: count,
            make: { try HTTPRelayShard(generation: generations[$0], ioUring: ioUring) },
            discard: { $0.discard() })
        let queue = cproxy_epoll_create()
        let exit = queue >= 0 ? cproxy_eventfd() : -1
        var registered = exit >= 0 && cproxy_epoll_ctl(queue, 1, exit, CPROXY_EV_IN, Self.exitToken) == 0
        for (index, shard) in shards.enumerated() where registered {
            registered = cproxy_epoll_ctl(queue, 1, shard.readiness, CPROXY_EV_IN | CPROXY_EV_ONESHOT, UInt64(index)) == 0
        }
        guard registered else {
            let error = IOError(errnoCode: errno, reason: "epoll_ctl")
            if queue >= 0 { cproxy_close(queue) }
            if exit >= 0 { cproxy_close(exit) }
            for shard in shards { shard.discard() }
            throw error
        }
        self.shards = shards
        self.queue = queue
        self.exit = exit
        self.threadsLeft = Atomic(shards.count)
        for (index, shard) in shards.enumerated() {
            if let refused = shard.prepare(), index == 0 {
                generations[0].runtime.logger.notice(
                    "io_uring is not available: the HTTP relay sends with send(2)",
                    metadata: ["error": "\(String(cString: strerror(refused)))"])
            }
        }
        for index in shards.indices {
            let cpu = cpus.isEmpty ? nil : cpus[index % cpus.count]
            RelayThreadCore<Never>.startThread(name: "ott-http-\(index)", cpu: cpu) { [self] in
                self.serve(yieldAfterBatch: yieldAfterBatch)
            }
        }
    }

    /// A relay thread: takes a shard with work from the queue, runs it (`HTTPRelayShard.step`), puts it back, and
    /// yields its CPU when it sent anything (`threads.yield_after_batch`), until `stop()`.
    ///
    /// Why yield: the clients and backends those sends woke may be waiting for this very CPU (the load generator and
    /// the origin on a shared machine; backends on the same host). Under load the queue has work at once, so without
    /// a yield the thread runs on, and they get the CPU only when the scheduler preempts it at the end of its slice,
    /// a millisecond or more later. The scheduler keeps the thread's share of the CPU (only its place in the queue
    /// moves), and where nothing else wants the CPU the call returns at once (about 0.5 µs). Measured in
    /// docs/benchmarks.md, "Sixteenth session": 50k against 41k requests/s, p99 3.18 against 3.65 ms, CPU per request
    /// 15.7 against 19.8 µs.
    private func serve(yieldAfterBatch: Bool) {
        var events: UInt32 = 0
        var token: UInt64 = 0
        while true {
            guard cproxy_epoll_wait(self.queue, &events, &token, 1, -1) == 1 else { continue }  // (EINTR)
            if token == Self.exitToken { break }
            let shard = self.shards[Int(token)]
            let (running, sent) = shard.step()
            // A stopped shard closed its epoll instance, which leaves the queue with it.
            guard running else { continue }
            _ = cproxy_epoll_ctl(self.queue, 3, shard.readiness, CPROXY_EV_IN | CPROXY_EV_ONESHOT, token)
            if sent && yieldAfterBatch { sched_yield() }
        }
        if self.threadsLeft.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 {
            cproxy_close(self.queue)
            cproxy_close(self.exit)
        }
    }

    /// Connections the shards serve now.
    var count: Int { self.shards.reduce(0) { $0 + $1.live.load(ordering: .relaxed) } }
    /// Connections moved here since the start.
    var adoptedTotal: Int { self.shards.reduce(0) { $0 + $1.adopted.load(ordering: .relaxed) } }
    /// Connections given back to NIO since the start.
    var handedBackTotal: Int { self.shards.reduce(0) { $0 + $1.handedBack.load(ordering: .relaxed) } }
    /// Requests the shards answered since the start.
    var requestsTotal: Int { self.shards.reduce(0) { $0 + $1.requests.load(ordering: .relaxed) } }

    /// Shutdown begins: idle connections close now, busy ones after their response.
    func quiesce() {
        for shard in self.shards { shard.quiesce() }
    }

    /// Closes every connection and ends the threads.
    func stop() async {
        for shard in self.shards { await shard.stop() }
        // Once: the last thread out closes the descriptor. (It stays readable: every thread sees it.)
        if !self.stopped.exchange(true, ordering: .acquiringAndReleasing) { cproxy_eventfd_signal(self.exit) }
    }
}

/// One configuration generation as a relay shard routes with it: the runtime, and routing policies made for the shard
/// alone (used by the thread running the shard only, once handed over).
final class HTTPRelayGeneration: @unchecked Sendable {
    let runtime: ProxyRuntime
    let policies: [String: RoutingPolicy]

    init(runtime: ProxyRuntime, policies: [String: RoutingPolicy]) {
        self.runtime = runtime
        self.policies = policies
    }
}

/// A keep-alive connection and the backend connection it moves with. Created on an event loop by the fast path, then
/// owned by its shard: every mutable field is touched only by the thread running the shard (one at a time).
final class RelayedHTTPConnection: @unchecked Sendable {
    /// Gives the client socket back to NIO with the bytes read from it and not yet answered (on the thread running the
    /// shard: the closure hops to the connection's event loop). The connection's place in the count goes with it.
    typealias HandBack = @Sendable (_ clientFD: Int32, _ unread: ByteBuffer?) -> Void
    /// The connection closed here (called once, on the thread running the shard).
    typealias Closed = @Sendable () -> Void

    enum Phase {
        /// Waiting for (or reading) a request head.
        case idle
        /// The request went to the backend; its response head has not (fully) arrived.
        case awaitingResponse
        /// Relaying the response body.
        case body
        /// The last response is written or being written; the connection closes once nothing is pending.
        case closing
    }

    let clientFD: Int32
    let listener: ListenerContext
    let clientIP: String
    /// This listener's request counters (`ProxyMetrics` is shared by every generation, so they stay valid).
    let requestCounters: ProxyMetrics.RequestCounters?
    var upstreamFD: Int32
    /// The backend whose connection `upstreamFD` is.
    var upstreamBackend: Backend?
    let handBack: HandBack
    var closed: Closed?

    var slot = -1
    var phase = Phase.idle
    /// Client bytes not answered yet: the current request's head stays here (for a hand-back) until its response
    /// starts; `headLength` says how long it is.
    var inbound: ByteBuffer?
    var headLength = 0
    var scanned = 0
    /// A response head split over reads.
    var responseHead: ByteBuffer?
    var toClient: ByteBuffer?
    /// Where the bytes for the client held until the end of the shard's current batch are in its buffer
    /// (`HTTPRelayShard.held`).
    var heldForClient: Range<Int>?
    var toUpstream: ByteBuffer?
    var exchange: Exchange?
    /// The generation the exchange in flight was routed with: its lease is given back to that one's directory.
    var exchangeRuntime: ProxyRuntime?
    /// The exchange's policy and request when the policy sees response heads (`on_response`).
    var observer: (policy: RoutingPolicy, request: RouteRequest)?
    var framing = ResponseBodyFraming.none
    var trailingGarbage = false
    /// The client ended its side, or shutdown asked: close after the current response.
    var closeWhenIdle = false
    var clientEnded = false
    /// Uptime nanoseconds: when the current head's first byte arrived (0: none yet), when the connection became idle,
    /// when the response head is due.
    var headStarted: UInt64 = 0
    var idleSince: UInt64 = 0
    var responseDue: UInt64 = 0
    var interest: (client: UInt32, upstream: UInt32) = (0, 0)

    init(
        clientFD: Int32, upstreamFD: Int32, upstreamBackend: Backend, listener: ListenerContext, clientIP: String,
        requestCounters: ProxyMetrics.RequestCounters?, handBack: @escaping HandBack, closed: @escaping Closed
    ) {
        self.clientFD = clientFD
        self.requestCounters = requestCounters
        self.upstreamFD = upstreamFD
        self.upstreamBackend = upstreamBackend
        self.listener = listener
        self.clientIP = clientIP
        self.handBack = handBack
        self.closed = closed
    }
}
