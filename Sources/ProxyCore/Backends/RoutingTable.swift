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
public enum TargetResolution: Equatable {
    case backend(Backend)
    /// The pool exists but has no backend to offer (→ 503).
    case noBackend
    /// The decision is malformed for this configuration (→ 500, logged).
    case unknownPool(String)
    case unknownBackend(String)
    case unknownPlacement(String)

    public static func == (lhs: TargetResolution, rhs: TargetResolution) -> Bool {
        switch (lhs, rhs) {
        case (.backend(let a), .backend(let b)): return a === b
        case (.noBackend, .noBackend): return true
        case (.unknownPool(let a), .unknownPool(let b)), (.unknownBackend(let a), .unknownBackend(let b)),
            (.unknownPlacement(let a), .unknownPlacement(let b)):
            return a == b
        default: return false
        }
    }
}

extension RoutingTable {
    /// The backend a forwarding target names. Stateless targets are balanced (so this advances the pool's cursor);
    /// a key goes to its claimed owner when that owner is in the pool and usable, else to its rendezvous-hash backend
    /// among the usable ones. An explicitly named backend is returned whatever its health (the script chose it).
    public func resolve(_ target: RouteTarget, owners: KeyOwners) -> TargetResolution {
        switch target {
        case .pool(let name):
            guard let pool = self.pools[name] else { return .unknownPool(name) }
            return pool.pick().map { .backend($0) } ?? .noBackend
        case .backend(let id):
            return self.backends[id].map { .backend($0) } ?? .unknownBackend(id)
        case .keyed(let key, let name, let placement):
            guard let pool = self.pools[name] else { return .unknownPool(name) }
            if let placement, !PlacementStrategy.names.contains(placement) { return .unknownPlacement(placement) }
            if let ownerID = owners.owner(of: key), let owner = self.backends[ownerID],
                pool.backends.contains(where: { $0 === owner }), owner.isUsable
            {
                return .backend(owner)
            }
            // Rendezvous over the usable backends only. Hashing all first is the common case and gives the same
            // answer whenever the winner is usable (removing a backend moves only its own keys).
            if let id = ConsistentHashing.rendezvous(key: key, backends: pool.hashInputs), let backend = self.backends[id],
                backend.isUsable
            {
                return .backend(backend)
            }
            let usable = pool.backends.filter(\.isUsable).map { (id: $0.id, weight: $0.config.weight) }
            guard let id = ConsistentHashing.rendezvous(key: key, backends: usable), let backend = self.backends[id]
            else { return .noBackend }
            return .backend(backend)
        }
    }
}
