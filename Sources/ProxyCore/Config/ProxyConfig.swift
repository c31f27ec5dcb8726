import NIOCore

/// The whole configuration of one proxy process, as loaded from YAML (see `docs/configuration.md`).
///
/// Every field has a default, so `ProxyConfig()` is a valid (if empty) configuration; `ConfigLoader` fills it
/// from a file and reports every problem with `file:line:column` and the key path.
public struct ProxyConfig: Sendable, Equatable {
    public var listeners: [ListenerConfig]
    /// Named pools of backends. Order of declaration is kept (for stable listings), lookups go by name.
    public var pools: [PoolConfig]
    public var timeouts: TimeoutsConfig
    public var limits: LimitsConfig
    public var admin: AdminConfig?
    public var logging: LoggingConfig
    public var ownership: OwnershipConfig
    public var threads: ThreadsConfig

    public init(
        listeners: [ListenerConfig] = [],
        pools: [PoolConfig] = [],
        timeouts: TimeoutsConfig = .init(),
        limits: LimitsConfig = .init(),
        admin: AdminConfig? = nil,
        logging: LoggingConfig = .init(),
        ownership: OwnershipConfig = .init(),
        threads: ThreadsConfig = .init()
    ) {
        self.listeners = listeners
        self.pools = pools
        self.timeouts = timeouts
        self.limits = limits
        self.admin = admin
        self.logging = logging
        self.ownership = ownership
        self.threads = threads
    }

    public func pool(named name: String) -> PoolConfig? {
        self.pools.first { $0.name == name }
    }
}

/// A socket the proxy accepts client connections on.
public struct ListenerConfig: Sendable, Equatable {
    /// A label used in logs and metrics. Defaults to `address:port`.
    public var name: String
    public var address: String
    public var port: Int
    /// The pool requests go to when no routing script decides otherwise.
    public var pool: String
    /// Optional TLS termination.
    public var tls: TLSConfig?
    /// Optional routing script; without one every request goes to `pool`.
    public var routing: RoutingScriptConfig?
    /// Forward plain requests from their raw bytes (`FastPathHandler`, docs/architecture.md "Fast path"); anything
    /// unusual still takes the full HTTP path. On by default; `false` sends every request through the full path.
    public var fastPath: Bool

    public init(
        name: String? = nil,
        address: String = "0.0.0.0",
        port: Int,
        pool: String,
        tls: TLSConfig? = nil,
        routing: RoutingScriptConfig? = nil,
        fastPath: Bool = true
    ) {
        self.name = name ?? "\(address):\(port)"
        self.address = address
        self.port = port
        self.pool = pool
        self.tls = tls
        self.routing = routing
        self.fastPath = fastPath
    }
}

/// A Lua routing script attached to a listener (see `docs/routing-api.md`).
public struct RoutingScriptConfig: Sendable, Equatable {
    /// Absolute path of the script (a relative path in the file is resolved against the file's directory).
    public var script: String
    /// Any YAML value, handed to the script as `proxy.options`.
    public var options: ConfigValue
    /// Lua VM instructions one call may run before it is stopped (the request then fails).
    public var instructionLimit: Int
    /// Bytes the script's Lua state may allocate in total.
    public var memoryLimit: Int
    /// When the script fails for a request, send it to any backend of this pool instead of answering 500.
    public var fallbackPool: String?

    public init(
        script: String,
        options: ConfigValue = .map([:]),
        instructionLimit: Int = 1_000_000,
        memoryLimit: Int = 16 * 1024 * 1024,
        fallbackPool: String? = nil
    ) {
        self.script = script
        self.options = options
        self.instructionLimit = instructionLimit
        self.memoryLimit = memoryLimit
        self.fallbackPool = fallbackPool
    }
}

/// A YAML value kept as data (for script options).
public enum ConfigValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case list([ConfigValue])
    case map([String: ConfigValue])
}

public struct TLSConfig: Sendable, Equatable {
    /// PEM file holding the certificate chain, leaf first.
    public var certificatePath: String
    /// PEM file holding the private key.
    public var keyPath: String

    public init(certificatePath: String, keyPath: String) {
        self.certificatePath = certificatePath
        self.keyPath = keyPath
    }
}

/// How a pool picks a backend for a request that is not bound to a key.
public enum BalanceAlgorithm: String, Sendable, Equatable, CaseIterable {
    case roundRobin = "round-robin"
    case leastConnections = "least-connections"
}

public struct PoolConfig: Sendable, Equatable {
    public var name: String
    public var balance: BalanceAlgorithm
    /// The static backends; a pool with `discovery` serves these together with the discovered ones.
    public var backends: [BackendConfig]
    /// How long a key stays owned after its last request or tunnel ends (OTT unloads an empty room after 300 s).
    public var idleTTL: TimeAmount
    /// The placement strategy for keys whose decision names none (`PlacementStrategy.names`).
    public var placement: String
    /// Bounded-load ε: no backend takes more than (1 + ε) × its share of keys.
    public var balanceFactor: Double
    /// Request header carrying the key to the backend (absent: not sent).
    public var keyHeader: String?
    /// Request header carrying the owner's epoch (fencing token) to the backend (absent: not sent).
    public var epochHeader: String?
    /// Active HTTP health checks (nil = none: backends count as healthy unless passively ejected).
    public var healthCheck: HealthCheckConfig?
    /// Passive ejection on failed requests (nil = off).
    public var passive: PassiveConfig?
    /// Backends found in DNS, merged with `backends` (nil = static backends only).
    public var discovery: DiscoveryConfig?

    public init(
        name: String,
        balance: BalanceAlgorithm = .roundRobin,
        backends: [BackendConfig] = [],
        idleTTL: TimeAmount = .seconds(330),
        placement: String = "least-keys",
        balanceFactor: Double = 0.25,
        keyHeader: String? = nil,
        epochHeader: String? = nil,
        healthCheck: HealthCheckConfig? = nil,
        passive: PassiveConfig? = nil,
        discovery: DiscoveryConfig? = nil
    ) {
        self.name = name
        self.balance = balance
        self.backends = backends
        self.idleTTL = idleTTL
        self.placement = placement
        self.balanceFactor = balanceFactor
        self.keyHeader = keyHeader
        self.epochHeader = epochHeader
        self.healthCheck = healthCheck
        self.passive = passive
        self.discovery = discovery
    }
}

/// Where key ownership lives and how owner changes reach clients.
public struct OwnershipConfig: Sendable, Equatable {
    public enum Store: String, Sendable, Equatable, CaseIterable {
        /// One process's truth (the embedded default): fine for one proxy.
        case memory
        /// A shared Redis server (`ownership.redis`): several proxies agree on every key's owner.
        case redis
    }

    public var store: Store
    /// The Redis store's settings (set when `store` is `redis`).
    public var redis: RedisOwnershipConfig?
    /// This proxy's region: placement prefers backends in it and uses others only when it has none usable.
    public var region: String?
    /// WebSocket close code sent when the proxy closes a tunnel because its key moved (1000-3999; OTT clients
    /// reconnect on codes below 4000 and give up on 4000 and above).
    public var closeCode: UInt16
    /// Tunnels closed per second on a backend drained with `migrate=true`.
    public var migrateRate: Double

    public init(
        store: Store = .memory, region: String? = nil, closeCode: UInt16 = 1012, migrateRate: Double = 20,
        redis: RedisOwnershipConfig? = nil
    ) {
        self.store = store
        self.redis = redis
        self.region = region
        self.closeCode = closeCode
        self.migrateRate = migrateRate
    }
}

/// `ownership.redis`: where the shared ownership directory lives and what to do when it cannot be reached.
public struct RedisOwnershipConfig: Sendable, Equatable {
    public enum OnUnavailable: String, Sendable, Equatable, CaseIterable {
        /// Keep serving cached keys; place new keys by rendezvous hashing and claim them when Redis is back.
        case degrade
        /// Answer 503 for keys not cached.
        case fail
    }

    /// `redis://[[user]:password@]host[:port][/db]` or `rediss://...` (TLS).
    public var url: String
    /// Prepended to every Redis key and to the changes channel (`<prefix>changes`).
    public var prefix: String
    /// Per-command timeout: a command that takes longer counts as Redis being unavailable.
    public var timeout: TimeAmount
    public var onUnavailable: OnUnavailable
    /// How often leases of keys with live connections are renewed (nil: a third of the shortest pool `idle_ttl`).
    public var leaseRenewInterval: TimeAmount?

    public init(
        url: String = "redis://127.0.0.1:6379/0",
        prefix: String = "ott:",
        timeout: TimeAmount = .milliseconds(250),
        onUnavailable: OnUnavailable = .degrade,
        leaseRenewInterval: TimeAmount? = nil
    ) {
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.onUnavailable = onUnavailable
        self.leaseRenewInterval = leaseRenewInterval
    }
}

public struct BackendConfig: Sendable, Equatable {
    /// Stable identity of the backend: never derived from its address or its position in the list.
    public var id: String
    public var host: String
    public var port: Int
    /// Relative share of stateless traffic (≥ 1).
    public var weight: Int
    public var region: String?
    public var tags: [String]
    /// Capacity: at most this many keys placed here (nil = unbounded).
    public var maxKeys: Int?
    /// Capacity: at most this many concurrent connections (requests and tunnels) here (nil = unbounded).
    public var maxConnections: Int?

    public init(
        id: String,
        host: String,
        port: Int,
        weight: Int = 1,
        region: String? = nil,
        tags: [String] = [],
        maxKeys: Int? = nil,
        maxConnections: Int? = nil
    ) {
        self.id = id
        self.host = host
        self.port = port
        self.weight = weight
        self.region = region
        self.tags = tags
        self.maxKeys = maxKeys
        self.maxConnections = maxConnections
    }
}

public struct TimeoutsConfig: Sendable, Equatable {
    /// Opening a TCP connection to a backend. Exceeded → 504.
    public var connect: TimeAmount
    /// Receiving a complete request head from a client, counted from the first byte of the request (or from the
    /// connection being accepted). Exceeded → 408 and close.
    public var requestHeader: TimeAmount
    /// Waiting for the backend's response head once the request head was sent. Exceeded → 504.
    public var upstreamResponseHeader: TimeAmount
    /// How long a client keep-alive connection may sit idle between requests.
    public var idleKeepAlive: TimeAmount
    /// How long an idle pooled backend connection is kept for reuse.
    public var upstreamIdle: TimeAmount
    /// How long an upgraded connection (WebSocket) may pass no bytes in either direction.
    public var tunnelIdle: TimeAmount
    /// On shutdown: how long in-flight requests get to finish before everything is closed.
    public var shutdownGrace: TimeAmount

    public init(
        connect: TimeAmount = .seconds(5),
        requestHeader: TimeAmount = .seconds(10),
        upstreamResponseHeader: TimeAmount = .seconds(60),
        idleKeepAlive: TimeAmount = .seconds(75),
        upstreamIdle: TimeAmount = .seconds(60),
        tunnelIdle: TimeAmount = .seconds(3600),
        shutdownGrace: TimeAmount = .seconds(30)
    ) {
        self.connect = connect
        self.requestHeader = requestHeader
        self.upstreamResponseHeader = upstreamResponseHeader
        self.idleKeepAlive = idleKeepAlive
        self.upstreamIdle = upstreamIdle
        self.tunnelIdle = tunnelIdle
        self.shutdownGrace = shutdownGrace
    }
}

public struct LimitsConfig: Sendable, Equatable {
    /// Largest request head (request line and all header lines) accepted. Larger → 431.
    public var maxHeaderBytes: Int
    /// Largest number of client connections open at once, over all listeners; further ones are closed at accept.
    public var maxConnections: Int
    /// Largest body the proxy will hold in memory when it must buffer one (bodies are otherwise streamed).
    public var maxBufferedBody: Int
    /// Idle keep-alive connections kept per backend per event loop.
    public var maxIdleUpstreamPerBackend: Int

    public init(
        maxHeaderBytes: Int = 32 * 1024,
        maxConnections: Int = 8192,
        maxBufferedBody: Int = 1024 * 1024,
        maxIdleUpstreamPerBackend: Int = 64
    ) {
        self.maxHeaderBytes = maxHeaderBytes
        self.maxConnections = maxConnections
        self.maxBufferedBody = maxBufferedBody
        self.maxIdleUpstreamPerBackend = maxIdleUpstreamPerBackend
    }
}

/// The event loop threads (docs/configuration.md, `threads`). Fixed for the life of the process: a reload that
/// changes them is refused.
public struct ThreadsConfig: Sendable, Equatable {
    /// How event loop threads are placed on CPUs.
    public enum CPUAffinity: String, Sendable, Equatable, CaseIterable {
        /// The kernel places and moves threads (the default, like nginx and HAProxy 2.6).
        case none
        /// Loop `i` is bound to the `i`-th CPU this process may run on (round robin when there are more loops).
        case auto
    }

    /// Event loop threads; nil means one per CPU available to the process (`System.coreCount`, which honours
    /// cgroup quotas and cpusets).
    public var count: Int?
    public var cpuAffinity: CPUAffinity
    /// Established tunnels (WebSocket) move off their NIO channels to the relay threads, one per event loop, which
    /// own the sockets' descriptors (`TunnelRelay`): an idle WebSocket then costs a few hundred bytes instead of two
    /// channels' 4.8 KB. On by default; `false` keeps every tunnel on NIO channels. TLS listeners always do.
    public var tunnelRelay: Bool
    /// How new connections reach the event loops.
    public var accept: Accept
    /// Established keep-alive HTTP connections move off their NIO channels to relay threads of their own, one per
    /// event loop, which serve their further requests on the sockets' descriptors (`HTTPRelay`): about a third less
    /// user CPU per request. A connection moves after two fast-path exchanges in a row on keyed or named-backend
    /// routes, with its backend connection; any request the relay does not serve goes back to NIO. Plain (non-TLS)
    /// listeners with the fast path only.
    public var httpRelay: Bool
    /// How many HTTP relay threads (and shards) there are (`threads.http_relay_count`); nil (not set) means one per
    /// event loop (`resolvedHTTPRelayCount`). The threads serve the shards from one queue (`HTTPRelay`).
    public var httpRelayCount: Int?
    /// The HTTP relay threads write the answers of one pass over their ready connections with one system call, an
    /// io_uring of sends (`SendBatch`), instead of one `send(2)` each: about a tenth less CPU per request. Where the
    /// kernel refuses io_uring (a seccomp filter, `kernel.io_uring_disabled`) they use `send(2)` anyway. On by
    /// default; `false` always uses `send(2)`.
    public var ioUring: Bool
    /// A relay thread (HTTP or tunnel) that sent anything in a pass over its ready connections yields its CPU
    /// afterwards (`sched_yield`), so the clients and backends it woke run at once where they share its CPU, instead of
    /// when the scheduler preempts it. On by default; `false` never yields.
    public var yieldAfterBatch: Bool

    /// How a listener accepts connections when there is more than one event loop.
    public enum Accept: String, Sendable, Equatable, CaseIterable {
        /// One listening socket per loop (`SO_REUSEPORT`): each loop accepts its own connections, spread over the
        /// loops by the kernel (a hash of the client's address and port). No connection crosses threads.
        case perLoop = "per_loop"
        /// One listening socket: one loop accepts every connection and hands each to the next loop in turn.
        case oneLoop = "one_loop"
    }

    public static let countRange = 1...1024

    public init(
        count: Int? = nil, cpuAffinity: CPUAffinity = .none, tunnelRelay: Bool = true, accept: Accept = .perLoop,
        httpRelay: Bool = true, httpRelayCount: Int? = nil, ioUring: Bool = true, yieldAfterBatch: Bool = true
    ) {
        self.count = count
        self.cpuAffinity = cpuAffinity
        self.tunnelRelay = tunnelRelay
        self.accept = accept
        self.httpRelay = httpRelay
        self.httpRelayCount = httpRelayCount
        self.ioUring = ioUring
        self.yieldAfterBatch = yieldAfterBatch
    }

    /// The number of loops to start.
    public var resolvedCount: Int { self.count ?? System.coreCount }

    /// The number of HTTP relay threads to start with `loops` event loops: `http_relay_count`, or one per loop.
    public func resolvedHTTPRelayCount(loops: Int) -> Int { self.httpRelayCount ?? loops }
}

public struct AdminConfig: Sendable, Equatable {
    public var address: String
    public var port: Int
    /// Bearer token required on admin requests (nil = none configured).
    public var token: String?
    /// Name of an environment variable holding the token (read at start and on reload).
    public var tokenEnv: String?
    /// Serve `/metrics` without the token.
    public var metricsOpen: Bool

    public init(
        address: String = "127.0.0.1",
        port: Int = 9901,
        token: String? = nil,
        tokenEnv: String? = nil,
        metricsOpen: Bool = true
    ) {
        self.address = address
        self.port = port
        self.token = token
        self.tokenEnv = tokenEnv
        self.metricsOpen = metricsOpen
    }
}

public enum LogLevel: String, Sendable, Equatable, CaseIterable {
    case trace, debug, info, notice, warning, error, critical
}

public enum LogFormat: String, Sendable, Equatable, CaseIterable {
    case logfmt, json
}

public struct LoggingConfig: Sendable, Equatable {
    public var level: LogLevel
    public var format: LogFormat
    public var accessLog: Bool

    public init(level: LogLevel = .info, format: LogFormat = .logfmt, accessLog: Bool = true) {
        self.level = level
        self.format = format
        self.accessLog = accessLog
    }
}
