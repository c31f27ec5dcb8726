import CProxySys
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import ServiceLifecycle
import UnixSignals
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Makes the routing policy for one listener on one event loop (policies are loop-confined; Lua states are too).
/// Called again for every reload; a throw fails the start or the reload, with the error reported.
public typealias RoutingPolicyFactory = @Sendable (ListenerConfig, EventLoop, RoutingEnvironment) throws -> RoutingPolicy

/// Why a reload was refused. The previous generation stays in force.
public struct ReloadError: Error, CustomStringConvertible, Sendable {
    public var description: String
}

/// The assembled proxy: listeners, the admin listener, per-loop upstream pools, and graceful shutdown.
///
/// Use it as a ServiceLifecycle `Service` (`run()` serves until graceful shutdown is triggered, then drains), or
/// drive it directly with `start()` and `shutdown()` (tests do).
public final class ProxyServer: Service, Sendable {
    /// Per-event-loop state: the upstream pool and the current generation's policies live on one loop and never
    /// cross it.
    final class LoopState {
        let pool: UpstreamPool
        var generation: LoopGeneration
        /// Closes this loop's idle tunnels.
        let tunnelIdle: TunnelIdleSweeper<TunnelHandler>
        /// Where the fast path builds forwarded request heads and client response heads, shared by every connection
        /// of this loop. A head is handed to a channel write as a copy; once that write is done (usually within the
        /// same flush) the loop's buffer is the only reference again, and `clear(minimumCapacity:)` keeps its
        /// storage: no allocation per head. A write still queued behind a slow socket keeps its bytes: `clear` then
        /// gives the loop fresh storage (ByteBuffer's copy-on-write), so no head is ever overwritten.
        var requestHeads = ByteBufferAllocator().buffer(capacity: 1024)
        var responseHeads = ByteBufferAllocator().buffer(capacity: 2048)
        /// Where this loop's established tunnels move (`threads.tunnel_relay`); nil keeps them on NIO channels.
        let relay: RelayLink?
        /// The fast path's writes that went to a socket directly (`DirectWriter`), to clients and to backends.
        var directWrites = DirectWriteCounts()
        /// Where this loop's established keep-alive HTTP connections move (`threads.http_relay`); nil keeps them here.
        let httpRelay: HTTPRelayLink?

        init(pool: UpstreamPool, generation: LoopGeneration, relay: RelayLink? = nil, httpRelay: HTTPRelayLink? = nil) {
            self.pool = pool
            self.generation = generation
            self.tunnelIdle = TunnelIdleSweeper(eventLoop: pool.eventLoop)
            self.relay = relay
            self.httpRelay = httpRelay
        }
    }

    /// A loop's way to the HTTP relay shards, the registry a moved connection keeps its place in, and the way back to
    /// this loop for a connection a shard gives back (`adoptBack`). Used on the loop's thread only.
    final class HTTPRelayLink {
        private let shards: [HTTPRelayShard]
        private var next: Int
        let connections: ConnectionRegistry
        let handBack: @Sendable (_ clientFD: Int32, _ unread: ByteBuffer?, _ listener: ListenerContext) -> Void

        /// Loop `index` starts at shard `index` (modulo their number) and goes round the shards.
        init(
            shards: [HTTPRelayShard], index: Int, connections: ConnectionRegistry,
            handBack: @escaping @Sendable (_ clientFD: Int32, _ unread: ByteBuffer?, _ listener: ListenerContext) -> Void
        ) {
            precondition(!shards.isEmpty)
            self.shards = shards
            self.next = index % shards.count
            self.connections = connections
            self.handBack = handBack
        }

        /// The shard the next moved connection goes to: in turn, so that connections are dealt out evenly whether
        /// there are as many shards as loops (`threads.http_relay_count`, the default), fewer, or more.
        func nextShard() -> HTTPRelayShard {
            defer { self.next = (self.next + 1) % self.shards.count }
            return self.shards[self.next]
        }
    }

    /// A loop's relay shard, and the registry a relayed tunnel keeps its connection's place in.
    struct RelayLink {
        let shard: RelayShard
        let connections: ConnectionRegistry
    }

    /// One configuration generation as one event loop sees it.
    final class LoopGeneration {
        let runtime: ProxyRuntime
        let policies: [String: RoutingPolicy]

        init(runtime: ProxyRuntime, policies: [String: RoutingPolicy]) {
            self.runtime = runtime
            self.policies = policies
        }

        func policy(for listener: String) -> RoutingPolicy {
            self.policies[listener] ?? StaticPoolPolicy(pool: "")
        }
    }

    private struct Started {
        var listenerChannels: [Channel]
        var adminChannel: Channel?
        var loopStates: [ObjectIdentifier: NIOLoopBound<LoopState>]
        var sweeper: RepeatedTask?
        var prober: RepeatedTask?
        var relay: TunnelRelay?
        var httpRelay: HTTPRelay?
    }

    private let current: RuntimeBox
    /// The newest generation: a reload sets it just before each loop and relay thread takes it, so for that moment
    /// new requests may still use the one before (see `generationInForce`).
    public var runtime: ProxyRuntime { self.current.get() }
    /// The newest generation every loop and relay thread has taken (a reload returns once it is this).
    public var generationInForce: Int { self.inForce.load(ordering: .acquiring) }
    private let inForce: Atomic<Int>
    private let reloading = Mutex(false)
    private let migrating = MigratingSet()
    /// The latest reconciliation probe results, by listener (admin `GET /reconciliation`).
    public let reconciliationReports = ReconciliationReports()
    /// SIGHUP, trapped from `start()` on when the server can reload, so a hangup that arrives before `run()` is
    /// reached is queued for it instead of killing the process (the default action).
    private let hangups = Mutex<UnixSignalsSequence?>(nil)
    /// Where `reload()` reads the configuration from (the CLI passes the file it was started with).
    private let configSource: (@Sendable () throws -> ProxyConfig)?
    private let group: EventLoopGroup
    private let ownsGroup: Bool
    /// The CPU each event loop was bound to by `threads.cpu_affinity: auto` (nil: not bound), in loop order; empty
    /// until `start()`, and when affinity is off or the loops are not the server's own.
    public var loopCPUs: [Int?] { self.pinnedCPUs.withLock { $0 } }
    private let pinnedCPUs = Mutex<[Int?]>([])
    private let policyFactory: RoutingPolicyFactory
    private let connections: ConnectionRegistry
    /// Open admin connections: closed with the admin listener (keep-alive ones would otherwise outlive the server
    /// when the event loops are not the server's own).
    private let adminConnections = ConnectionRegistry(limit: Int.max)
    private let started = Mutex<Started?>(nil)
    private let boundPorts = Mutex<[String: Int]>([:])
    private let boundAdminPort = Mutex<Int?>(nil)
    /// Health state across generations, active checks and DNS discovery (`BackendServices`).
    let backendServices: BackendServices

    /// - Parameters:
    ///   - group: the event loops to serve on; by default `threads.count` threads (one per core), bound to CPUs when
    ///     `threads.cpu_affinity` is `auto`, owned and shut down by the server. A given group is used as it is.
    ///   - policyFactory: the routing policy per listener; by default every request goes to the listener's pool.
    ///   - configSource: re-reads the configuration for `reload()` (SIGHUP, admin `POST /reload`).
    ///   - directory: where key ownership lives; by default in this process (`InMemoryOwnershipDirectory`).
    ///   - resolver: resolves `discovery.dns` names; by default `getaddrinfo` on NIO's thread pool.
    public init(
        config: ProxyConfig,
        logger: Logger = Logger(label: "ott-proxy"),
        accessLogger: Logger = Logger(label: "ott-proxy.access"),
        group: EventLoopGroup? = nil,
        policyFactory: RoutingPolicyFactory? = nil,
        configSource: (@Sendable () throws -> ProxyConfig)? = nil,
        resolver: BackendResolver? = nil,
        directory: OwnershipDirectory? = nil
    ) throws {
        let services = BackendServices(logger: logger, resolver: resolver)
        let table = try services.table(for: config)
        let metrics = ProxyMetrics(listeners: config.listeners.map(\.name))
        let runtime = ProxyRuntime(
            config: config, table: table, logger: logger, accessLogger: accessLogger, metrics: metrics,
            directory: directory ?? InMemoryOwnershipDirectory())
        services.committed(runtime)
        self.backendServices = services
        self.current = RuntimeBox(runtime)
        self.inForce = Atomic(runtime.generation)
        self.configSource = configSource
        self.ownsGroup = group == nil
        self.group = group ?? MultiThreadedEventLoopGroup(numberOfThreads: config.threads.resolvedCount)
        self.policyFactory = policyFactory ?? { listener, _, _ in StaticPoolPolicy(pool: listener.pool) }
        self.connections = ConnectionRegistry(limit: config.limits.maxConnections)
        // An owner change closes the key's tunnels to the previous owner, so clients reconnect to the new one.
        let current = self.current
        runtime.directory.onChange { change in
            let code = current.get().config.ownership.closeCode
            let closed = runtime.tunnels.close(key: change.key, onBackend: change.previous, code: code)
            if closed > 0 {
                runtime.logger.info(
                    "closed tunnels of a key that changed owner",
                    metadata: ["key": "\(change.key)", "from": "\(change.previous)", "to": "\(change.current ?? "-")",
                               "reason": "\(change.reason.rawValue)", "tunnels": "\(closed)"])
            }
        }
    }

    /// Stops placing new keys on a backend; with `migrate`, also moves its keys away: each key is released (its
    /// tunnels close with the configured code, and clients reconnect to a new owner), at `ownership.migrate_rate`.
    /// Returns false for an unknown backend.
    @discardableResult
    public func drain(backend id: String, migrate: Bool) -> Bool {
        let runtime = self.runtime
        guard let backend = runtime.table.backends[id] else { return false }
        runtime.drains.drain(id, migrate: migrate)
        backend.health.drain()
        runtime.logger.info("draining backend", metadata: ["backend": "\(id)", "migrate": "\(migrate)"])
        if migrate { self.startMigration(of: id) }
        return true
    }

    /// Undoes `drain(backend:migrate:)`: new keys may be placed on the backend again and a running migration stops
    /// after the key it is moving. Keys already moved stay where they are now. Returns false for a backend that is
    /// not in the current configuration (a removed backend stays drained until it is gone).
    @discardableResult
    public func undrain(backend id: String) -> Bool {
        let runtime = self.runtime
        guard let backend = runtime.table.backends[id] else { return false }
        runtime.drains.undrain(id)
        backend.health.undrain()
        runtime.logger.info("drain undone", metadata: ["backend": "\(id)"])
        return true
    }

    private func startMigration(of id: String) {
        // One migration per backend: a second drain (or a drain then a removal) must not double the rate.
        guard self.migrating.insert(id) else { return }
        let current = self.current
        let migrating = self.migrating
        Task {
            defer { migrating.remove(id) }
            // The backend's keys, listed once per batch rather than once per key: listing scans the whole table
            // under the directory's lock (about 1 ms for 100,000 keys).
            var batch: [String] = []
            while true {
                let runtime = current.get()
                // Undrained (`undrain(backend:)`): stop moving keys. A backend removed from the configuration is
                // migrated without a drain entry and cannot be undrained: its migration runs to the end (unless a
                // reload brings it back).
                guard runtime.drains.state(of: id)?.migrate == true || runtime.table.backends[id] == nil else {
                    runtime.logger.info("migration stopped: the drain was undone", metadata: ["backend": "\(id)"])
                    return
                }
                let interval = Duration.seconds(1.0 / max(runtime.config.ownership.migrateRate, 0.001))
                let code = runtime.config.ownership.closeCode
                if let key = Self.nextKey(ownedBy: id, from: &batch, in: runtime.directory) {
                    // Releasing publishes the change, which closes the key's tunnels on this backend.
                    runtime.directory.release(key: key)
                } else if let tunnel = runtime.tunnels.tunnels(onBackend: id).first {
                    tunnel.close(code)
                    runtime.tunnels.unregister(tunnel.id)
                } else {
                    runtime.logger.info("backend holds no keys and no tunnels", metadata: ["backend": "\(id)"])
                    return
                }
                try? await Task.sleep(for: interval)
            }
        }
    }

    /// The next key of `batch` that `backend` still owns (a batch is a snapshot: its keys may have moved or expired
    /// since), listing the backend's keys again when the batch runs out; nil when it owns none.
    static func nextKey(ownedBy backend: String, from batch: inout [String], in directory: OwnershipDirectory) -> String? {
        var listed = false
        while true {
            while let key = batch.popLast() {
                if directory.owner(of: key)?.backend == backend { return key }
            }
            if listed { return nil }
            batch = directory.keys(ownedBy: backend).reversed()
            listed = true
        }
    }

    /// The port each listener is bound to, by listener name (useful with port 0).
    public var listenerPorts: [String: Int] { self.boundPorts.withLock { $0 } }
    public var adminPort: Int? { self.boundAdminPort.withLock { $0 } }
    public var openConnections: Int { self.connections.count }
    /// Tunnels the relay threads carry now (`threads.tunnel_relay`).
    public var relayedTunnels: Int { self.started.withLock { $0?.relay?.count ?? 0 } }
    /// Tunnels handed to the relay threads since the start.
    public var relayedTunnelsTotal: Int { self.started.withLock { $0?.relay?.adoptedTotal ?? 0 } }
    /// Keep-alive HTTP connections the HTTP relay threads serve now (`threads.http_relay`).
    public var relayedHTTPConnections: Int { self.started.withLock { $0?.httpRelay?.count ?? 0 } }
    /// Connections moved to the HTTP relay threads since the start, given back to NIO since the start, and requests
    /// the relay threads answered.
    public var httpRelayCounts: (moved: Int, givenBack: Int, requests: Int) {
        self.started.withLock { started in
            guard let relay = started?.httpRelay else { return (0, 0, 0) }
            return (relay.adoptedTotal, relay.handedBackTotal, relay.requestsTotal)
        }
    }

    /// Connections moved to each HTTP relay shard since the start, in shard order (one entry per shard,
    /// `threads.http_relay_count`); empty when the relay is off or the server is not started.
    public var httpRelayMovedPerShard: [Int] {
        self.started.withLock { $0?.httpRelay?.shards.map { $0.adopted.load(ordering: .relaxed) } ?? [] }
    }

    /// The fast path's direct writes since the start, summed over the event loops (`DirectWriter`).
    public func directWriteCounts() async -> DirectWriteCounts {
        guard let loopStates = self.started.withLock({ $0?.loopStates }) else { return DirectWriteCounts() }
        var total = DirectWriteCounts()
        for (_, state) in loopStates {
            guard let counts = try? await state.eventLoop.submit({ state.value.directWrites }).get() else { continue }
            total.add(counts)
        }
        return total
    }

    /// Open client connections per event loop, in the group's order (a diagnostic: how `threads.accept` spread them).
    public func connectionsPerLoop() -> [Int] {
        let open = self.connections.all()
        return self.group.makeIterator().map { loop in open.filter { $0.eventLoop === loop }.count }
    }

    /// Binds every listener and the admin listener. Fails (and binds nothing) if any address is unusable.
    public func start() async throws {
        if self.configSource != nil, self.hangups.withLock({ $0 == nil }) {
            let hangups = await UnixSignalsSequence(trapping: .sighup)
            self.hangups.withLock { $0 = hangups }
        }
        let runtime = self.runtime
        let config = runtime.config
        if self.ownsGroup, config.threads.cpuAffinity == .auto {
            await self.pinLoops()
        }
        let settings = UpstreamPool.Settings(
            connectTimeout: config.timeouts.connect,
            idleTimeout: config.timeouts.upstreamIdle,
            maxIdlePerBackend: config.limits.maxIdleUpstreamPerBackend
        )
        let loopPolicies = try await self.makePolicies(for: runtime)
        // One tunnel relay thread per event loop, and `threads.http_relay_count` HTTP relay threads and shards (one per
        // loop by default); relay thread `i` is bound to loop `i`'s CPU when the loops are bound (HTTP relay threads
        // beyond the loops wrap round).
        let relay = config.threads.tunnelRelay
            ? try TunnelRelay(
                count: loopPolicies.count, cpus: self.loopCPUs, yieldAfterBatch: config.threads.yieldAfterBatch)
            : nil
        let httpRelay: HTTPRelay?
        let httpRelayCount = config.threads.resolvedHTTPRelayCount(loops: loopPolicies.count)
        do {
            httpRelay = config.threads.httpRelay
                ? try HTTPRelay(
                    count: httpRelayCount, cpus: self.loopCPUs,
                    generations: try self.makeRelayGenerations(for: runtime, count: httpRelayCount),
                    ioUring: config.threads.ioUring, yieldAfterBatch: config.threads.yieldAfterBatch)
                : nil
        } catch {
            await relay?.stop()
            throw error
        }
        runtime.logger.info(
            "threads started",
            metadata: [
                "event_loops": "\(loopPolicies.count)", "tunnel_relay_threads": "\(relay?.shards.count ?? 0)",
                "http_relay_threads": "\(httpRelay?.shards.count ?? 0)",
            ])
        let connections = self.connections
        var loopStates: [ObjectIdentifier: NIOLoopBound<LoopState>] = [:]
        do {
            for (index, (loop, policies)) in loopPolicies.enumerated() {
                let link = relay.map { RelayLink(shard: $0.shards[index % $0.shards.count], connections: connections) }
                let relayShards = httpRelay?.shards
                let handBack: @Sendable (Int32, ByteBuffer?, ListenerContext) -> Void = { [weak self] fd, unread, listener in
                    self?.adoptBack(fd, unread: unread, listener: listener, on: loop)
                        ?? Self.dropGivenBack(fd, listener: listener, connections: connections, runtime: runtime)
                }
                loopStates[ObjectIdentifier(loop)] = try await loop.submit {
                    NIOLoopBound(
                        LoopState(
                            pool: UpstreamPool(eventLoop: loop, settings: settings),
                            generation: LoopGeneration(runtime: runtime, policies: policies.value),
                            relay: link,
                            httpRelay: relayShards.map {
                                HTTPRelayLink(shards: $0, index: index, connections: connections, handBack: handBack)
                            }
                        ),
                        eventLoop: loop
                    )
                }.get()
            }
        } catch {
            // (a loop refusing work: the group is shutting down)
            await relay?.stop()
            await httpRelay?.stop()
            throw error
        }

        var channels: [Channel] = []
        do {
            for listener in config.listeners {
                let bound = try await self.bind(listener, accept: config.threads.accept, loopStates: loopStates)
                channels.append(contentsOf: bound)
                let port = bound[0].localAddress?.port ?? listener.port
                self.boundPorts.withLock { $0[listener.name] = port }
                self.runtime.logger.info(
                    "listening", metadata: ["listener": "\(listener.name)", "address": "\(listener.address):\(port)"])
            }
            var adminChannel: Channel? = nil
            if let admin = config.admin {
                let server = AdminServer(config: admin, proxy: self, connections: self.connections)
                let channel = try await server.bind(group: self.group, tracking: self.adminConnections)
                adminChannel = channel
                self.boundAdminPort.withLock { $0 = channel.localAddress?.port }
                self.runtime.logger.info(
                    "admin listening", metadata: ["address": "\(admin.address):\(channel.localAddress?.port ?? admin.port)"])
            }
            // Expired keys are dropped in the background (every 2 s), so memory follows the number of live keys and
            // load-aware placement does not count keys whose lease ran out.
            let current = self.current
            let sweeper = self.group.next().scheduleRepeatedTask(initialDelay: .seconds(2), delay: .seconds(2)) { _ in
                (current.get().directory as? InMemoryOwnershipDirectory)?.sweep()
            }
            // Reconciliation probes run on one loop, with that loop's policies (Lua states are loop-confined).
            let probeLoop = self.group.next()
            let reports = self.reconciliationReports
            let probeState = loopStates[ObjectIdentifier(probeLoop)]!
            let prober = try await probeLoop.submit { () -> RepeatedTask in
                let runner = NIOLoopBound(
                    ReconciliationRunner(loop: probeState.value, reports: reports),
                    eventLoop: probeLoop)
                return probeLoop.scheduleRepeatedTask(initialDelay: .milliseconds(200), delay: .milliseconds(250)) { _ in
                    runner.value.tick()
                }
            }.get()
            self.started.withLock {
                $0 = Started(
                    listenerChannels: channels, adminChannel: adminChannel, loopStates: loopStates, sweeper: sweeper,
                    prober: prober, relay: relay, httpRelay: httpRelay)
            }
            self.backendServices.start(runtime, group: self.group) { [weak self] pool, backends in
                await self?.applyDiscovered(pool: pool, backends: backends).isSuccess ?? false
            }
        } catch {
            for channel in channels { try? await channel.close() }
            await relay?.stop()
            await httpRelay?.stop()
            throw error
        }
    }

    /// Serves until graceful shutdown; SIGHUP reloads the configuration (when a `configSource` was given).
    public func run() async throws {
        if self.started.withLock({ $0 == nil }) {
            try await self.start()
        }
        let trapped = self.hangups.withLock { $0 }
        let hangups: UnixSignalsSequence
        if let trapped {
            hangups = trapped
        } else {
            hangups = await UnixSignalsSequence(trapping: .sighup)
        }
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                for await _ in hangups {
                    _ = await self.reload()
                }
            }
            try? await gracefulShutdown()
            group.cancelAll()
        }
        await self.shutdown()
    }

    /// Re-reads the configuration and scripts and swaps them in for new requests. On any error the old generation
    /// stays in force and the error is returned (and logged). In-flight requests and open tunnels are not touched.
    @discardableResult
    public func reload() async -> Result<Int, ReloadError> {
        guard let configSource = self.configSource else {
            return .failure(ReloadError(description: "reload is not available: the proxy was not started from a file"))
        }
        let config: ProxyConfig
        do {
            config = try configSource()
        } catch {
            return self.reloadFailed("\(error)")
        }
        return await self.reload(config)
    }

    /// Swaps in `config` (see `reload()`). Listener and admin changes need a restart and are refused.
    public func reload(_ config: ProxyConfig) async -> Result<Int, ReloadError> {
        guard self.reloading.withLock({ busy in
            if busy { return false }
            busy = true
            return true
        }) else {
            return self.reloadFailed("another reload is in progress")
        }
        defer { self.reloading.withLock { $0 = false } }
        guard let loopStates = self.started.withLock({ $0?.loopStates }) else {
            return self.reloadFailed("the proxy is not running")
        }
        let old = self.runtime
        let unchanged = { (listener: ListenerConfig) -> ListenerConfig in
            var copy = listener
            copy.routing = nil
            return copy
        }
        guard config.listeners.map(unchanged) == old.config.listeners.map(unchanged), config.admin == old.config.admin else {
            return self.reloadFailed("listeners and the admin listener cannot change on reload: restart the proxy")
        }
        guard config.threads == old.config.threads else {
            return self.reloadFailed("threads cannot change on reload: restart the proxy")
        }
        let table: RoutingTable
        do {
            table = try self.backendServices.table(for: config)
        } catch {
            return self.reloadFailed("a backend address does not resolve: \(error)")
        }
        let runtime = old.next(config: config, table: table)
        let policies: [(EventLoop, NIOLoopBound<[String: RoutingPolicy]>)]
        let httpRelay = self.started.withLock { $0?.httpRelay }
        let relayGenerations: [HTTPRelayGeneration]
        do {
            policies = try await self.makePolicies(for: runtime)
            relayGenerations = try httpRelay.map { try self.makeRelayGenerations(for: runtime, count: $0.shards.count) } ?? []
        } catch {
            return self.reloadFailed("\(error)")
        }
        // Every policy compiled: commit on each loop. A request reads its loop's generation once, at its head.
        let settings = UpstreamPool.Settings(
            connectTimeout: config.timeouts.connect,
            idleTimeout: config.timeouts.upstreamIdle,
            maxIdlePerBackend: config.limits.maxIdleUpstreamPerBackend
        )
        self.current.set(runtime)
        self.backendServices.committed(runtime)
        for (loop, loopPolicies) in policies {
            guard let state = loopStates[ObjectIdentifier(loop)] else { continue }
            try? await loop.submit {
                state.value.generation = LoopGeneration(runtime: runtime, policies: loopPolicies.value)
                state.value.pool.settings = settings
            }.get()
        }
        if let httpRelay {
            for (shard, generation) in zip(httpRelay.shards, relayGenerations) { await shard.use(generation) }
        }
        self.inForce.store(runtime.generation, ordering: .releasing)
        runtime.metrics.countReload(succeeded: true)
        runtime.logger.info("configuration reloaded", metadata: ["generation": "\(runtime.generation)"])
        // A backend gone from the configuration is drained with migration: its tunnels close (paced) and its keys
        // are placed again on their next request.
        for id in old.table.backends.keys where table.backends[id] == nil {
            self.startMigration(of: id)
        }
        return .success(runtime.generation)
    }

    private func reloadFailed(_ why: String) -> Result<Int, ReloadError> {
        let runtime = self.runtime
        runtime.metrics.countReload(succeeded: false)
        runtime.logger.error("reload failed; the previous configuration stays in force", metadata: ["error": "\(why)"])
        return .failure(ReloadError(description: why))
    }

    /// Binds the server's own loops to CPUs (`threads.cpu_affinity: auto`) and logs where each one went.
    private func pinLoops() async {
        let loops = Array(self.group.makeIterator())
        let cpus = await CPUPinning.pin(loops)
        self.pinnedCPUs.withLock { $0 = cpus }
        let described = cpus.map { $0.map(String.init) ?? "unbound" }.joined(separator: ",")
        if cpus.contains(where: { $0 == nil }) {
            self.runtime.logger.warning(
                "could not bind every event loop to a CPU (threads.cpu_affinity: auto)",
                metadata: ["cpus": "\(described)"])
        } else {
            self.runtime.logger.info("event loops bound to CPUs", metadata: ["cpus": "\(described)"])
        }
    }

    /// Builds every listener's policy for each HTTP relay shard (used by the shard's thread only, once handed over).
    private func makeRelayGenerations(for runtime: ProxyRuntime, count: Int) throws -> [HTTPRelayGeneration] {
        let environment = LiveRoutingEnvironment(table: runtime.table, directory: runtime.directory, drains: runtime.drains)
        let loops = Array(self.group.makeIterator())
        return try (0..<count).map { index in
            var policies: [String: RoutingPolicy] = [:]
            for listener in runtime.config.listeners {
                policies[listener.name] = try self.policyFactory(listener, loops[index % loops.count], environment)
            }
            return HTTPRelayGeneration(runtime: runtime, policies: policies)
        }
    }

    /// Builds every listener's policy on every loop (each on its own loop, where it will live).
    private func makePolicies(for runtime: ProxyRuntime) async throws -> [(EventLoop, NIOLoopBound<[String: RoutingPolicy]>)] {
        let factory = self.policyFactory
        let environment = LiveRoutingEnvironment(table: runtime.table, directory: runtime.directory, drains: runtime.drains)
        let listeners = runtime.config.listeners
        var result: [(EventLoop, NIOLoopBound<[String: RoutingPolicy]>)] = []
        for loop in self.group.makeIterator() {
            let policies = try await loop.submit {
                var policies: [String: RoutingPolicy] = [:]
                for listener in listeners {
                    policies[listener.name] = try factory(listener, loop, environment)
                }
                return NIOLoopBound(policies, eventLoop: loop)
            }.get()
            result.append((loop, policies))
        }
        return result
    }

    /// Stops accepting, lets in-flight requests finish for up to `shutdown_grace`, then closes whatever is left
    /// (tunnels included) and releases the event loops if the server owns them.
    public func shutdown() async {
        guard let started = self.started.withLock({ state -> Started? in
            let current = state
            state = nil
            return current
        }) else { return }
        let grace = self.runtime.config.timeouts.shutdownGrace
        self.runtime.logger.info("shutting down", metadata: ["grace": "\(grace)"])
        await self.backendServices.stop()

        started.sweeper?.cancel()
        started.prober?.cancel()
        for channel in started.listenerChannels {
            try? await channel.close()
        }
        // Idle keep-alive connections close now; busy ones after their current response (the pipelining handler
        // does this on the quiesce event). Tunnels ignore it and are closed when the grace period ends.
        for channel in self.connections.all() {
            channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        }
        started.httpRelay?.quiesce()
        let deadline = NIODeadline.now() + grace
        while self.connections.count > 0 && NIODeadline.now() < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        let remaining = self.connections.all()
        let relayed = (started.relay?.count ?? 0) + (started.httpRelay?.count ?? 0)
        if !remaining.isEmpty || relayed > 0 {
            self.runtime.logger.info(
                "closing connections left after the grace period",
                metadata: ["count": "\(remaining.count + relayed)", "relayed_tunnels": "\(relayed)"])
        }
        for channel in remaining {
            try? await channel.close()
        }
        // Relayed tunnels end with the grace period too; each reports its end (access log, lease) on its loop.
        await started.relay?.stop()
        await started.httpRelay?.stop()
        for (_, state) in started.loopStates {
            try? await state.eventLoop.submit { state.value.pool.closeAll() }.get()
        }
        if let admin = started.adminChannel {
            try? await admin.close()
        }
        for channel in self.adminConnections.all() {
            try? await channel.close()
        }
        if self.ownsGroup {
            try? await self.group.shutdownGracefully()
        }
    }

    /// `SO_REUSEPORT` (NIO names no constant for it).
    private static let reusePort = ChannelOptions.Types.SocketOption(level: .socket, name: .init(rawValue: SO_REUSEPORT))

    /// Binds a listener: one socket per event loop with `SO_REUSEPORT` (`threads.accept: per_loop`, more than one
    /// loop), each loop then accepting its own connections; otherwise one socket, whose loop hands connections to the
    /// loops in turn. Returns the listening channels (the first one's port is the listener's, also for port 0).
    private func bind(
        _ listener: ListenerConfig, accept: ThreadsConfig.Accept, loopStates: [ObjectIdentifier: NIOLoopBound<LoopState>]
    ) async throws -> [Channel] {
        // One TLS context for all of the listener's sockets: its files are read once, and a session cached on one
        // loop resumes on another.
        let sslContext = try listener.tls.map { tls in try Self.tlsContext(tls, listener: listener.name) }
        let loops = Array(self.group.makeIterator())
        let perLoop = accept == .perLoop && loops.count > 1
        var channels: [Channel] = []
        do {
            var port = listener.port
            let groups: [EventLoopGroup] = perLoop ? loops : [self.group]
            for group in groups {
                let channel: Channel
                do {
                    channel = try await self.bind(
                        listener, sslContext: sslContext, loopStates: loopStates, group: group, childGroup: group,
                        port: port, reusePort: perLoop)
                } catch {
                    throw ListenerBindError(listener: listener.name, address: "\(listener.address):\(port)", error: error)
                }
                channels.append(channel)
                port = channel.localAddress?.port ?? port
            }
            // `SO_REUSEPORT` lets any socket of this user join the group: more listening sockets than this proxy's
            // means someone else listens here too (`ListeningSockets`).
            if perLoop, let address = channels[0].localAddress, let sockets = ListeningSockets.count(listeningOn: address),
                sockets > channels.count
            {
                throw ListenerPortSharedError(
                    listener: listener.name, address: "\(listener.address):\(port)", sockets: sockets, own: channels.count)
            }
        } catch {
            for channel in channels { try? await channel.close() }
            throw error
        }
        return channels
    }

    /// The listener's TLS context; a file that cannot be read or is not PEM fails with the listener, the file and why.
    private static func tlsContext(_ tls: TLSConfig, listener: String) throws -> NIOSSLContext {
        func failure(_ file: String, _ path: String, _ error: Error) -> ListenerTLSError {
            let reason: String
            if access(path, R_OK) != 0 {
                reason = systemErrorText(errno)
            } else {
                reason = "not a PEM \(file) (\(error))"
            }
            return ListenerTLSError(listener: listener, message: "cannot load its TLS \(file) from \(path): \(reason)")
        }
        let chain: [NIOSSLCertificate]
        do {
            chain = try NIOSSLCertificate.fromPEMFile(tls.certificatePath)
        } catch {
            throw failure("certificate", tls.certificatePath, error)
        }
        guard !chain.isEmpty else {
            throw ListenerTLSError(
                listener: listener, message: "cannot load its TLS certificate from \(tls.certificatePath): no certificate in it")
        }
        let key: NIOSSLPrivateKey
        do {
            key = try NIOSSLPrivateKey(file: tls.keyPath, format: .pem)
        } catch {
            throw failure("private key", tls.keyPath, error)
        }
        do {
            return try NIOSSLContext(
                configuration: .makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key)))
        } catch {
            throw ListenerTLSError(
                listener: listener,
                message: "cannot use the TLS certificate \(tls.certificatePath) with the key \(tls.keyPath): \(error)")
        }
    }

    /// Binds one listening socket of `listener` on `group`, its connections served on `childGroup`.
    private func bind(
        _ listener: ListenerConfig, sslContext: NIOSSLContext?, loopStates: [ObjectIdentifier: NIOLoopBound<LoopState>],
        group: EventLoopGroup, childGroup: EventLoopGroup, port: Int, reusePort: Bool
    ) async throws -> Channel {
        let runtime = self.runtime
        let connections = self.connections
        let context = ListenerContext(name: listener.name, scheme: sslContext == nil ? "http" : "https")
        let fastPath = listener.fastPath

        return try await ServerBootstrap(group: group, childGroup: childGroup)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(Self.reusePort, value: reusePort ? 1 : 0)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 16)
            .childChannelOption(.recvAllocator, value: ReadBuffers.clientAllocator)
            // Reading ahead (`ReadAheadHandler`) may read a client's end of stream while its response is pending:
            // half-closure lets that handler close the connection when the response is done instead.
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try Self.initializeClient(
                        channel, listener: context, fastPath: fastPath, sslContext: sslContext, loopStates: loopStates,
                        runtime: runtime, connections: connections, givenBack: nil)
                }
            }
            .bind(host: listener.address, port: port)
            .flatMap { channel in
                // Last in the pipeline, behind NIO's accept handler, which reports there what fails.
                channel.pipeline.addHandler(
                    AcceptErrorHandler(
                        listener: listener.name, listeningFD: ListenerShedding.descriptor(ofListening: channel),
                        logger: runtime.logger)
                ).map { channel }
            }
            .get()
    }

    /// A client connection the HTTP relay gave back to NIO (`HTTPRelayShard`): made a channel on `loop` with the
    /// listener's pipeline, after the bytes the relay read and did not answer. It stays on NIO from then on.
    private func adoptBack(_ fd: Int32, unread: ByteBuffer?, listener: ListenerContext, on loop: EventLoop) {
        let connections = self.connections
        let runtime = self.runtime
        guard let loopStates = self.started.withLock({ $0?.loopStates }),
            let config = runtime.config.listeners.first(where: { $0.name == listener.name })
        else {
            return Self.dropGivenBack(fd, listener: listener, connections: connections, runtime: runtime)
        }
        let initialized = Atomic<Bool>(false)
        let fastPath = config.fastPath
        let made = ClientBootstrap(group: loop)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelOption(.maxMessagesPerRead, value: 16)
            .channelOption(.recvAllocator, value: ReadBuffers.clientAllocator)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                initialized.store(true, ordering: .relaxed)
                return channel.eventLoop.makeCompletedFuture {
                    try Self.initializeClient(
                        channel, listener: listener, fastPath: fastPath, sslContext: nil, loopStates: loopStates,
                        runtime: runtime, connections: connections, givenBack: unread ?? ByteBuffer())
                }
            }
            .withConnectedSocket(fd)
        made.whenFailure { error in
            runtime.logger.warning("could not take back a connection from the HTTP relay", metadata: ["error": "\(error)"])
            // A channel that was made owns the descriptor (and closed it); otherwise it is still this one's.
            if !initialized.load(ordering: .relaxed) {
                Self.dropGivenBack(fd, listener: listener, connections: connections, runtime: runtime)
            }
        }
    }

    /// A connection given back while the proxy is stopping (or that NIO could not take): it closes.
    private static func dropGivenBack(
        _ fd: Int32, listener: ListenerContext, connections: ConnectionRegistry, runtime: ProxyRuntime
    ) {
        cproxy_close(fd)
        connections.relayedClosed()
        runtime.metrics.connectionClosed(listener: listener.name)
    }

    /// Sets up a client connection's pipeline: its place in the connection count, TLS, the head timer, and the fast
    /// path or the full HTTP pipeline. `givenBack` (a connection the HTTP relay gave back, with the bytes it had read):
    /// the connection already holds its place in the count, the bytes come first, and it does not move again.
    private static func initializeClient(
        _ channel: Channel, listener context: ListenerContext, fastPath: Bool, sslContext: NIOSSLContext?,
        loopStates: [ObjectIdentifier: NIOLoopBound<LoopState>], runtime: ProxyRuntime, connections: ConnectionRegistry,
        givenBack: ByteBuffer?
    ) throws {
        if givenBack != nil {
            connections.adoptBack(channel)
        } else {
            guard connections.add(channel) else {
                runtime.metrics.rejectedConnections.increment()
                channel.close(promise: nil)
                return
            }
            runtime.metrics.connectionOpened(listener: context.name)
        }
        channel.closeFuture.whenComplete { _ in
            // A connection handed to the relay is counted closed when its tunnel ends, by the relay.
            if connections.remove(channel) {
                runtime.metrics.connectionClosed(listener: context.name)
            }
        }
        guard let loopState = loopStates[ObjectIdentifier(channel.eventLoop)]?.value else {
            preconditionFailure("no loop state for the channel's event loop")
        }
        // Limits and timeouts of the generation in force when the connection was accepted.
        let config = loopState.generation.runtime.config
        let timeouts = config.timeouts
        var decoderLimits = NIOHTTPDecoderLimitConfiguration()
        decoderLimits.maxHeaderListSize = config.limits.maxHeaderBytes
        decoderLimits.maxHeaderFieldSize = config.limits.maxHeaderBytes
        let sync = channel.pipeline.syncOperations
        if let sslContext {
            try sync.addHandler(NIOSSLServerHandler(context: sslContext))
        }
        var encoderConfiguration = HTTPResponseEncoder.Configuration()
        // Framing is decided by ForwardingHeaders, which knows the request method (HEAD) and the backend's
        // own framing; the encoder must not add its own.
        encoderConfiguration.automaticallySetFramingHeaders = false
        let headTimer = RequestHeadTimer(headerTimeout: timeouts.requestHeader, idleTimeout: timeouts.idleKeepAlive)
        if let givenBack, givenBack.readableBytes > 0 {
            try sync.addHandler(InjectedBytesHandler(givenBack))
        }
        try sync.addHandler(headTimer)
        // The full HTTP pipeline: built at once without the fast path, and only when the fast path hands
        // the connection over with it (so, until then, every read and write passes two handlers, not seven).
        let installFullPipeline = { (sync: ChannelPipeline.SynchronousOperations, fastPath: FastPathHandler?) throws in
            let handlers = DownstreamHTTPHandlers(
                headTimer: headTimer,
                fastPath: fastPath,
                readAhead: ReadAheadHandler(limit: ReadBuffers.readAheadLimit),
                encoder: HTTPResponseEncoder(configuration: encoderConfiguration),
                decoder: ByteToMessageHandler(
                    HTTPRequestDecoder(leftOverBytesStrategy: .forwardBytes, limitConfiguration: decoderLimits)
                ),
                pipelining: HTTPServerPipelineHandler()
            )
            try sync.addHandler(handlers.readAhead)
            try sync.addHandler(handlers.encoder)
            try sync.addHandler(handlers.decoder)
            try sync.addHandler(handlers.pipelining)
            try sync.addHandler(ProxyHandler(listener: context, loop: loopState, httpHandlers: handlers))
        }
        if fastPath {
            try sync.addHandler(
                FastPathHandler(
                    listener: context, loop: loopState, headTimer: headTimer, mayRelay: givenBack == nil,
                    installFullPipeline: installFullPipeline))
        } else {
            try installFullPipeline(sync, nil)
        }
    }
}

/// Every open client connection, so shutdown can quiesce and then close them, and `max_connections` can be enforced.
/// A tunnel handed to the relay (`TunnelRelay`) keeps its connection's place in the count until it ends.
final class ConnectionRegistry: Sendable {
    private struct State {
        var channels: [ObjectIdentifier: Channel] = [:]
        var relayed = 0
    }

    private let state = Mutex(State())
    private let limit: Int

    init(limit: Int) {
        self.limit = limit
    }

    /// Registers a channel; false when the limit is reached (the caller closes it).
    func add(_ channel: Channel) -> Bool {
        self.state.withLock { state in
            guard state.channels.count + state.relayed < self.limit else { return false }
            state.channels[ObjectIdentifier(channel)] = channel
            return true
        }
    }

    /// Forgets a closed channel; false when it was not registered (refused, or handed to the relay).
    @discardableResult
    func remove(_ channel: Channel) -> Bool {
        self.state.withLock { $0.channels.removeValue(forKey: ObjectIdentifier(channel)) != nil }
    }

    /// The channel's connection goes on in the relay: it still counts, until `relayedClosed()`.
    func handOff(_ channel: Channel) -> Bool {
        self.state.withLock { state in
            guard state.channels.removeValue(forKey: ObjectIdentifier(channel)) != nil else { return false }
            state.relayed += 1
            return true
        }
    }

    func relayedClosed() {
        self.state.withLock { $0.relayed -= 1 }
    }

    /// A relayed connection is a channel again (the HTTP relay gave it back): it keeps its place, whatever the limit.
    func adoptBack(_ channel: Channel) {
        self.state.withLock { state in
            state.relayed -= 1
            state.channels[ObjectIdentifier(channel)] = channel
        }
    }

    /// Open client connections, relayed tunnels included.
    var count: Int { self.state.withLock { $0.channels.count + $0.relayed } }

    /// The client connections still on NIO channels.
    func all() -> [Channel] { self.state.withLock { Array($0.channels.values) } }
}

/// Backends being migrated, shared with the migration tasks.
final class MigratingSet: Sendable {
    private let ids = Mutex<Set<String>>([])
    func insert(_ id: String) -> Bool { self.ids.withLock { $0.insert(id).inserted } }
    func remove(_ id: String) { _ = self.ids.withLock { $0.remove(id) } }
}

/// The generation in force, shared with the closures that outlive a call (change handlers, migrations).
final class RuntimeBox: Sendable {
    private let value: Mutex<ProxyRuntime>

    init(_ runtime: ProxyRuntime) {
        self.value = Mutex(runtime)
    }

    func get() -> ProxyRuntime { self.value.withLock { $0 } }
    func set(_ runtime: ProxyRuntime) { self.value.withLock { $0 = runtime } }
}

/// Delivers bytes read before the channel existed (a connection the HTTP relay gave back) ahead of the socket's own,
/// once the channel is active; then leaves the pipeline.
final class InjectedBytesHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private var bytes: ByteBuffer?

    init(_ bytes: ByteBuffer) {
        self.bytes = bytes
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        if let bytes = self.bytes {
            self.bytes = nil
            context.fireChannelRead(Self.wrapInboundOut(bytes))
            context.fireChannelReadComplete()
        }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
