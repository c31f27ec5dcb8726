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
