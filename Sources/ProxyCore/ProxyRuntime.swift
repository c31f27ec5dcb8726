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
    /// Claimed key owners; shared by every generation, so a reload keeps them.
    public let owners: KeyOwners
    /// Counts reloads: 1 for the configuration the server started with.
    public let generation: Int

    public init(
        config: ProxyConfig, table: RoutingTable, logger: Logger, accessLogger: Logger, metrics: ProxyMetrics,
        owners: KeyOwners = KeyOwners(), generation: Int = 1
    ) {
        self.config = config
        self.table = table
        self.logger = logger
        self.accessLogger = accessLogger
        self.accessLog = config.logging.accessLog
        self.metrics = metrics
        self.owners = owners
        self.generation = generation
    }
}

/// What a request handler needs to know about the listener it serves.
struct ListenerContext: Sendable {
    let name: String
    let scheme: String
}
