import Logging
import NIOCore
import Synchronization

/// What keeps backends' health and membership current for a `ProxyServer`: the `BackendRegistry` (health state by
/// id across generations), the `HealthChecker` and one `DNSDiscovery` per pool that has `discovery`.
///
/// The server calls `table(for:)` to build a generation, `committed(_:)` once it is in force, and `start`/`stop`
/// with its own lifecycle; checks and discovery run only between those two.
final class BackendServices: Sendable {
    let registry: BackendRegistry
    let resolver: BackendResolver
    private let logger: Logger

    private struct Running {
        var checker: HealthChecker
        var discoveries: [String: DNSDiscovery]
        var apply: DNSDiscovery.Apply
    }

    private let running = Mutex<Running?>(nil)

    init(logger: Logger, resolver: BackendResolver?) {
        self.registry = BackendRegistry(logger: logger)
        self.resolver = resolver ?? SystemResolver()
        self.logger = logger
    }

    func table(for config: ProxyConfig) throws -> RoutingTable {
        try self.registry.table(for: config)
    }

    /// `runtime` is in force: settle health state, then align checks and discovery with it.
    func committed(_ runtime: ProxyRuntime) {
        self.registry.commit(runtime.table, config: runtime.config)
        self.running.withLock { running in
            guard var current = running else { return }
            current.checker.update(runtime)
            current.discoveries = self.alignDiscoveries(current.discoveries, config: runtime.config, apply: current.apply)
            running = current
        }
    }

    /// Starts checks and discovery for `runtime`; `apply` installs discovered backends (a new generation).
    func start(_ runtime: ProxyRuntime, group: EventLoopGroup, apply: @escaping DNSDiscovery.Apply) {
        self.running.withLock { running in
            guard running == nil else { return }
            let checker = HealthChecker(group: group)
            checker.update(runtime)
            let discoveries = self.alignDiscoveries([:], config: runtime.config, apply: apply)
            running = Running(checker: checker, discoveries: discoveries, apply: apply)
        }
    }

    func stop() async {
        guard let running = self.running.withLock({ running -> Running? in
            defer { running = nil }
            return running
        }) else { return }
        // Discovery is cancelled, not awaited: a lookup blocked in getaddrinfo cannot be interrupted and must not hold
        // up shutdown (its late result finds the server stopped and is dropped). Checks end within their timeout.
        for discovery in running.discoveries.values { discovery.cancel() }
        await running.checker.stop()
    }

    /// Keeps discoveries whose pool still has the same `discovery.dns`, cancels the rest, starts the new ones.
    private func alignDiscoveries(
        _ current: [String: DNSDiscovery], config: ProxyConfig, apply: @escaping DNSDiscovery.Apply
    ) -> [String: DNSDiscovery] {
        var result: [String: DNSDiscovery] = [:]
        for pool in config.pools {
            guard let dns = pool.discovery?.dns else { continue }
            if let existing = current[pool.name], existing.config == dns {
                result[pool.name] = existing
                continue
            }
            let discovery = DNSDiscovery(pool: pool.name, config: dns)
            discovery.start(
                resolver: self.resolver, alreadyApplied: self.registry.discovered(pool: pool.name), logger: self.logger,
                apply: apply)
            result[pool.name] = discovery
        }
        for (name, discovery) in current where result[name] !== discovery {
            discovery.cancel()
        }
        return result
    }
}
