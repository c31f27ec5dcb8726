import ProxyCore
import Testing

private func config(_ backends: [BackendConfig], passive: PassiveConfig? = nil, discovery: DiscoveryConfig? = nil) -> ProxyConfig {
    ProxyConfig(
        listeners: [ListenerConfig(port: 8080, pool: "p")],
        pools: [PoolConfig(name: "p", backends: backends, passive: passive, discovery: discovery)])
}

private let a = BackendConfig(id: "a", host: "127.0.0.1", port: 9001)
private let b = BackendConfig(id: "b", host: "127.0.0.1", port: 9002)

@Suite("BackendRegistry")
struct BackendRegistryTests {
    @Test("an unchanged backend is the same object in the next generation; a changed weight keeps its health")
    func reuse() throws {
        let registry = BackendRegistry()
        let first = try registry.table(for: config([a, b]))
        registry.commit(first, config: config([a, b]))
        let second = try registry.table(for: config([a, b]))
        #expect(second.backends["a"] === first.backends["a"])

        var heavier = b
        heavier.weight = 3
        let third = try registry.table(for: config([a, heavier]))
        #expect(third.backends["b"] !== first.backends["b"])
        #expect(third.backends["b"]?.health === first.backends["b"]?.health)
        #expect(third.backends["b"]?.config.weight == 3)
    }

    @Test("a new address means fresh health; commit marks what is gone as removed, and only commit does")
    func addressChangeAndRemoval() throws {
        let registry = BackendRegistry()
        let first = try registry.table(for: config([a, b]))
        registry.commit(first, config: config([a, b]))
        let oldA = try #require(first.backends["a"])
        let oldB = try #require(first.backends["b"])

        var moved = a
        moved.port = 9100
        let second = try registry.table(for: config([moved]))
        #expect(second.backends["a"]?.health !== oldA.health)
        // Not committed yet: nothing changed for the generation in force.
        #expect(oldA.status.state == .healthy && oldB.status.state == .healthy)
        #expect(registry.backends["a"] === oldA)

        registry.commit(second, config: config([moved]))
        #expect(oldA.status.state == .removed)
        #expect(oldB.status.state == .removed)
        #expect(second.backends["a"]?.status.state == .healthy)
        #expect(registry.backends.keys.sorted() == ["a"])

        // A removed backend that comes back starts afresh.
        let third = try registry.table(for: config([moved, b]))
        #expect(third.backends["b"]?.health !== oldB.health)
        #expect(third.backends["b"]?.isUsable == true)
    }

    @Test("commit applies the pool's new passive settings to kept backends")
    func settingsFollowReload() throws {
        let registry = BackendRegistry()
        let strict = config([a], passive: PassiveConfig(consecutiveFailures: 1))
        let first = try registry.table(for: strict)
        registry.commit(first, config: strict)
        let backend = try #require(first.backends["a"])
        backend.recordConnectFailure()
        #expect(!backend.isUsable)

        let off = config([a])
        let second = try registry.table(for: off)
        #expect(second.backends["a"] === backend)
        registry.commit(second, config: off)
        #expect(backend.isUsable)
    }

    @Test("discovered backends join pools with discovery only, after the static ones, never replacing a static id")
    func discoveredMerge() throws {
        let registry = BackendRegistry()
        let discovery = DiscoveryConfig(dns: DNSDiscoveryConfig(name: "app", port: 9000))
        let found = BackendConfig(id: "p-10.0.0.1:9000", host: "10.0.0.1", port: 9000)
        let clash = BackendConfig(id: "a", host: "10.0.0.2", port: 9000)
        registry.setDiscovered(pool: "p", backends: [found, clash])
        let merged = try registry.table(for: config([a], discovery: discovery))
        #expect(merged.pools["p"]?.backends.map(\.id) == ["a", "p-10.0.0.1:9000"])
        #expect(merged.backends["a"]?.config.host == "127.0.0.1")

        let withoutDiscovery = try registry.table(for: config([a]))
        #expect(withoutDiscovery.pools["p"]?.backends.map(\.id) == ["a"])
        registry.commit(withoutDiscovery, config: config([a]))
        #expect(registry.discovered(pool: "p").isEmpty)
    }
}
