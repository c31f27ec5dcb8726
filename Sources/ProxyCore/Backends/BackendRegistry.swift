import Logging
import NIOCore
import Synchronization

/// The backends of the generation in force, by id, and the backends DNS discovery found, by pool: what lets health
/// state outlive a reload.
///
/// Building a generation is two steps, so that a reload that fails half-way changes nothing:
/// 1. `table(for:)` builds the new `RoutingTable`. A backend whose id, host, port and resolved address are unchanged
///    keeps its `BackendHealth` (its active-check verdict, failure counts and ejection); when its whole
///    `BackendConfig` is unchanged the `Backend` object itself is reused, live connection counters included.
/// 2. `commit(_:config:)`, once the generation is in force, applies the pools' new health settings and marks
///    backends that are gone as `removed` (requests and tunnels of older generations may still hold them).
public final class BackendRegistry: Sendable {
    private struct State {
        var backends: [String: Backend] = [:]
        var discovered: [String: [BackendConfig]] = [:]
    }

    private let state = Mutex(State())
    private let logger: Logger?

    public init(logger: Logger? = nil) {
        self.logger = logger
    }

    /// The backends of the committed generation, by id.
    public var backends: [String: Backend] { self.state.withLock { $0.backends } }

    /// What discovery last reported for `pool` (merged into the pool only while it has `discovery` configured).
    public func discovered(pool: String) -> [BackendConfig] {
        self.state.withLock { $0.discovered[pool] ?? [] }
    }

    public func setDiscovered(pool: String, backends: [BackendConfig]) {
        self.state.withLock { $0.discovered[pool] = backends }
    }

    /// Every backend of `config`'s pools: the static ones, then (for pools with `discovery`) the discovered ones
    /// whose id no static backend uses.
    public func backendConfigs(of pool: PoolConfig) -> [BackendConfig] {
        guard pool.discovery != nil else { return pool.backends }
        let staticIDs = Set(pool.backends.map(\.id))
        return pool.backends + self.discovered(pool: pool.name).filter { !staticIDs.contains($0.id) }
    }

    /// Step 1: the routing table for `config`, reusing health state by id. Resolves host names (blocking), so call
    /// it off the event loops. Changes nothing here.
    public func table(for config: ProxyConfig) throws -> RoutingTable {
        let current = self.backends
        var seen = Set<String>()
        let pools = try config.pools.map { pool in
            let backends = try self.backendConfigs(of: pool).compactMap { backendConfig -> Backend? in
                // Ids are unique in a file; a discovered id can only repeat across pools, where the first wins.
                guard seen.insert(backendConfig.id).inserted else { return nil }
                let address = try SocketAddress.makeAddressResolvingHost(backendConfig.host, port: backendConfig.port)
                guard let old = current[backendConfig.id], old.config.host == backendConfig.host,
                    old.config.port == backendConfig.port, old.address == address, old.health.snapshot.lifecycle != .removed
                else {
                    let health = BackendHealth(
                        id: backendConfig.id, settings: BackendStateMachine.Settings(pool: pool), logger: self.logger)
                    return Backend(config: backendConfig, address: address, health: health)
                }
                if old.config == backendConfig { return old }
                return Backend(config: backendConfig, address: address, health: old.health)
            }
            return Pool(name: pool.name, balance: pool.balance, backends: backends)
        }
        return RoutingTable(pools: pools)
    }

    /// Step 2: `table` (built by `table(for: config)`) is now in force.
    public func commit(_ table: RoutingTable, config: ProxyConfig) {
        let previous = self.state.withLock { state -> [String: Backend] in
            let previous = state.backends
            state.backends = table.backends
            let pools = Set(config.pools.filter { $0.discovery != nil }.map(\.name))
            state.discovered = state.discovered.filter { pools.contains($0.key) }
            return previous
        }
        for pool in config.pools {
            let settings = BackendStateMachine.Settings(pool: pool)
            for backend in table.pools[pool.name]?.backends ?? [] where backend.health.snapshot.settings != settings {
                backend.health.update(settings: settings)
            }
        }
        for (id, backend) in previous where table.backends[id]?.health !== backend.health {
            backend.health.remove()
        }
    }
}
