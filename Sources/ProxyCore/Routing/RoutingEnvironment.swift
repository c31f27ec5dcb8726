/// What a routing policy may know about the backends: a snapshot from this proxy's point of view, no I/O.
public struct BackendSnapshot: Sendable, Equatable {
    public var id: String
    public var pool: String
    public var healthy: Bool
    public var draining: Bool
    /// A free-form region label, when the backend has one.
    public var region: String?
    public var tags: [String]
    public var weight: Int
    /// Keys this proxy currently routes to the backend.
    public var keys: Int
    /// Open connections from this proxy to the backend.
    public var connections: Int

    public init(
        id: String,
        pool: String,
        healthy: Bool = true,
        draining: Bool = false,
        region: String? = nil,
        tags: [String] = [],
        weight: Int = 1,
        keys: Int = 0,
        connections: Int = 0
    ) {
        self.id = id
        self.pool = pool
        self.healthy = healthy
        self.draining = draining
        self.region = region
        self.tags = tags
        self.weight = weight
        self.keys = keys
        self.connections = connections
    }
}

/// Read-only state a routing policy may consult while it decides. Implementations answer from memory: they are
/// called on the event loop, once or more per request.
public protocol RoutingEnvironment: Sendable {
    /// The backends of `pool`, or nil when there is no such pool.
    func backends(pool: String) -> [BackendSnapshot]?
    /// The id of the backend that owns `key`, as this proxy currently sees it; nil when nobody does.
    func owner(key: String) -> String?
}

/// An environment with fixed contents: for tests, `ott-proxy check`, and scripts run outside the server.
public struct StaticRoutingEnvironment: RoutingEnvironment {
    public var pools: [String: [BackendSnapshot]]
    public var owners: [String: String]

    public init(pools: [String: [BackendSnapshot]] = [:], owners: [String: String] = [:]) {
        self.pools = pools
        self.owners = owners
    }

    public func backends(pool: String) -> [BackendSnapshot]? { self.pools[pool] }
    public func owner(key: String) -> String? { self.owners[key] }
}
