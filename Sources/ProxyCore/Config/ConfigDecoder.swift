import NIOCore
import Yams

/// Maps the YAML schema documented in `docs/configuration.md` onto `ProxyConfig`.
///
/// Reading a section never stops early: a bad value is reported and replaced by its default, so that later sections
/// are still checked and cross-references (listener → pool, backend ids) can be validated too.
final class ConfigDecoder {
    private let reader: NodeReader

    /// Values whose validity depends on other parts of the file, remembered with their position for `validate()`.
    private var poolReferences: [(name: String, node: Node, path: String)] = []
    private var backendIDs: [(id: String, node: Node, path: String)] = []
    private var sockets: [(address: String, port: Int, node: Node, path: String)] = []
    private var listenerNames: [(name: String, node: Node, path: String)] = []

    init(reader: NodeReader) {
        self.reader = reader
    }

    func config(_ root: Node) -> ProxyConfig {
        let r = self.reader
        guard
            let top = r.section(
                root, path: "", keys: ["listeners", "pools", "timeouts", "limits", "admin", "logging", "ownership", "threads"])
        else {
            return ProxyConfig()
        }
        var config = ProxyConfig()
        config.listeners = r.required(top, "listeners", self.listeners) ?? []
        config.pools = r.required(top, "pools", self.pools) ?? []
        config.timeouts = r.optional(top, "timeouts", self.timeouts) ?? TimeoutsConfig()
        config.limits = r.optional(top, "limits", self.limits) ?? LimitsConfig()
        config.admin = r.optional(top, "admin", self.admin)
        config.logging = r.optional(top, "logging", self.logging) ?? LoggingConfig()
        config.ownership = r.optional(top, "ownership", self.ownership) ?? OwnershipConfig()
        config.threads = r.optional(top, "threads", self.threads) ?? ThreadsConfig()
        self.validate(config)
        return config
    }

    // MARK: listeners

    private func listeners(_ node: Node, path: String) -> [ListenerConfig]? {
        guard let items = self.reader.list(node, path: path) else { return nil }
        if items.isEmpty {
            self.reader.report("at least one listener is required", at: node.mark, path: path)
        }
        return items.enumerated().compactMap { index, item in self.listener(item, path: "\(path)[\(index)]") }
    }

    private func listener(_ node: Node, path: String) -> ListenerConfig? {
        let r = self.reader
        guard let s = r.section(node, path: path, keys: ["name", "address", "port", "pool", "tls", "routing", "fast_path"]) else {
            return nil
        }
        let name = r.optional(s, "name", r.string)
        let address = r.optional(s, "address", r.string) ?? "0.0.0.0"
        let port = r.required(s, "port") { r.int($0, path: $1, min: 1, max: 65535) }
        let pool = r.required(s, "pool", r.string)
        let tls = r.optional(s, "tls", self.tls)
        let routing = r.optional(s, "routing", self.routing)
        let fastPath = r.optional(s, "fast_path", r.bool) ?? true

        // Registered even when a sibling key is bad, so one run reports a wrong pool name along with a wrong port.
        if let pool, let poolNode = s.values["pool"] {
            self.poolReferences.append((pool, poolNode, s.path(of: "pool")))
        }
        if let port, let portNode = s.values["port"] {
            self.sockets.append((address, port, portNode, s.path(of: "port")))
        }
        // Default names derive from address:port, so their clashes are already reported as socket clashes.
        if let name, let nameNode = s.values["name"] {
            self.listenerNames.append((name, nameNode, s.path(of: "name")))
        }

        guard let port, let pool else { return nil }
        return ListenerConfig(
            name: name, address: address, port: port, pool: pool, tls: tls, routing: routing, fastPath: fastPath)
    }

    private func routing(_ node: Node, path: String) -> RoutingScriptConfig? {
        let r = self.reader
        let keys = ["script", "options", "instruction_limit", "memory_limit", "fallback_pool"]
        guard let s = r.section(node, path: path, keys: keys) else { return nil }
        let script = r.required(s, "script", r.string)
        let options = r.optional(s, "options") { node, _ in Self.value(node) } ?? .map([:])
        let instructions = r.optional(s, "instruction_limit") { r.int($0, path: $1, min: 1000) }
        let memory = r.optional(s, "memory_limit") { r.size($0, path: $1, min: 256 * 1024) }
        let fallback = r.optional(s, "fallback_pool", r.string)
        if let fallback, let fallbackNode = s.values["fallback_pool"] {
            self.poolReferences.append((fallback, fallbackNode, s.path(of: "fallback_pool")))
        }
        guard let script else { return nil }
        return RoutingScriptConfig(
            script: r.resolvePath(script),
            options: options,
            instructionLimit: instructions ?? 1_000_000,
            memoryLimit: memory ?? 16 * 1024 * 1024,
            fallbackPool: fallback
        )
    }

    /// Any YAML node as plain data: scalars by their resolved tag, sequences and mappings recursively.
    static func value(_ node: Node) -> ConfigValue {
        switch node {
        case .scalar:
            if node.isNull { return .null }
            if node.hasTag(.bool), let value = node.bool { return .bool(value) }
            if node.hasTag(.int), let value = node.int { return .int(value) }
            if node.hasTag(.float), let value = node.float { return .double(value) }
            return .string(node.string ?? "")
        case .sequence(let sequence):
            return .list(sequence.map { value($0) })
        case .mapping(let mapping):
            var result: [String: ConfigValue] = [:]
            for (key, item) in mapping { result[key.string ?? "\(key)"] = value(item) }
            return .map(result)
        case .alias:
            // `compose` resolves aliases to their anchored nodes; an unresolved one carries no data.
            return .null
        }
    }

    private func tls(_ node: Node, path: String) -> TLSConfig? {
        let r = self.reader
        guard let s = r.section(node, path: path, keys: ["certificate", "key"]) else { return nil }
        let certificate = r.required(s, "certificate", r.string)
        let key = r.required(s, "key", r.string)
        guard let certificate, let key else { return nil }
        return TLSConfig(certificatePath: certificate, keyPath: key)
    }

    // MARK: pools

    private func pools(_ node: Node, path: String) -> [PoolConfig]? {
        guard let entries = self.reader.namedEntries(node, path: path) else { return nil }
        if entries.isEmpty {
            self.reader.report("at least one pool is required", at: node.mark, path: path)
        }
        return entries.compactMap { name, keyNode, value in
            let poolPath = "\(path).\(name)"
            guard !name.isEmpty else {
                self.reader.report("pool name must not be empty", at: keyNode.mark, path: path)
                return nil
            }
            return self.pool(named: name, value, path: poolPath)
        }
    }

    private func pool(named name: String, _ node: Node, path: String) -> PoolConfig? {
        let r = self.reader
        let keys = [
            "balance", "backends", "idle_ttl", "placement", "balance_factor", "key_header", "epoch_header",
            "health_check", "passive", "discovery",
        ]
        guard let s = r.section(node, path: path, keys: keys) else { return nil }
        let balance = r.optional(s, "balance") { r.choice($0, path: $1, of: BalanceAlgorithm.self) }
        let backends = r.optional(s, "backends") { node, path in
            r.list(node, path: path)?.enumerated().compactMap { index, item in
                self.backend(item, path: "\(path)[\(index)]")
            }
        }
        let defaults = PoolConfig(name: name)
        let idleTTL = r.optional(s, "idle_ttl") { r.duration($0, path: $1, allowZero: false) }
        let placement = r.optional(s, "placement") { node, path -> String? in
            guard let name = r.string(node, path: path) else { return nil }
            guard PlacementStrategy.names.contains(name) else {
                r.report(
                    "unknown placement strategy '\(name)'; expected one of \(PlacementStrategy.names.sorted().joined(separator: ", "))",
                    at: node.mark, path: path)
                return nil
            }
            return name
        }
        let balanceFactor = r.optional(s, "balance_factor") { node, path -> Double? in
            guard let value = node.float ?? node.int.map(Double.init), value >= 0, value <= 10 else {
                r.report("expected a number between 0 and 10, got \(node.summary)", at: node.mark, path: path)
                return nil
            }
            return value
        }
        let discovery = r.optional(s, "discovery", self.discovery)
        if discovery != nil, !name.unicodeScalars.allSatisfy(Self.backendIDCharacters.contains),
            let discoveryNode = s.values["discovery"]
        {
            r.report(
                "a pool with discovery needs a name of letters, digits, '.', '_', ':' and '-' (it prefixes the ids of "
                    + "discovered backends), got '\(name)'",
                at: discoveryNode.mark,
                path: s.path(of: "discovery")
            )
        }
        return PoolConfig(
            name: name,
            balance: balance ?? .roundRobin,
            backends: backends ?? [],
            idleTTL: idleTTL ?? defaults.idleTTL,
            placement: placement ?? defaults.placement,
            balanceFactor: balanceFactor ?? defaults.balanceFactor,
            keyHeader: r.optional(s, "key_header", r.string),
            epochHeader: r.optional(s, "epoch_header", r.string),
            healthCheck: r.optional(s, "health_check", self.healthCheck),
            passive: r.optional(s, "passive", self.passive),
            discovery: discovery
        )
    }

    private func healthCheck(_ node: Node, path: String) -> HealthCheckConfig? {
        let r = self.reader
        let keys = ["path", "interval", "timeout", "rise", "fall", "expect_status"]
        guard let s = r.section(node, path: path, keys: keys) else { return nil }
        let defaults = HealthCheckConfig()
        let checkPath = r.optional(s, "path") { node, path -> String? in
            guard let text = r.string(node, path: path) else { return nil }
            guard text.hasPrefix("/"), !text.contains(where: { $0 == " " || $0.isNewline }) else {
                r.report("expected a request path starting with '/', got \(node.summary)", at: node.mark, path: path)
                return nil
            }
            return text
        }
        let interval = r.optional(s, "interval") { r.duration($0, path: $1, allowZero: false) } ?? defaults.interval
        let explicitTimeout = r.optional(s, "timeout") { r.duration($0, path: $1, allowZero: false) }
        // The default timeout shrinks to a shorter interval; a timeout written longer than the interval is an error.
        let timeout = explicitTimeout ?? min(defaults.timeout, interval)
        if timeout > interval, let timeoutNode = s.values["timeout"] {
            r.report(
                "must not be longer than interval (\(Self.durationText(interval))), got \(timeoutNode.summary)",
                at: timeoutNode.mark,
                path: s.path(of: "timeout")
            )
        }
        return HealthCheckConfig(
            path: checkPath ?? defaults.path,
            interval: interval,
            timeout: timeout,
            rise: r.optional(s, "rise") { r.int($0, path: $1, min: 1) } ?? defaults.rise,
            fall: r.optional(s, "fall") { r.int($0, path: $1, min: 1) } ?? defaults.fall,
            expectStatus: r.optional(s, "expect_status", self.statusSet) ?? defaults.expectStatus
        )
    }

    /// `200`, `2xx`, or a non-empty list of those.
    private func statusSet(_ node: Node, path: String) -> StatusSet? {
        let r = self.reader
        func item(_ node: Node, path: String) -> ClosedRange<Int>? {
            guard let text = node.plainText, node.sequence == nil, let range = StatusSet.parseItem(text) else {
                r.report(
                    "expected a status code (100 to 599) or a class like 2xx, got \(node.summary)",
                    at: node.mark,
                    path: path
                )
                return nil
            }
            return range
        }
        guard node.sequence != nil else { return item(node, path: path).map { StatusSet([$0]) } }
        guard let items = r.list(node, path: path) else { return nil }
        guard !items.isEmpty else {
            r.report("expected at least one status code or class", at: node.mark, path: path)
            return nil
        }
        let ranges = items.enumerated().map { index, element in item(element, path: "\(path)[\(index)]") }
        guard ranges.allSatisfy({ $0 != nil }) else { return nil }
        return StatusSet(ranges.compactMap { $0 })
    }

    private func passive(_ node: Node, path: String) -> PassiveConfig? {
        let r = self.reader
        let keys = ["consecutive_failures", "count_5xx", "ejection_time", "max_ejection_time"]
        guard let s = r.section(node, path: path, keys: keys) else { return nil }
        let defaults = PassiveConfig()
        let ejection = r.optional(s, "ejection_time") { r.duration($0, path: $1, allowZero: false) }
        let maxEjection = r.optional(s, "max_ejection_time") { r.duration($0, path: $1, allowZero: false) }
        let config = PassiveConfig(
            consecutiveFailures: r.optional(s, "consecutive_failures") { r.int($0, path: $1, min: 0) }
                ?? defaults.consecutiveFailures,
            count5xx: r.optional(s, "count_5xx", r.bool) ?? defaults.count5xx,
            ejectionTime: ejection ?? defaults.ejectionTime,
            maxEjectionTime: maxEjection ?? max(defaults.maxEjectionTime, ejection ?? defaults.ejectionTime)
        )
        if config.maxEjectionTime < config.ejectionTime, let maxNode = s.values["max_ejection_time"] {
            r.report(
                "must not be shorter than ejection_time (\(Self.durationText(config.ejectionTime))), got \(maxNode.summary)",
                at: maxNode.mark,
                path: s.path(of: "max_ejection_time")
            )
        }
        return config
    }

    private func discovery(_ node: Node, path: String) -> DiscoveryConfig? {
        let r = self.reader
        guard let s = r.section(node, path: path, keys: ["dns"]) else { return nil }
        guard let dns = r.required(s, "dns", self.dnsDiscovery) else { return nil }
        return DiscoveryConfig(dns: dns)
    }

    private func dnsDiscovery(_ node: Node, path: String) -> DNSDiscoveryConfig? {
        let r = self.reader
        guard let s = r.section(node, path: path, keys: ["name", "port", "interval"]) else { return nil }
        let name = r.required(s, "name") { node, path -> String? in
            guard let text = r.string(node, path: path) else { return nil }
            guard text.unicodeScalars.allSatisfy(Self.dnsNameCharacters.contains), !text.hasPrefix("."),
                !text.hasPrefix("-")
            else {
                r.report("expected a DNS name such as app.internal, got \(node.summary)", at: node.mark, path: path)
                return nil
            }
            return text
        }
        let port = r.required(s, "port") { r.int($0, path: $1, min: 1, max: 65535) }
        let interval = r.optional(s, "interval") { r.duration($0, path: $1, allowZero: false) }
        guard let name, let port else { return nil }
        return DNSDiscoveryConfig(name: name, port: port, interval: interval ?? .seconds(5))
    }

    /// A duration as a message shows it: in the largest unit that divides it.
    private static func durationText(_ amount: TimeAmount) -> String {
        let nanoseconds = amount.nanoseconds
        for (suffix, unit) in [("h", Int64(3_600_000_000_000)), ("m", 60_000_000_000), ("s", 1_000_000_000), ("ms", 1_000_000)]
        where nanoseconds != 0 && nanoseconds % unit == 0 {
            return "\(nanoseconds / unit)\(suffix)"
        }
        return "\(nanoseconds)ns"
    }

    // MARK: ownership

    private func ownership(_ node: Node, path: String) -> OwnershipConfig? {
        let r = self.reader
        guard let s = r.section(node, path: path, keys: ["store", "region", "close_code", "migrate_rate", "redis"]) else {
            return nil
        }
        let defaults = OwnershipConfig()
        let store = r.optional(s, "store") { r.choice($0, path: $1, of: OwnershipConfig.Store.self) }
        let closeCode = r.optional(s, "close_code") { node, path -> UInt16? in
            // 4000+ make OTT clients give up instead of reconnecting; 1004-1006 and 1015 are reserved for endpoints.
            guard let code = r.int(node, path: path, min: 1000, max: 3999) else { return nil }
            guard ![1004, 1005, 1006, 1015].contains(code) else {
                r.report("close code \(code) is reserved and may not be sent", at: node.mark, path: path)
                return nil
            }
            return UInt16(code)
        }
        let rate = r.optional(s, "migrate_rate") { node, path -> Double? in
            guard let value = node.float ?? node.int.map(Double.init), value > 0 else {
                r.report("expected a positive number of tunnels per second, got \(node.summary)", at: node.mark, path: path)
                return nil
            }
            return value
        }
        let redis = r.optional(s, "redis", self.redisOwnership)
        if store == .redis, s.values["redis"] == nil {
            r.report("store redis needs a 'redis' section (at least its url)", at: s.mark, path: s.path)
        }
        if let node = s.values["redis"], store != .redis {
            r.report("'redis' applies only with store: redis", at: node.mark, path: s.path(of: "redis"))
        }
        return OwnershipConfig(
            store: store ?? defaults.store,
            region: r.optional(s, "region", r.string),
            closeCode: closeCode ?? defaults.closeCode,
            migrateRate: rate ?? defaults.migrateRate,
            redis: redis)
    }

    /// `ownership.redis`: `url` (required), `prefix`, `timeout`, `on_unavailable`, `lease_renew_interval`.
    private func redisOwnership(_ node: Node, path: String) -> RedisOwnershipConfig? {
        let r = self.reader
        let keys = ["url", "prefix", "timeout", "on_unavailable", "lease_renew_interval"]
        guard let s = r.section(node, path: path, keys: keys) else { return nil }
        let defaults = RedisOwnershipConfig()
        let url = r.required(s, "url") { node, path -> String? in
            guard let text = r.string(node, path: path) else { return nil }
            guard text.hasPrefix("redis://") || text.hasPrefix("rediss://") else {
                r.report("expected a redis:// or rediss:// URL, got \(node.summary)", at: node.mark, path: path)
                return nil
            }
            return text
        }
        let prefix = r.optional(s, "prefix", r.string)
        let timeout = r.optional(s, "timeout") { r.duration($0, path: $1, allowZero: false) }
        let onUnavailable = r.optional(s, "on_unavailable") {
            r.choice($0, path: $1, of: RedisOwnershipConfig.OnUnavailable.self)
        }
        let renew = r.optional(s, "lease_renew_interval") { r.duration($0, path: $1, allowZero: false) }
        return RedisOwnershipConfig(
            url: url ?? defaults.url,
            prefix: prefix ?? defaults.prefix,
            timeout: timeout ?? defaults.timeout,
            onUnavailable: onUnavailable ?? defaults.onUnavailable,
            leaseRenewInterval: renew)
    }

    private func backend(_ node: Node, path: String) -> BackendConfig? {
        let r = self.reader
        let keys = ["id", "address", "weight", "region", "tags", "max_keys", "max_connections"]
        guard let s = r.section(node, path: path, keys: keys) else { return nil }
        let id = r.required(s, "id", self.backendID)
        let address = r.required(s, "address", self.hostAndPort)
        let weight = r.optional(s, "weight") { r.int($0, path: $1, min: 1) }
        let region = r.optional(s, "region", r.string)
        let tags = r.optional(s, "tags") { node, path in
            r.list(node, path: path)?.enumerated().compactMap { index, item in
                r.string(item, path: "\(path)[\(index)]")
            }
        }
        let maxKeys = r.optional(s, "max_keys") { r.int($0, path: $1, min: 1) }
        let maxConnections = r.optional(s, "max_connections") { r.int($0, path: $1, min: 1) }
        guard let id, let address else { return nil }
        return BackendConfig(
            id: id,
            host: address.host,
            port: address.port,
            weight: weight ?? 1,
            region: region,
            tags: tags ?? [],
            maxKeys: maxKeys,
            maxConnections: maxConnections
        )
    }

    private func backendID(_ node: Node, path: String) -> String? {
        guard let id = self.reader.string(node, path: path) else { return nil }
        guard id.unicodeScalars.allSatisfy(Self.backendIDCharacters.contains) else {
            self.reader.report(
                "backend id may only contain letters, digits, '.', '_', ':' and '-', got '\(id)'",
                at: node.mark,
                path: path
            )
            return nil
        }
        self.backendIDs.append((id, node, path))
        return id
    }

    private func hostAndPort(_ node: Node, path: String) -> (host: String, port: Int)? {
        guard let text = self.reader.string(node, path: path) else { return nil }
        switch HostAndPort.parse(text) {
        case .success(let address):
            return address
        case .failure(let problem):
            self.reader.report(problem.message, at: node.mark, path: path)
            return nil
        }
    }

    // MARK: timeouts, limits, admin, logging

    private func timeouts(_ node: Node, path: String) -> TimeoutsConfig? {
        let r = self.reader
        let keys = [
            "connect", "request_header", "upstream_response_header", "idle_keep_alive", "upstream_idle", "tunnel_idle",
            "shutdown_grace",
        ]
        guard let s = r.section(node, path: path, keys: keys) else { return nil }
        func positive(_ key: String) -> TimeAmount? {
            r.optional(s, key) { r.duration($0, path: $1, allowZero: false) }
        }
        let defaults = TimeoutsConfig()
        return TimeoutsConfig(
            connect: positive("connect") ?? defaults.connect,
            requestHeader: positive("request_header") ?? defaults.requestHeader,
            upstreamResponseHeader: positive("upstream_response_header") ?? defaults.upstreamResponseHeader,
            idleKeepAlive: positive("idle_keep_alive") ?? defaults.idleKeepAlive,
            upstreamIdle: positive("upstream_idle") ?? defaults.upstreamIdle,
            tunnelIdle: positive("tunnel_idle") ?? defaults.tunnelIdle,
            shutdownGrace: r.optional(s, "shutdown_grace") { r.duration($0, path: $1, allowZero: true) }
                ?? defaults.shutdownGrace
        )
    }

    private func limits(_ node: Node, path: String) -> LimitsConfig? {
        let r = self.reader
        let keys = ["max_header_bytes", "max_connections", "max_buffered_body", "max_idle_upstream_per_backend"]
        guard let s = r.section(node, path: path, keys: keys) else { return nil }
        let defaults = LimitsConfig()
        return LimitsConfig(
            maxHeaderBytes: r.optional(s, "max_header_bytes") {
                r.size(
                    $0,
                    path: $1,
                    min: LimitsConfig.headerBytesRange.lowerBound,
                    max: LimitsConfig.headerBytesRange.upperBound
                )
            } ?? defaults.maxHeaderBytes,
            maxConnections: r.optional(s, "max_connections") { r.int($0, path: $1, min: 1) } ?? defaults.maxConnections,
            maxBufferedBody: r.optional(s, "max_buffered_body") { r.size($0, path: $1, min: 0) }
                ?? defaults.maxBufferedBody,
            maxIdleUpstreamPerBackend: r.optional(s, "max_idle_upstream_per_backend") { r.int($0, path: $1, min: 0) }
                ?? defaults.maxIdleUpstreamPerBackend
        )
    }

    private func threads(_ node: Node, path: String) -> ThreadsConfig? {
        let r = self.reader
        guard let s = r.section(node, path: path, keys: ["count", "cpu_affinity", "tunnel_relay", "accept", "http_relay", "http_relay_count", "io_uring", "yield_after_batch"]) else { return nil }
        let range = ThreadsConfig.countRange
        return ThreadsConfig(
            count: r.optional(s, "count") { r.int($0, path: $1, min: range.lowerBound, max: range.upperBound) },
            cpuAffinity: r.optional(s, "cpu_affinity") { r.choice($0, path: $1, of: ThreadsConfig.CPUAffinity.self) }
                ?? .none,
            tunnelRelay: r.optional(s, "tunnel_relay", r.bool) ?? true,
            accept: r.optional(s, "accept") { r.choice($0, path: $1, of: ThreadsConfig.Accept.self) } ?? .perLoop,
            httpRelay: r.optional(s, "http_relay", r.bool) ?? true,
            httpRelayCount: r.optional(s, "http_relay_count") {
                r.int($0, path: $1, min: range.lowerBound, max: range.upperBound)
            },
            ioUring: r.optional(s, "io_uring", r.bool) ?? true,
            yieldAfterBatch: r.optional(s, "yield_after_batch", r.bool) ?? true
        )
    }

    private func admin(_ node: Node, path: String) -> AdminConfig? {
        let r = self.reader
        let keys = ["address", "port", "token", "token_env", "metrics_open"]
        guard let s = r.section(node, path: path, keys: keys) else { return nil }
        let defaults = AdminConfig()
        let admin = AdminConfig(
            address: r.optional(s, "address", r.string) ?? defaults.address,
            port: r.optional(s, "port") { r.int($0, path: $1, min: 1, max: 65535) } ?? defaults.port,
            token: r.optional(s, "token", r.string),
            tokenEnv: r.optional(s, "token_env", r.string),
            metricsOpen: r.optional(s, "metrics_open", r.bool) ?? defaults.metricsOpen
        )
        if admin.token != nil, admin.tokenEnv != nil, let tokenEnvNode = s.values["token_env"] {
            r.report(
                "set either 'token' or 'token_env', not both",
                at: tokenEnvNode.mark,
                path: s.path(of: "token_env")
            )
        }
        self.sockets.append((admin.address, admin.port, s.values["port"] ?? node, s.path(of: "port")))
        return admin
    }

    private func logging(_ node: Node, path: String) -> LoggingConfig? {
        let r = self.reader
        guard let s = r.section(node, path: path, keys: ["level", "format", "access_log"]) else { return nil }
        let defaults = LoggingConfig()
        return LoggingConfig(
            level: r.optional(s, "level") { r.choice($0, path: $1, of: LogLevel.self) } ?? defaults.level,
            format: r.optional(s, "format") { r.choice($0, path: $1, of: LogFormat.self) } ?? defaults.format,
            accessLog: r.optional(s, "access_log", r.bool) ?? defaults.accessLog
        )
    }

    // MARK: cross-references

    private func validate(_ config: ProxyConfig) {
        let r = self.reader
        for reference in self.poolReferences where config.pool(named: reference.name) == nil {
            let declared = config.pools.map(\.name)
            var message = "unknown pool '\(reference.name)'"
            if let suggestion = NodeReader.closest(to: reference.name, in: declared) {
                message += " (did you mean '\(suggestion)'?)"
            } else if !declared.isEmpty {
                message += " (declared pools: \(declared.joined(separator: ", ")))"
            }
            r.report(message, at: reference.node.mark, path: reference.path)
        }

        var firstID: [String: (node: Node, path: String)] = [:]
        for entry in self.backendIDs {
            if let first = firstID[entry.id] {
                r.report(
                    "duplicate backend id '\(entry.id)', first used by \(Self.place(first.node, first.path))",
                    at: entry.node.mark,
                    path: entry.path
                )
            } else {
                firstID[entry.id] = (entry.node, entry.path)
            }
        }

        var firstSocket: [String: (node: Node, path: String)] = [:]
        for socket in self.sockets {
            let key = "port \(socket.port) on \(socket.address)"
            if let first = firstSocket[key] {
                r.report(
                    "\(key) is already used by \(Self.place(first.node, first.path))",
                    at: socket.node.mark,
                    path: socket.path
                )
            } else {
                firstSocket[key] = (socket.node, socket.path)
            }
        }

        var firstName: [String: (node: Node, path: String)] = [:]
        for listener in self.listenerNames {
            if let first = firstName[listener.name] {
                r.report(
                    "duplicate listener name '\(listener.name)', first used by \(Self.place(first.node, first.path))",
                    at: listener.node.mark,
                    path: listener.path
                )
            } else {
                firstName[listener.name] = (listener.node, listener.path)
            }
        }
    }

    /// Ids end up in metrics labels, log fields and admin URLs, where these characters need no escaping.
    private static let backendIDCharacters: Set<Unicode.Scalar> = Set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-".unicodeScalars
    )

    private static let dnsNameCharacters: Set<Unicode.Scalar> = Set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-".unicodeScalars
    )

    private static func place(_ node: Node, _ path: String) -> String {
        guard let mark = node.mark else { return path }
        return "\(path) (line \(mark.line))"
    }
}

extension LimitsConfig {
    /// NIOHTTP1's decoder refuses more than 80 KiB of header fields with its default limits, so a larger value would be
    /// a promise the proxy does not keep; below 1 KiB ordinary browser requests would be refused.
    public static let headerBytesRange: ClosedRange<Int> = 1024...(80 * 1024)
}
