import Logging
import LuaRouting
import NIOCore
import ProxyCore

/// The only place that knows both the core and the plugins: maps a listener's configuration to its routing policy.
enum PolicyRegistry {
    static func factory(logger: Logger = Logger(label: "ott-proxy.script")) -> RoutingPolicyFactory {
        { listener, _, environment in
            try self.policy(for: listener, environment: environment, logger: logger)
        }
    }

    static func policy(for listener: ListenerConfig, environment: RoutingEnvironment, logger: Logger) throws -> RoutingPolicy {
        guard let routing = listener.routing else {
            return StaticPoolPolicy(pool: listener.pool)
        }
        return try LuaRoutingPolicy(
            scriptPath: routing.script,
            options: LuaValue(routing.options),
            environment: environment,
            limits: LuaLimits(instructionLimit: routing.instructionLimit, memoryLimit: routing.memoryLimit),
            logger: logger
        )
    }

    /// An environment built from the configuration alone (no live counters): for `check` and `route`.
    static func staticEnvironment(_ config: ProxyConfig) -> StaticRoutingEnvironment {
        var pools: [String: [BackendSnapshot]] = [:]
        for pool in config.pools {
            pools[pool.name] = pool.backends.map {
                BackendSnapshot(id: $0.id, pool: pool.name, region: $0.region, tags: $0.tags, weight: $0.weight)
            }
        }
        return StaticRoutingEnvironment(pools: pools)
    }
}

extension LuaValue {
    init(_ value: ConfigValue) {
        switch value {
        case .null: self = .null
        case .bool(let bool): self = .bool(bool)
        case .int(let int): self = .int(int)
        case .double(let double): self = .double(double)
        case .string(let string): self = .string(string)
        case .list(let list): self = .array(list.map(LuaValue.init))
        case .map(let map): self = .table(map.mapValues(LuaValue.init))
        }
    }
}
