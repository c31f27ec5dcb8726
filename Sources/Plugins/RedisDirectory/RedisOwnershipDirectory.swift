import Foundation
import Logging
import NIOCore
import ProxyCore
import Synchronization

/// The ownership directory on a shared Redis server, so several proxies agree on every key's owner.
///
/// Layout (every key carries the owned key as a hash tag, so a key's two Redis keys live in one Redis Cluster slot):
/// - `<prefix>{<key>}:owner` = `epoch|backend|pool`, with a PX lease of the pool's `idle_ttl`;
/// - `<prefix>{<key>}:epoch` = the key's INCR counter. Epochs are per key and monotonic per key: that is what
///   fencing needs (a backend compares epochs of one key), and it keeps the claim script inside one slot.
///   Without Redis persistence a Redis restart starts the counters again.
/// - owner changes are published on `<prefix>changes` as `key|epoch|backend` (empty backend: released).
///
/// A resolve answers from the local cache with no I/O when the cached owner is still valid. A miss runs one
/// EVALSHA of a get-or-claim script (single-flight per key in this proxy). Replacing an owner this proxy considers
/// unusable is a compare-and-set on that owner's epoch, so two proxies replacing the same dead owner make one owner.
/// Leases of keys with live connections here are renewed in batches (pipelined PEXPIRE) every
/// `leaseRenewInterval`; other keys expire in Redis `idle_ttl` after their last renewal.
///
/// `keys(ownedBy:)`, `keyCount(on:)` and `list` answer from this proxy's cache (keys it has resolved or been told
/// about), not from a scan of Redis.
///
/// When Redis cannot be reached: `degrade` keeps serving cached keys and places new keys by rendezvous hashing over
/// the usable candidates (`OwnershipQuery.placeAgreed`), remembering them as degraded; when Redis answers again each
/// is claimed, and where Redis already names another owner, Redis wins (the change is published locally, so this
/// proxy's tunnels to the losing backend close). `fail` answers `.unavailable` (503) for keys not cached.
public final class RedisOwnershipDirectory: OwnershipDirectory {
    public enum OnUnavailable: Sendable { case degrade, fail }

    struct Entry: Sendable {
        var ownership: Ownership
        var idleSince: Double
        var idleTTL: Double
        /// Placed while Redis could not be reached: to be claimed when it answers again.
        var degraded: Bool
    }

    struct State: Sendable {
        var entries: [String: Entry] = [:]
        var live: [String: Int] = [:]
        var keysPerBackend: [String: Int] = [:]
        var inflight: [String: EventLoopFuture<Ownership?>] = [:]
        /// Keys whose lease must be renewed at the next batch (live now, or live since the last batch).
        var touched: Set<String> = []
        var redisDown = false

        mutating func set(_ entry: Entry) {
            self.forget(entry.ownership.key)
            self.entries[entry.ownership.key] = entry
            self.keysPerBackend[entry.ownership.backend, default: 0] += 1
        }

        @discardableResult
        mutating func forget(_ key: String) -> Entry? {
            guard let entry = self.entries.removeValue(forKey: key) else { return nil }
            let remaining = self.keysPerBackend[entry.ownership.backend, default: 1] - 1
            self.keysPerBackend[entry.ownership.backend] = remaining > 0 ? remaining : nil
            return entry
        }

        func expired(_ entry: Entry, now: Double) -> Bool {
            self.live[entry.ownership.key] == nil && now - entry.idleSince >= entry.idleTTL
        }

        func current(_ key: String, now: Double) -> Entry? {
            guard let entry = self.entries[key], !self.expired(entry, now: now) else { return nil }
            return entry
        }
    }

    /// Get-or-claim. KEYS: owner, epoch. ARGV: backend, pool, ttl ms, replace, channel, key.
    /// `replace` = "" keeps an existing owner; an epoch replaces the owner only while it still has that epoch
    /// (compare-and-set); "*" replaces any owner on another backend (a claim learned from a response).
    /// Returns {1, value} when this call claimed, {0, value} for the existing owner (its lease extended).
    static let claimScript = RedisScript(
        """
        local cur = redis.call('GET', KEYS[1])
        local replace = ARGV[4]
        if cur then
          local e, b = string.match(cur, '^(%d+)|([^|]*)|')
          local keep
          if replace == '' then keep = true
          elseif replace == '*' then keep = (b == ARGV[1])
          else keep = (e ~= replace) end
          if keep then
            redis.call('PEXPIRE', KEYS[1], ARGV[3])
            return {0, cur}
          end
        end
        local epoch = redis.call('INCR', KEYS[2])
        local value = epoch .. '|' .. ARGV[1] .. '|' .. ARGV[2]
        redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
        redis.call('PUBLISH', ARGV[5], ARGV[6] .. '|' .. epoch .. '|' .. ARGV[1])
        return {1, value}
        """)

    /// Release. KEYS: owner. ARGV: channel, key. Deletes the owner and publishes `key|epoch|`.
    static let releaseScript = RedisScript(
        """
        local cur = redis.call('GET', KEYS[1])
        if not cur then return 0 end
        local e = string.match(cur, '^(%d+)|') or '0'
        -- Compare-and-delete: only the owner this proxy knew (by epoch) is released, never a newer one that
        -- another proxy claimed meanwhile. An empty expected epoch (no cached owner here) releases whatever is there.
        if ARGV[3] ~= '' and ARGV[3] ~= e then return 0 end
        redis.call('DEL', KEYS[1])
        redis.call('PUBLISH', ARGV[1], ARGV[2] .. '|' .. e .. '|')
        return 1
        """)

    public let client: RedisClient
    public let subscriber: RedisSubscriber
    public let prefix: String
    public let onUnavailable: OnUnavailable
    public let leaseRenewInterval: TimeAmount
    private let logger: Logger
    private let eventLoop: EventLoop
    private let clock: OwnershipClock
    private let state = Mutex(State())
    private let handlers = Mutex<[@Sendable (OwnershipChange) -> Void]>([])
    private let tasks = Mutex<[Task<Void, Never>]>([])
    private let degradedCount = Atomic<Int>(0)
    private let reconciledLosses = Atomic<Int>(0)

    /// The channel owner changes are published on.
    public var channel: String { self.prefix + "changes" }

    /// Placements made while Redis could not be reached, since start.
    public var degradedPlacements: Int { self.degradedCount.load(ordering: .relaxed) }
    /// Degraded placements Redis overruled when it came back (their tunnels were closed).
    public var degradedLosses: Int { self.reconciledLosses.load(ordering: .relaxed) }

    public init(
        configuration: RedisConfiguration,
        prefix: String = "ott:",
        onUnavailable: OnUnavailable = .degrade,
        leaseRenewInterval: TimeAmount = .seconds(10),
        eventLoopGroup: EventLoopGroup,
        logger: Logger = Logger(label: "ott-proxy.redis-directory"),
        clock: @escaping OwnershipClock = InMemoryOwnershipDirectory.monotonicSeconds
    ) {
        self.client = RedisClient(configuration: configuration, eventLoopGroup: eventLoopGroup, logger: logger)
        self.subscriber = RedisSubscriber(configuration: configuration, eventLoopGroup: eventLoopGroup, logger: logger)
        self.prefix = prefix
        self.onUnavailable = onUnavailable
        self.leaseRenewInterval = leaseRenewInterval
        self.logger = logger
        self.eventLoop = eventLoopGroup.next()
        self.clock = clock
    }

    /// Subscribes to the changes channel and starts the lease renewal; waits (up to `timeout`) for the subscription,
    /// and throws when Redis cannot be reached then (the directory keeps trying, and works degraded meanwhile).
    public func start(timeout: Duration = .seconds(5)) async throws {
        let events = self.subscriber.events
        let listener = Task { [weak self] in
            for await event in events {
                guard let self else { return }
                self.handle(event)
            }
        }
        let renewer = Task { [weak self] in
            let interval = self?.leaseRenewInterval ?? .seconds(1)
            var sinceRenewal = TimeAmount.zero
            let tick = min(interval, .milliseconds(200))
            while !Task.isCancelled {
                try? await Task.sleep(for: .nanoseconds(tick.nanoseconds))
                guard let self, !Task.isCancelled else { return }
                sinceRenewal = sinceRenewal + tick
                if sinceRenewal >= interval {
                    sinceRenewal = .zero
                    await self.renewLeases()
                }
                await self.reconcileIfNeeded()
            }
        }
        self.tasks.withLock { $0 += [listener, renewer] }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await self.subscriber.subscribe([self.channel]) }
            group.addTask {
                try await Task.sleep(for: timeout)
                throw RedisError.unavailable("no subscription after \(timeout)")
            }
            try await group.next()
            group.cancelAll()
        }
    }

    /// Stops renewing and listening and closes the connections (leases then run out in Redis).
    public func close() async {
        for task in self.tasks.withLock({ $0 }) { task.cancel() }
        try? await self.client.close().get()
        try? await self.subscriber.close().get()
    }

    // MARK: Redis keys

    func ownerKey(_ key: String) -> String { "\(self.prefix){\(key)}:owner" }
    func epochKey(_ key: String) -> String { "\(self.prefix){\(key)}:epoch" }

    static func parseOwner(_ text: String, key: String, now: Double) -> Ownership? {
        let parts = text.split(separator: "|", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3, let epoch = UInt64(parts[0]), !parts[1].isEmpty else { return nil }
        return Ownership(key: key, pool: String(parts[2]), backend: String(parts[1]), epoch: epoch, since: now)
    }

    /// `key|epoch|backend`, split from the right (a key may contain `|`; backend ids do not).
    static func parseMessage(_ text: String) -> (key: String, epoch: UInt64, backend: String?)? {
        guard let last = text.lastIndex(of: "|") else { return nil }
        let backend = String(text[text.index(after: last)...])
        let head = text[..<last]
        guard let middle = head.lastIndex(of: "|"), let epoch = UInt64(head[head.index(after: middle)...]) else {
            return nil
        }
        return (String(head[..<middle]), epoch, backend.isEmpty ? nil : backend)
    }

    // MARK: OwnershipDirectory

    public func owner(of key: String) -> Ownership? {
        let now = self.clock()
        return self.state.withLock { $0.current(key, now: now)?.ownership }
    }

    public func validOwner(key: String, pool: String, stillValid: (String) -> Bool) -> Ownership? {
        let now = self.clock()
        return self.state.withLock { state in
            state.current(key, now: now).flatMap { entry in
                entry.ownership.pool == pool && stillValid(entry.ownership.backend) ? entry.ownership : nil
            }
        }
    }

    public func resolve(_ query: OwnershipQuery, on eventLoop: EventLoop?) -> OwnershipResolution {
        let now = self.clock()
        let ttl = Double(query.idleTTL.nanoseconds) / 1e9
        enum Step {
            case answer(OwnershipResolution)
            case claim(backend: String, replace: String, avoid: String?, promise: EventLoopPromise<Ownership?>)
            case degraded(Ownership, previous: String?)
        }
        let step: Step = self.state.withLock { state in
            var replace = ""
            var avoid: String?
            if let entry = state.current(query.key, now: now) {
                if entry.ownership.pool == query.pool && query.stillValid(entry.ownership.backend) {
                    return .answer(.owned(entry.ownership))
                }
                replace = entry.degraded ? "" : String(entry.ownership.epoch)
                avoid = entry.ownership.backend
            }
            if let inflight = state.inflight[query.key] {
                return .answer(.pending(eventLoop.map { inflight.hop(to: $0) } ?? inflight))
            }
            if state.redisDown {
                switch self.onUnavailable {
                case .fail: return .answer(.unavailable)
                case .degrade:
                    let counts = state.keysPerBackend
                    guard let backend = query.placeAgreed?(avoid) ?? query.place(avoid, { counts[$0, default: 0] })
                    else { return .answer(.unavailable) }
                    let ownership = Ownership(key: query.key, pool: query.pool, backend: backend, epoch: 0, since: now)
                    state.set(Entry(ownership: ownership, idleSince: now, idleTTL: ttl, degraded: true))
                    return .degraded(ownership, previous: avoid)
                }
            }
            let counts = state.keysPerBackend
            guard let backend = query.place(avoid, { counts[$0, default: 0] }) else { return .answer(.unavailable) }
            let promise = self.eventLoop.makePromise(of: Ownership?.self)
            state.inflight[query.key] = promise.futureResult
            return .claim(backend: backend, replace: replace, avoid: avoid, promise: promise)
        }
        switch step {
        case .answer(let resolution):
            return resolution
        case .degraded(let ownership, let previous):
            self.countDegraded(ownership)
            if let previous, previous != ownership.backend {
                self.publish(OwnershipChange(key: ownership.key, previous: previous, current: ownership.backend, reason: .replaced))
            }
            return .owned(ownership)
        case .claim(let backend, let replace, _, let promise):
            self.claimRemote(query, backend: backend, replace: replace, attempts: 3).whenComplete { result in
                self.state.withLock { _ = $0.inflight.removeValue(forKey: query.key) }
                switch result {
                case .success(let ownership): promise.succeed(ownership)
                case .failure: promise.succeed(self.unavailable(query))
                }
            }
            let future = promise.futureResult
            return .pending(eventLoop.map { future.hop(to: $0) } ?? future)
        }
    }

    /// One get-or-claim round trip (more only when Redis names an owner the caller cannot use: then a
    /// compare-and-set on that owner's epoch). Updates the cache and publishes the change locally.
    private func claimRemote(_ query: OwnershipQuery, backend: String, replace: String, attempts: Int)
        -> EventLoopFuture<Ownership?>
    {
        let ttlMillis = max(1, query.idleTTL.nanoseconds / 1_000_000)
        let args: [any RESPArgument] = [backend, query.pool, Int(ttlMillis), replace, self.channel, query.key]
        return self.client.evalsha(Self.claimScript, keys: [self.ownerKey(query.key), self.epochKey(query.key)], args: args)
            .flatMap { reply -> EventLoopFuture<Ownership?> in
                let now = self.clock()
                guard let parts = reply.array, parts.count == 2, let text = parts[1].string,
                    let ownership = Self.parseOwner(text, key: query.key, now: now)
                else { return self.eventLoop.makeFailedFuture(RedisError.unexpectedReply(reply)) }
                self.markUp()
                if ownership.pool != query.pool || !query.stillValid(ownership.backend) {
                    guard attempts > 1 else { return self.eventLoop.makeSucceededFuture(nil) }
                    let counts = self.state.withLock { $0.keysPerBackend }
                    guard let next = query.place(ownership.backend, { counts[$0, default: 0] }) else {
                        return self.eventLoop.makeSucceededFuture(nil)
                    }
                    return self.claimRemote(query, backend: next, replace: String(ownership.epoch), attempts: attempts - 1)
                }
                self.adopt(ownership, idleTTL: Double(query.idleTTL.nanoseconds) / 1e9, reason: .replaced)
                return self.eventLoop.makeSucceededFuture(ownership)
            }
    }

    /// Redis could not answer a miss: fail, or place degraded.
    private func unavailable(_ query: OwnershipQuery) -> Ownership? {
        self.markDown()
        guard self.onUnavailable == .degrade else { return nil }
        let now = self.clock()
        let ttl = Double(query.idleTTL.nanoseconds) / 1e9
        let result: (Ownership, String?)? = self.state.withLock { state in
            if let entry = state.current(query.key, now: now), entry.ownership.pool == query.pool,
                query.stillValid(entry.ownership.backend)
            {
                return (entry.ownership, nil)
            }
            let avoid = state.current(query.key, now: now)?.ownership.backend
            let counts = state.keysPerBackend
            guard let backend = query.placeAgreed?(avoid) ?? query.place(avoid, { counts[$0, default: 0] }) else {
                return nil
            }
            let ownership = Ownership(key: query.key, pool: query.pool, backend: backend, epoch: 0, since: now)
            state.set(Entry(ownership: ownership, idleSince: now, idleTTL: ttl, degraded: true))
            return (ownership, avoid)
        }
        guard let (ownership, previous) = result else { return nil }
        if ownership.epoch == 0 { self.countDegraded(ownership) }
        if let previous, previous != ownership.backend {
            self.publish(OwnershipChange(key: ownership.key, previous: previous, current: ownership.backend, reason: .replaced))
        }
        return ownership
    }

    private func countDegraded(_ ownership: Ownership) {
        let count = self.degradedCount.wrappingAdd(1, ordering: .relaxed).newValue
        self.logger.warning(
            "redis unavailable: key placed without the shared directory",
            metadata: ["key": "\(ownership.key)", "backend": "\(ownership.backend)", "degraded_total": "\(count)"])
    }

    private func markDown() {
        let wasDown = self.state.withLock { state -> Bool in
            defer { state.redisDown = true }
            return state.redisDown
        }
        if !wasDown {
            self.logger.error("redis ownership directory unavailable", metadata: ["mode": "\(self.onUnavailable)"])
        }
    }

    private func markUp() {
        self.state.withLock { $0.redisDown = false }
    }

    /// Makes `ownership` (Redis's answer) the cached owner; publishes a change when it replaces another backend.
    private func adopt(_ ownership: Ownership, idleTTL: Double, reason: OwnershipChange.Reason) {
        let now = self.clock()
        let previous: String? = self.state.withLock { state in
            let old = state.current(ownership.key, now: now)
            if let old, !old.degraded, old.ownership.epoch > ownership.epoch,
                old.ownership.backend != ownership.backend
            {
                return nil  // a newer owner was already learned (pub/sub raced the reply)
            }
            state.set(Entry(ownership: ownership, idleSince: now, idleTTL: idleTTL, degraded: false))
            return old?.ownership.backend
        }
        if let previous, previous != ownership.backend {
            self.publish(OwnershipChange(key: ownership.key, previous: previous, current: ownership.backend, reason: reason))
        }
    }

    public func claim(key: String, pool: String, backend: String, idleTTL: TimeAmount) {
        let now = self.clock()
        let ttl = Double(idleTTL.nanoseconds) / 1e9
        let previous: String? = self.state.withLock { state in
            let old = state.current(key, now: now)
            if let old, old.ownership.backend == backend { return nil }
            let epoch = old?.ownership.epoch ?? 0
            state.set(Entry(
                ownership: Ownership(key: key, pool: pool, backend: backend, epoch: epoch, since: now),
                idleSince: now, idleTTL: ttl, degraded: false))
            return old?.ownership.backend ?? ""
        }
        guard let previous else { return }
        if !previous.isEmpty {
            self.publish(OwnershipChange(key: key, previous: previous, current: backend, reason: .claimed))
        }
        let ttlMillis = max(1, idleTTL.nanoseconds / 1_000_000)
        let args: [any RESPArgument] = [backend, pool, Int(ttlMillis), "*", self.channel, key]
        self.client.evalsha(Self.claimScript, keys: [self.ownerKey(key), self.epochKey(key)], args: args)
            .whenComplete { result in
                switch result {
                case .success(let reply):
                    self.markUp()
                    if let text = reply.array?.last?.string,
                        let ownership = Self.parseOwner(text, key: key, now: self.clock())
                    {
                        self.adopt(ownership, idleTTL: ttl, reason: .claimed)
                    }
                case .failure:
                    self.markDown()
                    self.state.withLock { $0.entries[key]?.degraded = true }
                }
            }
    }

    public func release(key: String) {
        let now = self.clock()
        let entry = self.state.withLock { state -> Entry? in
            guard let entry = state.forget(key) else { return nil }
            return state.expired(entry, now: now) ? nil : entry
        }
        if let entry {
            self.publish(OwnershipChange(key: key, previous: entry.ownership.backend, current: nil, reason: .released))
        }
        let expectedEpoch = entry.map { String($0.ownership.epoch) } ?? ""
        self.client.evalsha(Self.releaseScript, keys: [self.ownerKey(key)], args: [self.channel, key, expectedEpoch])
            .whenComplete { _ in }
    }

    public func acquireLease(key: String) {
        self.state.withLock { state in
            state.live[key, default: 0] += 1
            state.touched.insert(key)
        }
    }

    public func releaseLease(key: String) {
        let now = self.clock()
        self.state.withLock { state in
            guard let count = state.live[key], count > 0 else { return }
            if count > 1 {
                state.live[key] = count - 1
            } else {
                state.live[key] = nil
                state.entries[key]?.idleSince = now
            }
        }
    }

    public func keyCount(on backend: String) -> Int {
        self.state.withLock { $0.keysPerBackend[backend, default: 0] }
    }

    public func keys(ownedBy backend: String) -> [String] {
        let now = self.clock()
        return self.state.withLock { state in
            state.entries.compactMap { key, entry in
                entry.ownership.backend == backend && !state.expired(entry, now: now) ? key : nil
            }
        }
    }

    public func list(prefix: String, limit: Int) -> [(ownership: Ownership, live: Int)] {
        let now = self.clock()
        return self.state.withLock { state in
            state.entries.values
                .filter { $0.ownership.key.hasPrefix(prefix) && !state.expired($0, now: now) }
                .sorted { $0.ownership.key < $1.ownership.key }
                .prefix(limit)
                .map { ($0.ownership, state.live[$0.ownership.key] ?? 0) }
        }
    }

    public func liveCount(of key: String) -> Int {
        self.state.withLock { $0.live[key] ?? 0 }
    }

    public func onChange(_ handler: @escaping @Sendable (OwnershipChange) -> Void) {
        self.handlers.withLock { $0.append(handler) }
    }

    private func publish(_ change: OwnershipChange) {
        for handler in self.handlers.withLock({ $0 }) { handler(change) }
    }

    /// Cached keys (not degraded), for tests and diagnostics.
    public var cachedCount: Int { self.state.withLock { $0.entries.count } }

    // MARK: Pub/sub

    func handle(_ event: RedisSubscriberEvent) {
        switch event {
        case .message(let message):
            guard message.channel == self.channel,
                let parsed = Self.parseMessage(String(buffer: message.payload))
            else { return }
            self.apply(key: parsed.key, epoch: parsed.epoch, backend: parsed.backend)
        case .connected(afterReconnect: false):
            self.markUp()
        case .connected(afterReconnect: true):
            // Messages published while disconnected were lost: forget every idle key; keys with live connections
            // here are claimed again (Redis may have restarted empty), so a different owner there closes them.
            let dropped = self.state.withLock { state -> Int in
                let idle = state.entries.keys.filter { state.live[$0] == nil }
                for key in idle { state.forget(key) }
                for key in state.entries.keys { state.entries[key]?.degraded = true }
                return idle.count
            }
            self.markUp()
            self.logger.info("redis subscription restored: cache dropped", metadata: ["dropped": "\(dropped)"])
            Task { await self.reconcileIfNeeded() }
        }
    }

    private func apply(key: String, epoch: UInt64, backend: String?) {
        let now = self.clock()
        let change: OwnershipChange? = self.state.withLock { state in
            guard let old = state.current(key, now: now) else {
                state.forget(key)
                return nil
            }
            if !old.degraded, old.ownership.epoch >= epoch { return nil }
            guard let backend else {
                state.forget(key)
                return OwnershipChange(key: key, previous: old.ownership.backend, current: nil, reason: .released)
            }
            var ownership = old.ownership
            ownership.backend = backend
            ownership.epoch = epoch
            ownership.since = now
            state.set(Entry(ownership: ownership, idleSince: now, idleTTL: old.idleTTL, degraded: false))
            return old.ownership.backend == backend
                ? nil : OwnershipChange(key: key, previous: old.ownership.backend, current: backend, reason: .replaced)
        }
        if let change { self.publish(change) }
    }

    // MARK: Leases and reconciliation

    /// One pipelined PEXPIRE per key with live connections here (or live since the last batch).
    func renewLeases() async {
        let batch: [(key: String, ttlMillis: Int)] = self.state.withLock { state in
            let keys = state.touched.union(state.live.keys)
            state.touched = []
            return keys.compactMap { key in
                guard let entry = state.entries[key], !entry.degraded else { return nil }
                return (key, max(1, Int(entry.idleTTL * 1000)))
            }
        }
        guard !batch.isEmpty else { return }
        let futures = batch.map { item in
            self.client.send(["PEXPIRE", self.ownerKey(item.key), item.ttlMillis], timeout: nil)
        }
        var missing: [String] = []
        for (index, future) in futures.enumerated() {
            do {
                if try await future.get().int == 0 { missing.append(batch[index].key) }
            } catch {
                self.markDown()
                return
            }
        }
        // A live key Redis lost (expired or restarted empty): claim it again like a degraded placement.
        if !missing.isEmpty {
            self.state.withLock { state in
                for key in missing { state.entries[key]?.degraded = true }
            }
        }
    }

    /// Claims every degraded placement once Redis answers; Redis's owner wins where it already has one.
    func reconcileIfNeeded() async {
        let pending: [Entry] = self.state.withLock { state in state.entries.values.filter(\.degraded) }
        let down = self.state.withLock { $0.redisDown }
        if pending.isEmpty {
            guard down else { return }
            if (try? await self.client.send(["PING"], timeout: nil).get()) != nil { self.markUp() }
            return
        }
        for entry in pending {
            let key = entry.ownership.key
            let ttlMillis = max(1, Int(entry.idleTTL * 1000))
            let args: [any RESPArgument] = [entry.ownership.backend, entry.ownership.pool, ttlMillis, "", self.channel, key]
            let reply: RESPValue
            do {
                reply = try await self.client.evalsha(
                    Self.claimScript, keys: [self.ownerKey(key), self.epochKey(key)], args: args
                ).get()
            } catch {
                self.markDown()
                return
            }
            self.markUp()
            guard let text = reply.array?.last?.string,
                let ownership = Self.parseOwner(text, key: key, now: self.clock())
            else { continue }
            if ownership.backend != entry.ownership.backend {
                _ = self.reconciledLosses.wrappingAdd(1, ordering: .relaxed)
                self.logger.warning(
                    "degraded placement overruled by redis",
                    metadata: ["key": "\(key)", "local": "\(entry.ownership.backend)", "redis": "\(ownership.backend)"])
            }
            self.adopt(ownership, idleTTL: entry.idleTTL, reason: .replaced)
        }
    }
}
