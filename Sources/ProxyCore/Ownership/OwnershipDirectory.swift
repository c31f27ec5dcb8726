import Foundation
import NIOCore
import Synchronization

/// What the data path asks the directory for one keyed request.
public struct OwnershipQuery: Sendable {
    public var key: String
    public var pool: String
    /// How long the key stays owned after its last connection ends.
    public var idleTTL: TimeAmount
    /// Whether an existing owner may keep the key (it can still serve: not down, not removed).
    public var stillValid: @Sendable (String) -> Bool
    /// Chooses a backend for a key nobody (validly) owns: gets the owner to avoid, and key counts per backend.
    public var place: @Sendable (_ avoiding: String?, _ keysOn: (String) -> Int) -> String?
    /// Chooses among the same candidates as `place`, by rendezvous hashing only (no load, no randomness), so every
    /// proxy that sees the same backends gives the same answer: for a shared store that cannot be reached (degraded
    /// placement). Nil when the caller has none; a directory then falls back to `place`.
    public var placeAgreed: (@Sendable (_ avoiding: String?) -> String?)?

    public init(
        key: String,
        pool: String,
        idleTTL: TimeAmount,
        stillValid: @escaping @Sendable (String) -> Bool,
        place: @escaping @Sendable (_ avoiding: String?, _ keysOn: (String) -> Int) -> String?,
        placeAgreed: (@Sendable (_ avoiding: String?) -> String?)? = nil
    ) {
        self.key = key
        self.pool = pool
        self.idleTTL = idleTTL
        self.stillValid = stillValid
        self.place = place
        self.placeAgreed = placeAgreed
    }
}

/// The answer to a resolve: at once from the cache, later from a shared store, or no backend to place on.
public enum OwnershipResolution: Sendable {
    case owned(Ownership)
    case pending(EventLoopFuture<Ownership?>)
    case unavailable
}

/// Key → owning backend, with leases and epochs (docs/architecture.md, "Ownership").
///
/// The in-memory directory is the embedded default; a shared store (Redis) implements the same protocol so several
/// proxies agree. Every method is safe from any thread; `resolve` never blocks on I/O for a cached key.
public protocol OwnershipDirectory: AnyObject, Sendable {
    /// This proxy's current view of the key's owner (no I/O).
    func owner(of key: String) -> Ownership?
    /// The current owner when it may keep the key (same pool, not expired, `stillValid` accepts it): what `resolve`
    /// answers at once, found without building a query (the request path's common case). Nil when `resolve` must run.
    func validOwner(key: String, pool: String, stillValid: (String) -> Bool) -> Ownership?
    /// `validOwner`, and when there is one, the key's lease acquired with it (`acquireLease`) in the same step: the
    /// request path's common case, in one lock instead of two. A default implementation does the two in turn.
    func acquireValidOwner(key: String, pool: String, stillValid: (String) -> Bool) -> Ownership?
    /// The owner to use, placing and claiming the key once when nobody validly owns it (single-flight).
    func resolve(_ query: OwnershipQuery, on eventLoop: EventLoop?) -> OwnershipResolution
    /// Makes `backend` own the key (a key learned from a response).
    func claim(key: String, pool: String, backend: String, idleTTL: TimeAmount)
    /// Forgets the owner so the next request places the key afresh (forced re-placement, migration).
    func release(key: String)
    /// A request or tunnel for the key started / ended (the lease).
    func acquireLease(key: String)
    func releaseLease(key: String)
    func keyCount(on backend: String) -> Int
    func keys(ownedBy backend: String) -> [String]
    func list(prefix: String, limit: Int) -> [(ownership: Ownership, live: Int)]
    func liveCount(of key: String) -> Int
    /// Called (outside any lock) for every owner change.
    func onChange(_ handler: @escaping @Sendable (OwnershipChange) -> Void)
}

extension OwnershipDirectory {
    public func acquireValidOwner(key: String, pool: String, stillValid: (String) -> Bool) -> Ownership? {
        guard let ownership = self.validOwner(key: key, pool: pool, stillValid: stillValid) else { return nil }
        self.acquireLease(key: key)
        return ownership
    }
}

/// Seconds on a monotonic clock; injectable so lease expiry is testable without sleeping.
public typealias OwnershipClock = @Sendable () -> Double

/// The embedded directory: one process's truth, under one lock (a resolve is a dictionary lookup or one placement).
public final class InMemoryOwnershipDirectory: OwnershipDirectory {
    private let table: Mutex<OwnershipTable>
    private let handlers = Mutex<[@Sendable (OwnershipChange) -> Void]>([])
    private let clock: OwnershipClock

    public init(clock: @escaping OwnershipClock = InMemoryOwnershipDirectory.monotonicSeconds) {
        self.table = Mutex(OwnershipTable())
        self.clock = clock
    }

    public static let monotonicSeconds: OwnershipClock = {
        Double(DispatchTime.now().uptimeNanoseconds) / 1e9
    }

    public func owner(of key: String) -> Ownership? {
        let clock = self.clock
        return self.table.withLock { $0.owner(of: key, now: clock()) }
    }

    public func validOwner(key: String, pool: String, stillValid: (String) -> Bool) -> Ownership? {
        // The clock is read under the lock, and only for a key with no live lease (`OwnershipTable.owner`).
        let clock = self.clock
        return self.table.withLock { table in
            table.owner(of: key, now: clock()).flatMap { $0.pool == pool && stillValid($0.backend) ? $0 : nil }
        }
    }

    public func acquireValidOwner(key: String, pool: String, stillValid: (String) -> Bool) -> Ownership? {
        let clock = self.clock
        return self.table.withLock { table in
            guard let ownership = table.owner(of: key, now: clock()), ownership.pool == pool, stillValid(ownership.backend)
            else { return nil }
            table.acquire(key: key)
            return ownership
        }
    }

    public func resolve(_ query: OwnershipQuery, on eventLoop: EventLoop?) -> OwnershipResolution {
        let now = self.clock()
        let ttl = Double(query.idleTTL.nanoseconds) / 1e9
        let result = self.table.withLock { table in
            table.resolve(
                key: query.key, pool: query.pool, idleTTL: ttl, now: now, stillValid: query.stillValid,
                place: query.place)
        }
        guard let result else { return .unavailable }
        if let change = result.change { self.publish(change) }
        return .owned(result.ownership)
    }

    public func claim(key: String, pool: String, backend: String, idleTTL: TimeAmount) {
        let now = self.clock()
        let change = self.table.withLock {
            $0.claim(key: key, pool: pool, backend: backend, idleTTL: Double(idleTTL.nanoseconds) / 1e9, now: now).change
        }
        if let change { self.publish(change) }
    }

    public func release(key: String) {
        let now = self.clock()
        if let change = self.table.withLock({ $0.release(key: key, now: now) }) {
            self.publish(change)
        }
    }

    public func acquireLease(key: String) {
        self.table.withLock { $0.acquire(key: key) }
    }

    public func releaseLease(key: String) {
        let clock = self.clock
        self.table.withLock { $0.releaseLease(key: key, now: clock()) }
    }

    public func keyCount(on backend: String) -> Int {
        self.table.withLock { $0.keys(on: backend) }
    }

    public func keys(ownedBy backend: String) -> [String] {
        let now = self.clock()
        return self.table.withLock { $0.keys(ownedBy: backend, now: now) }
    }

    public func list(prefix: String, limit: Int) -> [(ownership: Ownership, live: Int)] {
        let now = self.clock()
        return self.table.withLock { $0.list(prefix: prefix, limit: limit, now: now) }
    }

    public func liveCount(of key: String) -> Int {
        self.table.withLock { $0.liveCount(of: key) }
    }

    /// Drops expired keys; the server calls it periodically so memory follows the live key count.
    @discardableResult
    public func sweep() -> Int {
        let now = self.clock()
        return self.table.withLock { $0.sweep(now: now) }
    }

    public var count: Int { self.table.withLock { $0.count } }

    public func onChange(_ handler: @escaping @Sendable (OwnershipChange) -> Void) {
        self.handlers.withLock { $0.append(handler) }
    }

    private func publish(_ change: OwnershipChange) {
        for handler in self.handlers.withLock({ $0 }) { handler(change) }
    }
}
