import HeapModule

/// Who owns a key, since when, under which fencing epoch.
public struct Ownership: Sendable, Equatable {
    public var key: String
    public var pool: String
    public var backend: String
    /// Monotonically increasing across every claim: a backend (or a later proxy) can reject an older owner's writes.
    public var epoch: UInt64
    /// When this owner was claimed (seconds, on the directory's clock).
    public var since: Double

    public init(key: String, pool: String, backend: String, epoch: UInt64, since: Double) {
        self.key = key
        self.pool = pool
        self.backend = backend
        self.epoch = epoch
        self.since = since
    }
}

/// An owner change every proxy component may care about (closing tunnels, dropping caches).
public struct OwnershipChange: Sendable, Equatable {
    public enum Reason: String, Sendable {
        /// The previous owner became unusable (down, removed) and the key was placed again.
        case replaced
        /// A response named the key (`on_response` claim) for another backend.
        case claimed
        /// An operator forced re-placement (`DELETE /keys/{key}`) or migration (`drain?migrate=true`).
        case released
        /// The lease ran out with no live connection; the next request places the key afresh.
        case expired
    }

    public var key: String
    /// The backend that no longer owns the key (its tunnels for this key are to be closed).
    public var previous: String
    /// The new owner, when there is one already.
    public var current: String?
    public var reason: Reason

    public init(key: String, previous: String, current: String?, reason: Reason) {
        self.key = key
        self.previous = previous
        self.current = current
        self.reason = reason
    }
}

/// The in-memory ownership state as a pure value: events in (with the time passed in), results out.
///
/// Leases: a key stays owned while any request or tunnel for it is live (`live > 0`), and for the pool's idle TTL
/// after the last one ended. An expired key is placed afresh on its next resolve. Epochs come from one counter, so
/// every claim's epoch is higher than every earlier one.
public struct OwnershipTable: Sendable {
    struct Entry: Sendable {
        var ownership: Ownership
        /// When the key's live count last dropped to 0, or the claim (only meaningful while nothing is live).
        var idleSince: Double
        var idleTTL: Double
        /// The entry has an element in `expiries`.
        var queued = true

        /// The last lease ended at `now`: the element to queue, unless one is queued already (it is then moved on
        /// when it comes up, see `sweep`).
        mutating func becameIdle(at now: Double) -> Expiry? {
            self.idleSince = now
            guard !self.queued else { return nil }
            self.queued = true
            return Expiry(deadline: now + self.idleTTL, key: self.ownership.key, epoch: self.ownership.epoch)
        }
    }

    /// When an entry may expire, at the earliest. An element whose entry was replaced since (another epoch) or that
    /// became live or idle again is stale: `sweep` drops it or moves it on when it comes up.
    struct Expiry: Comparable, Sendable {
        let deadline: Double
        let key: String
        let epoch: UInt64

        static func < (lhs: Expiry, rhs: Expiry) -> Bool { lhs.deadline < rhs.deadline }
        static func == (lhs: Expiry, rhs: Expiry) -> Bool { lhs.deadline == rhs.deadline && lhs.epoch == rhs.epoch }
    }

    private(set) var entries: [String: Entry] = [:]
    /// Live requests and tunnels per key (only keys with some). Kept apart from the owner entries: a connection
    /// holds the key's lease whichever owner it started under, so one that ends after its owner was replaced,
    /// released or re-claimed still gives back exactly what it took.
    private(set) var live: [String: Int] = [:]
    private(set) var keysPerBackend: [String: Int] = [:]
    private(set) var lastEpoch: UInt64
    /// Every entry's earliest expiry, soonest first, so a sweep looks only at keys that may have expired rather than
    /// at the whole table under the directory's lock (3.8 ms for 100,000 keys; docs/benchmarks.md, "Sixth session").
    private(set) var expiries = Heap<Expiry>()

    public init(lastEpoch: UInt64 = 0) {
        self.lastEpoch = lastEpoch
    }

    public var count: Int { self.entries.count }

    public func keys(on backend: String) -> Int { self.keysPerBackend[backend, default: 0] }

    /// The current owner, or nil when none or its lease expired at `now`.
    /// `now` is read only when the key has no live lease (a live key cannot have expired): a key in use costs no
    /// clock read here.
    public func owner(of key: String, now: @autoclosure () -> Double) -> Ownership? {
        guard let entry = self.entries[key], !self.expired(entry, now: now()) else { return nil }
        return entry.ownership
    }

    /// Live connections (requests and tunnels) holding the key's lease, on this proxy.
    public func liveCount(of key: String) -> Int { self.live[key] ?? 0 }

    /// The owner to use for `key`: the current one if `stillValid` accepts it, else a new one chosen by `place`
    /// (which gets the backend to avoid, if any) and claimed under a new epoch. Returns nil when `place` finds nothing.
    public mutating func resolve(
        key: String,
        pool: String,
        idleTTL: Double,
        now: Double,
        stillValid: (String) -> Bool,
        place: (_ avoiding: String?, _ keysOn: (String) -> Int) -> String?
    ) -> (ownership: Ownership, change: OwnershipChange?)? {
        var previous: String? = nil
        var reason = OwnershipChange.Reason.replaced
        if let entry = self.entries[key] {
            if self.expired(entry, now: now) {
                self.forget(key)
                reason = .expired
                previous = entry.ownership.backend
            } else if entry.ownership.pool == pool && stillValid(entry.ownership.backend) {
                return (entry.ownership, nil)
            } else {
                // The previous owner no longer holds the key: its count must drop before the new owner's rises.
                self.forget(key)
                previous = entry.ownership.backend
            }
        }
        let counts = self.keysPerBackend
        guard let backend = place(reason == .replaced ? previous : nil, { counts[$0, default: 0] }) else { return nil }
        let ownership = self.assign(key: key, pool: pool, backend: backend, idleTTL: idleTTL, now: now)
        // An expired key had no live connection anywhere here: nobody to tell. A replaced owner's tunnels must close.
        let change = reason == .replaced
            ? previous.map { OwnershipChange(key: key, previous: $0, current: backend, reason: reason) } : nil
        return (ownership, change)
    }

    /// Makes `backend` the owner of `key` whatever was there (a claim learned from a response).
    public mutating func claim(key: String, pool: String, backend: String, idleTTL: Double, now: Double)
        -> (ownership: Ownership, change: OwnershipChange?)
    {
        if let entry = self.entries[key], !self.expired(entry, now: now), entry.ownership.backend == backend {
            return (entry.ownership, nil)
        }
        let previous = self.entries[key].flatMap { self.expired($0, now: now) ? nil : $0.ownership.backend }
        self.forget(key)
        let ownership = self.assign(key: key, pool: pool, backend: backend, idleTTL: idleTTL, now: now)
        return (ownership, previous.map { OwnershipChange(key: key, previous: $0, current: backend, reason: .claimed) })
    }

    /// Forgets the key's owner so the next resolve places it again; returns the change when there was an owner.
    public mutating func release(key: String, now: Double) -> OwnershipChange? {
        guard let entry = self.entries[key] else { return nil }
        self.forget(key)
        guard !self.expired(entry, now: now) else { return nil }
        return OwnershipChange(key: key, previous: entry.ownership.backend, current: nil, reason: .released)
    }

    /// A request or tunnel for the key started (it holds the lease).
    public mutating func acquire(key: String) {
        self.live[key, default: 0] += 1
    }

    /// A request or tunnel for the key ended; the idle TTL starts when the last one does.
    /// `now` is read only when the last lease ends (the clock is not free on the request path).
    public mutating func releaseLease(key: String, now: @autoclosure () -> Double) {
        // One hash lookup: the count is changed or removed through its index.
        guard let index = self.live.index(forKey: key) else { return }
        let count = self.live.values[index]
        if count > 1 {
            self.live.values[index] = count - 1
        } else {
            self.live.remove(at: index)
            if let expiry = self.entries[key]?.becameIdle(at: now()) {
                self.expiries.insert(expiry)
            }
        }
    }

    /// Drops the expired keys (bounding memory, and the key counts placement reads); returns how many. Looks only at
    /// queue elements that are due, at most `limit` of them per call: a sweep after a mass expiry spreads over
    /// several calls, and a key not yet dropped is still treated as expired by every lookup.
    @discardableResult
    public mutating func sweep(now: Double, limit: Int = 10_000) -> Int {
        var dropped = 0
        var examined = 0
        while examined < limit, let next = self.expiries.min, next.deadline <= now {
            _ = self.expiries.popMin()
            examined += 1
            guard let entry = self.entries[next.key], entry.ownership.epoch == next.epoch else { continue }
            if self.expired(entry, now: now) {
                self.forget(next.key)
                dropped += 1
            } else if self.live[next.key] != nil {
                // Leased: queued again when its last lease ends (`releaseLease`).
                self.entries[next.key]?.queued = false
            } else {
                // Idle, but since later than this element says: due at its own time.
                self.expiries.insert(Expiry(deadline: entry.idleSince + entry.idleTTL, key: next.key, epoch: next.epoch))
            }
        }
        return dropped
    }

    /// Keys owned by `backend`, in no particular order.
    public func keys(ownedBy backend: String, now: Double) -> [String] {
        self.entries.compactMap { key, entry in
            entry.ownership.backend == backend && !self.expired(entry, now: now) ? key : nil
        }
    }

    /// Owners whose key starts with `prefix`, sorted by key, at most `limit`.
    public func list(prefix: String, limit: Int, now: Double) -> [(ownership: Ownership, live: Int)] {
        self.entries.values
            .filter { $0.ownership.key.hasPrefix(prefix) && !self.expired($0, now: now) }
            .sorted { $0.ownership.key < $1.ownership.key }
            .prefix(limit)
            .map { ($0.ownership, self.live[$0.ownership.key] ?? 0) }
    }

    private mutating func assign(key: String, pool: String, backend: String, idleTTL: Double, now: Double) -> Ownership {
        self.lastEpoch += 1
        let ownership = Ownership(key: key, pool: pool, backend: backend, epoch: self.lastEpoch, since: now)
        self.entries[key] = Entry(ownership: ownership, idleSince: now, idleTTL: idleTTL)
        self.expiries.insert(Expiry(deadline: now + idleTTL, key: key, epoch: self.lastEpoch))
        self.keysPerBackend[backend, default: 0] += 1
        return ownership
    }

    private mutating func forget(_ key: String) {
        guard let entry = self.entries.removeValue(forKey: key) else { return }
        let backend = entry.ownership.backend
        let remaining = self.keysPerBackend[backend, default: 1] - 1
        self.keysPerBackend[backend] = remaining > 0 ? remaining : nil
    }

    /// Expired: no live lease and idle for its TTL. `now` is read only for a key without a live lease.
    private func expired(_ entry: Entry, now: @autoclosure () -> Double) -> Bool {
        self.live[entry.ownership.key] == nil && now() - entry.idleSince >= entry.idleTTL
    }
}
