import NIOCore
import NIOHTTP1
import NIOPosix

/// Why a connection to a backend could not be had. Maps to the status the client sees.
enum UpstreamConnectError: Error {
    case timedOut
    case failed(Error)

    /// Records a failed lease (backend health, metrics, log) and says how the client is answered. Both data paths
    /// (`ProxyHandler`, `FastPathHandler`) answer the same.
    func recordAndAnswer(backend: Backend, runtime: ProxyRuntime) -> (status: HTTPResponseStatus, reason: String) {
        backend.recordConnectFailure()
        switch self {
        case .timedOut:
            runtime.metrics.countUpstreamError(.connectTimeout)
            return (.gatewayTimeout, "gateway timeout: backend did not accept the connection in time")
        case .failed(let error):
            runtime.metrics.countUpstreamError(.connectFailed)
            runtime.logger.warning("backend connection failed", metadata: ["backend": "\(backend.id)", "error": "\(error)"])
            return (.badGateway, "bad gateway: backend unreachable")
        }
    }
}

/// Keep-alive connections to backends, one pool per event loop so a request and its upstream connection share a
/// thread and never hop (the way Envoy and Pingora keep per-worker pools).
///
/// Idle connections are kept most-recently-used first: the warmest connection is the least likely to have been
/// closed by the backend's own keep-alive timer.
final class UpstreamPool {
    struct Settings {
        var connectTimeout: TimeAmount
        var idleTimeout: TimeAmount
        var maxIdlePerBackend: Int
    }

    private struct IdleEntry {
        let connection: UpstreamConnection
        /// When the connection went idle; a periodic sweep closes those idle longer than `idleTimeout`. (One timer
        /// per pool instead of one per release: a keep-alive request then costs no timer at all here.)
        let since: NIODeadline
    }

    /// One backend's idle connections, most recently used last. A class so the per-request pop and push mutate it
    /// in place after a plain dictionary read: mutating an array inside a `Dictionary` goes through the subscript's
    /// `_modify` coroutine, which allocated its frame on the heap on every request (heaptrack, docs/benchmarks.md).
    private final class IdleList {
        var entries: [IdleEntry] = []
    }

    let eventLoop: EventLoop
    /// Replaced on reload; applies to connections opened and released from then on.
    var settings: Settings
    /// Keyed by the `Backend` object, not its id: a reload builds new `Backend`s, and one whose id stayed but whose
    /// address changed must not be given connections to the old address. (Each entry's connection holds its backend,
    /// so the identifier of a list with entries cannot name another object; an empty list left under a freed
    /// backend's identifier holds nothing to hand out.)
    private var idle: [ObjectIdentifier: IdleList] = [:]
    private(set) var connectsOpened = 0
    private var closed = false

    init(eventLoop: EventLoop, settings: Settings) {
        self.eventLoop = eventLoop
        self.settings = settings
    }

    /// A connection to `backend`: a pooled one when one is open, else a new one. `completion` runs on this loop.
    func lease(
        _ backend: Backend,
        allowPooled: Bool = true,
        completion: @escaping (Result<UpstreamConnection, UpstreamConnectError>) -> Void
    ) {
        self.eventLoop.preconditionInEventLoop()
        if allowPooled, let connection = self.popIdle(backend) {
            completion(.success(connection))
            return
        }
        self.connect(backend, completion: completion)
    }

    /// Returns a connection whose last exchange ended cleanly; closes it instead when the pool is full.
    /// `now` saves a clock read when the caller has just read it.
    func release(_ connection: UpstreamConnection, now: NIODeadline = .now()) {
        self.eventLoop.preconditionInEventLoop()
        connection.sink = nil
        connection.rawSink = nil
        connection.holdReads(false)
        let id = ObjectIdentifier(connection.backend)
        let existing = self.idle[id]
        guard !self.closed, connection.channel.isActive,
            (existing?.entries.count ?? 0) < self.settings.maxIdlePerBackend
        else {
            connection.channel.close(promise: nil)
            return
        }
        connection.idleIn = self
        let list: IdleList
        if let existing {
            list = existing
        } else {
            list = IdleList()
            self.idle[id] = list
        }
        list.entries.append(IdleEntry(connection: connection, since: now))
        self.scheduleSweepIfNeeded()
    }

    /// Closes every idle connection (shutdown or reload).
    func closeAll() {
        self.closed = true
        self.sweep?.cancel()
        self.sweep = nil
        let all = self.idle.values.flatMap { $0.entries }
        self.idle.removeAll()
        for entry in all {
            entry.connection.idleIn = nil
            entry.connection.channel.close(promise: nil)
        }
    }

    var idleCount: Int { self.idle.values.reduce(0) { $0 + $1.entries.count } }

    private var sweep: Scheduled<Void>?

    /// Runs while connections are idle, at a quarter of the idle timeout: a connection closes between 1 and 1.25
    /// idle timeouts after its last use.
    private func scheduleSweepIfNeeded() {
        guard self.sweep == nil, !self.closed else { return }
        let interval = TimeAmount.nanoseconds(max(self.settings.idleTimeout.nanoseconds / 4, 1_000_000))
        // A strong capture: `[weak self]` would give the pool a side table, and every retain and release of it on
        // the request path would take the runtime's slow path. The task holds the pool until it runs or `closeAll`
        // cancels it (or the loop shuts down and drops it).
        self.sweep = self.eventLoop.assumeIsolated().scheduleTask(in: interval) { [self] in
            self.sweep = nil
            let cutoff = NIODeadline.now() - self.settings.idleTimeout
            for (id, list) in self.idle {
                let entries = list.entries
                let (stale, fresh) = (entries.filter { $0.since <= cutoff }, entries.filter { $0.since > cutoff })
                guard !stale.isEmpty else { continue }
                list.entries = fresh
                if fresh.isEmpty { self.idle[id] = nil }
                for entry in stale {
                    entry.connection.idleIn = nil
                    entry.connection.channel.close(promise: nil)
                }
            }
            if self.idleCount > 0 { self.scheduleSweepIfNeeded() }
        }
    }

    /// An idle pooled connection to `backend`, if there is one: the synchronous half of `lease`, which the fast path
    /// calls first so the common case allocates no completion closure.
    func leaseIdle(_ backend: Backend) -> UpstreamConnection? {
        self.eventLoop.preconditionInEventLoop()
        return self.popIdle(backend)
    }

    private func popIdle(_ backend: Backend) -> UpstreamConnection? {
        let id = ObjectIdentifier(backend)
        guard let list = self.idle[id] else { return nil }
        while let entry = list.entries.popLast() {
            entry.connection.idleIn = nil
            if entry.connection.channel.isActive {
                return entry.connection
            }
        }
        return nil
    }

    func remove(_ connection: UpstreamConnection) {
        guard let list = self.idle[ObjectIdentifier(connection.backend)],
            let index = list.entries.firstIndex(where: { $0.connection === connection })
        else { return }
        list.entries.remove(at: index)
    }

    private func connect(
        _ backend: Backend,
        completion: @escaping (Result<UpstreamConnection, UpstreamConnectError>) -> Void
    ) {
        self.connectsOpened += 1
        let bootstrap = ClientBootstrap(group: self.eventLoop)
            .connectTimeout(self.settings.connectTimeout)
            .channelOption(.socketOption(.so_reuseaddr), value: 1)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelOption(.recvAllocator, value: ReadBuffers.backendAllocator)
        bootstrap.connect(to: backend.address).assumeIsolated().whenComplete { result in
            switch result {
            case .failure(ChannelError.connectTimeout):
                completion(.failure(.timedOut))
            case .failure(let error):
                completion(.failure(.failed(error)))
            case .success(let channel):
                do {
                    completion(.success(try Self.configure(channel, backend: backend)))
                } catch {
                    channel.close(promise: nil)
                    completion(.failure(.failed(error)))
                }
            }
        }
    }

    private static func configure(_ channel: Channel, backend: Backend) throws -> UpstreamConnection {
        var encoderConfiguration = HTTPRequestEncoder.Configuration()
        // Framing is decided by ForwardingHeaders, which knows how the client framed the body.
        encoderConfiguration.automaticallySetFramingHeaders = false
        let encoder = HTTPRequestEncoder(configuration: encoderConfiguration)
        let decoder = ByteToMessageHandler(
            HTTPResponseDecoder(leftOverBytesStrategy: .forwardBytes, informationalResponseStrategy: .forward)
        )
        let handler = UpstreamHandler()
        let tap = RawUpstreamTap()
        let sync = channel.pipeline.syncOperations
        // The codec joins between the tap and the handler when the full path first leases the connection
        // (`UpstreamConnection.sink`).
        try sync.addHandler(tap)
        try sync.addHandler(handler)
        return UpstreamConnection(
            channel: channel, backend: backend, handler: handler, tap: tap, encoder: encoder, decoder: decoder)
    }
}
