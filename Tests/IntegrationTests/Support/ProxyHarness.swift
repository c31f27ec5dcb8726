import Logging
import NIOCore
import NIOPosix
import ProxyCore

/// A real proxy on loopback (ephemeral ports) in front of the given backends, for one test.
struct ProxyHarness {
    let server: ProxyServer
    let port: Int
    let adminPort: Int?

    /// - Parameter configure: adjusts the generated configuration (timeouts, limits, extra pools) before start.
    static func start(
        backends: [(id: String, port: Int)],
        balance: BalanceAlgorithm = .roundRobin,
        admin: AdminConfig? = nil,
        group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        policyFactory: RoutingPolicyFactory? = nil,
        configure: (inout ProxyConfig) -> Void = { _ in }
    ) async throws -> ProxyHarness {
        var config = ProxyConfig(
            listeners: [ListenerConfig(name: "test", address: "127.0.0.1", port: 0, pool: "main")],
            pools: [
                PoolConfig(
                    name: "main",
                    balance: balance,
                    backends: backends.map { BackendConfig(id: $0.id, host: "127.0.0.1", port: $0.port) }
                )
            ],
            admin: admin,
            logging: LoggingConfig(level: .warning, format: .logfmt, accessLog: false)
        )
        config.timeouts.shutdownGrace = .seconds(1)
        configure(&config)
        var logger = Logger(label: "test-proxy")
        logger.logLevel = .warning
        let server = try ProxyServer(config: config, logger: logger, accessLogger: logger, group: group, policyFactory: policyFactory)
        try await server.start()
        return ProxyHarness(server: server, port: server.listenerPorts["test"]!, adminPort: server.adminPort)
    }

    func stop() async {
        await self.server.shutdown()
    }
}

/// Runs `body` with a started harness and always shuts it down, even when the body throws.
func withProxy<T>(
    backends: [(id: String, port: Int)],
    balance: BalanceAlgorithm = .roundRobin,
    admin: AdminConfig? = nil,
    policyFactory: RoutingPolicyFactory? = nil,
    configure: (inout ProxyConfig) -> Void = { _ in },
    _ body: (ProxyHarness) async throws -> T
) async throws -> T {
    let harness = try await ProxyHarness.start(
        backends: backends, balance: balance, admin: admin, policyFactory: policyFactory, configure: configure)
    do {
        let result = try await body(harness)
        await harness.stop()
        return result
    } catch {
        await harness.stop()
        throw error
    }
}

/// A proxy on an event loop group of its own with one thread (a test about one loop's ordering and buffers), stopped
/// with its group afterwards.
func withOneLoopProxy<T>(
    backends: [(id: String, port: Int)], _ body: (ProxyHarness) async throws -> T
) async throws -> T {
    let oneLoop = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let proxy: ProxyHarness
    do {
        proxy = try await ProxyHarness.start(backends: backends, group: oneLoop)
    } catch {
        try? await oneLoop.shutdownGracefully()
        throw error
    }
    let result: Result<T, Error>
    do {
        result = .success(try await body(proxy))
    } catch {
        result = .failure(error)
    }
    await proxy.stop()
    try? await oneLoop.shutdownGracefully()
    return try result.get()
}
