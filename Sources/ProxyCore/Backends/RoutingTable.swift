import NIOCore

/// An immutable snapshot of every pool and backend, built from one configuration generation.
///
/// Handlers hold the snapshot they started with, so a reload never changes a request's view halfway through.
public final class RoutingTable: Sendable {
    public let pools: [String: Pool]
    public let backends: [String: Backend]

    public init(pools: [Pool]) {
        var byName: [String: Pool] = [:]
        var byID: [String: Backend] = [:]
        for pool in pools {
            byName[pool.name] = pool
            for backend in pool.backends { byID[backend.id] = backend }
        }
        self.pools = byName
        self.backends = byID
    }

    /// Resolves every backend's address once (a slow DNS answer must never stall an event loop).
    public convenience init(config: ProxyConfig) throws {
        try self.init(
            pools: config.pools.map { pool in
                Pool(name: pool.name, balance: pool.balance, backends: try pool.backends.map { try Backend(config: $0) })
            }
        )
    }
}

/// The outcome of turning a forwarding decision into a backend.
public enum TargetResolution {
    case backend(Backend)
    /// A keyed target: the owning backend and its ownership record (epoch, since).
    case owned(Backend, Ownership)
    /// The shared ownership store is being asked; the request continues when it answers (nil: no backend).
    case pending(EventLoopFuture<Ownership?>)
    /// The pool exists but has no backend to offer (→ 503).
    case noBackend
    /// The decision is malformed for this configuration (→ 500, logged).
    case unknownPool(String)
    case unknownBackend(String)
    case unknownPlacement(String)
}

extension ProxyRuntime {
    /// The backend when `resolve` (with the lease) answers at once, for the HTTP relay (`HTTPRelayShard`): nil for
    /// everything it gives back to NIO (a pending shared store, no backend, a malformed decision), which resolves and
    /// answers again. (The fast path switches over `resolve` itself: it waits for a pending store.)
    func resolveNow(_ target: RouteTarget, on eventLoop: EventLoop?) -> (backend: Backend, ownership: Ownership?)? {
        switch self.resolve(target, on: eventLoop, acquiringLease: true) {
        case .backend(let backend): return (backend, nil)
        case .owned(let backend, let ownership): return (backend, ownership)
        case .pending, .noBackend, .unknownPool, .unknownBackend, .unknownPlacement: return nil
        }
    }

    /// The backend a forwarding target names. Stateless targets are balanced over usable backends (so this advances
    /// the pool's cursor); a key goes to its owner in the ownership directory, placed and claimed once when nobody
    /// validly owns it. An explicitly named backend is returned whatever its health (the script chose it).
    /// With a shared store a miss may be `pending`; the in-memory directory always answers at once.
    ///
    /// With `acquiringLease`, an `.owned` answer comes with the key's lease acquired (the caller releases it when its
    /// request or tunnel ends, as after `acquireLease`); for the common case, a valid owner, that is the same lock as
    /// the lookup (`OwnershipDirectory.acquireValidOwner`). No other answer holds a lease.
    public func resolve(_ target: RouteTarget, on eventLoop: EventLoop?, acquiringLease: Bool = false) -> TargetResolution {
        switch target {
        case .pool(let name):
            guard let pool = self.table.pools[name] else { return .unknownPool(name) }
            return pool.pick().map { .backend($0) } ?? .noBackend
        case .backend(let id):
            return self.table.backends[id].map { .backend($0) } ?? .unknownBackend(id)
        case .keyed(let key, let name, let placement):
            guard let settings = self.pools[name], let pool = settings.pool else {
                return .unknownPool(name)
            }
            var strategy = settings.placement
            if let placement {
                guard let named = PlacementStrategyKind(rawValue: placement) else { return .unknownPlacement(placement) }
                strategy = named
            }
            // The common case first: a valid owner, found without building the placement closures (and its `Backend`
            // taken from the pool while checking it, not looked up by id again). The check is passed as a closure
            // literal, not kept in a local: a stored closure capturing `owner` cost two heap allocations per request.
            var owner: Backend?
            let valid =
                acquiringLease
                ? self.directory.acquireValidOwner(key: key, pool: name) { id in
                    Self.servingBackend(id, in: pool, found: &owner)
                }
                : self.directory.validOwner(key: key, pool: name) { id in
                    Self.servingBackend(id, in: pool, found: &owner)
                }
            if let ownership = valid {
                if let owner, owner.id == ownership.backend { return .owned(owner, ownership) }
                let resolution = self.owned(ownership)
                if acquiringLease, case .noBackend = resolution { self.directory.releaseLease(key: key) }
                return resolution
            }
            let query = self.ownershipQuery(key: key, pool: pool, settings: settings, strategy: strategy)
            switch self.directory.resolve(query, on: eventLoop) {
            case .owned(let ownership):
                let resolution = self.owned(ownership)
                if acquiringLease, case .owned = resolution { self.directory.acquireLease(key: key) }
                return resolution
            case .pending(let future):
                return .pending(future)
            case .unavailable:
                return .noBackend
            }
        }
    }

    private func owned(_ ownership: Ownership) -> TargetResolution {
        self.table.backends[ownership.backend].map { .owned($0, ownership) } ?? .noBackend
    }

    /// Whether the pool's backend `id` may go on serving keys it owns; `found` is that backend when it may.
    private static func servingBackend(_ id: String, in pool: Pool, found: inout Backend?) -> Bool {
        guard let backend = pool.backends.first(where: { $0.id == id }), backend.canServeExistingKeys else { return false }
        found = backend
        return true
    }
}
