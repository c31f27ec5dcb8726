import NIOCore
import Synchronization

/// Backends an operator asked to drain, by id. Kept outside the configuration generations so a reload does not
/// undo a drain.
public final class DrainRegistry: Sendable {
    public struct Drain: Sendable, Equatable {
        public var migrate: Bool
    }

    private let drains = Mutex<[String: Drain]>([:])

    public init() {}

    public func drain(_ id: String, migrate: Bool) {
        self.drains.withLock { $0[id] = Drain(migrate: migrate || ($0[id]?.migrate ?? false)) }
    }

    public func undrain(_ id: String) {
        _ = self.drains.withLock { $0.removeValue(forKey: id) }
    }

    public func state(of id: String) -> Drain? {
        self.drains.withLock { $0[id] }
    }

    public func isDraining(_ id: String) -> Bool {
        self.drains.withLock { $0[id] != nil }
    }
}

/// The live view a routing policy gets: backends of the current generation and the directory's owners.
public struct LiveRoutingEnvironment: RoutingEnvironment {
    let table: RoutingTable
    let directory: OwnershipDirectory
    let drains: DrainRegistry

    public init(table: RoutingTable, directory: OwnershipDirectory, drains: DrainRegistry) {
        self.table = table
        self.directory = directory
        self.drains = drains
    }

    public func backends(pool: String) -> [BackendSnapshot]? {
        guard let pool = self.table.pools[pool] else { return nil }
        return pool.backends.map { backend in
            BackendSnapshot(
                id: backend.id,
                pool: pool.name,
                healthy: backend.isHealthy,
                draining: self.drains.isDraining(backend.id),
                region: backend.config.region,
                tags: backend.config.tags,
                weight: backend.config.weight,
                keys: self.directory.keyCount(on: backend.id),
                connections: backend.active
            )
        }
    }

    public func owner(key: String) -> String? {
        self.directory.owner(of: key)?.backend
    }
}

extension ProxyRuntime {
    /// The directory query for a keyed decision: keep a still-valid owner, else place by `placement` (or the pool's
    /// default) among the pool's backends that accept new keys.
    func ownershipQuery(key: String, pool: Pool, settings: PoolSettings, strategy: PlacementStrategyKind) -> OwnershipQuery {
        let backends = pool.backends
        let stillValid = { @Sendable (id: String) in Self.mayKeepKeys(backends, id) }
        let poolObject = pool
        let drains = self.drains
        let region = self.config.ownership.region
        let factor = settings.config.balanceFactor
        return OwnershipQuery(
            key: key,
            pool: pool.name,
            idleTTL: settings.config.idleTTL,
            stillValid: stillValid,
            place: { avoiding, keysOn in
                let candidates = Self.placementCandidates(backends, avoiding: avoiding, keysOn: keysOn, drains: drains)
                let request = PlacementRequest(
                    key: key, strategy: strategy, preferredRegion: region, balanceFactor: factor,
                    seed: UInt64.random(in: .min ... .max), turn: Int.random(in: 0..<Int.max))
                return poolObject.placementCache.withLock { cache in
                    Placement.place(request, candidates: candidates, cache: &cache)
                }
            },
            placeAgreed: { avoiding in
                // Loads differ between proxies: ignore them (and capacities) so every proxy picks the same backend.
                let candidates = Self.placementCandidates(backends, avoiding: avoiding, keysOn: { _ in 0 }, drains: drains)
                    .map { candidate -> PlacementCandidate in
                        var candidate = candidate
                        candidate.keys = 0
                        candidate.connections = 0
                        candidate.maxKeys = nil
                        candidate.maxConnections = nil
                        return candidate
                    }
                return Placement.place(PlacementRequest(key: key, strategy: .rendezvous, preferredRegion: region),
                                       candidates: candidates)
            }
        )
    }

    /// Whether an owner may keep its keys: a draining backend keeps its existing keys (they end naturally); a down
    /// or removed one does not.
    static func mayKeepKeys(_ backends: [Backend], _ id: String) -> Bool {
        backends.contains { $0.id == id && $0.canServeExistingKeys }
    }

    private static func placementCandidates(
        _ backends: [Backend], avoiding: String?, keysOn: (String) -> Int, drains: DrainRegistry
    ) -> [PlacementCandidate] {
        backends.map { backend in
            PlacementCandidate(
                id: backend.id,
                weight: backend.config.weight,
                region: backend.config.region,
                keys: keysOn(backend.id),
                connections: backend.active,
                maxKeys: backend.config.maxKeys,
                maxConnections: backend.config.maxConnections,
                usable: backend.id != avoiding && backend.acceptsNewKeys && !drains.isDraining(backend.id)
            )
        }
    }
}
