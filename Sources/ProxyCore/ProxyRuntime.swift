import Logging

/// Everything one configuration generation gives the data path: settings, the backend snapshot, loggers and metrics.
/// Immutable; a reload builds a new one and new connections pick it up.
public final class ProxyRuntime: Sendable {
    public let config: ProxyConfig
    public let table: RoutingTable
    public let logger: Logger
    public let accessLogger: Logger
    public let accessLog: Bool
    public let metrics: ProxyMetrics
    /// Key ownership, open tunnels and drains: shared by every generation, so a reload keeps them.
    public let directory: OwnershipDirectory
    public let tunnels: TunnelRegistry
    public let drains: DrainRegistry
    /// Counts reloads: 1 for the configuration the server started with.
    public let generation: Int
    /// Each pool's settings by name, looked up on every keyed request.
    let pools: [String: PoolSettings]

    /// A pool's configuration with its default placement already parsed: the data path looks it up by name once per
    /// keyed request, where a search of the configuration copied the whole `PoolConfig` (twice per request).
    final class PoolSettings: Sendable {
        let config: PoolConfig
        let placement: PlacementStrategyKind
        /// The routing table's pool of the same name (nil when the table has none): one lookup per keyed request
        /// finds both.
        let pool: Pool?

        init(config: PoolConfig, pool: Pool?) {
            self.config = config
            self.placement = PlacementStrategyKind(rawValue: config.placement) ?? .leastKeys
            self.pool = pool
        }
    }

    public init(
        config: ProxyConfig, table: RoutingTable, logger: Logger, accessLogger: Logger, metrics: ProxyMetrics,
        directory: OwnershipDirectory = InMemoryOwnershipDirectory(), tunnels: TunnelRegistry = TunnelRegistry(),
        drains: DrainRegistry = DrainRegistry(), generation: Int = 1
    ) {
        self.config = config
        self.table = table
        self.logger = logger
        self.accessLogger = accessLogger
        self.accessLog = config.logging.accessLog
        self.metrics = metrics
        self.directory = directory
        self.tunnels = tunnels
        self.drains = drains
        self.generation = generation
        self.pools = Dictionary(
            config.pools.map { ($0.name, PoolSettings(config: $0, pool: table.pools[$0.name])) },
            uniquingKeysWith: { first, _ in first })
    }
}

extension ProxyRuntime {
    /// A runtime for a new configuration that keeps this one's shared state (ownership, tunnels, drains, metrics).
    func next(config: ProxyConfig, table: RoutingTable) -> ProxyRuntime {
        ProxyRuntime(
            config: config, table: table, logger: self.logger, accessLogger: self.accessLogger, metrics: self.metrics,
            directory: self.directory, tunnels: self.tunnels, drains: self.drains, generation: self.generation + 1)
    }

    func poolConfig(named name: String) -> PoolConfig? {
        self.pools[name]?.config
    }
}

/// What a request handler needs to know about the listener it serves.
struct ListenerContext: Sendable {
    let name: String
    let scheme: String
}
