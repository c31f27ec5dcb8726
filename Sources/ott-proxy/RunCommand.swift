import ArgumentParser
import Logging
import NIOCore
import NIOPosix
import ProxyCore
import RedisDirectory
import ServiceLifecycle
import UnixSignals

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the proxy with a configuration file until SIGTERM or SIGINT (graceful: see timeouts.shutdown_grace)."
    )

    @Option(name: .shortAndLong, help: "Path to the YAML configuration file.")
    var config: String

    func run() async throws {
        guard let proxyConfig = loadConfig(self.config) else { throw ExitCode.failure }
        bootstrapLogging(proxyConfig.logging)
        let path = self.config
        // SIGHUP and admin `POST /reload` re-read this file (and the scripts it names).
        try await serve(proxyConfig, configSource: { try ConfigLoader.load(path: path) })
    }
}

/// Runs a proxy as a ServiceLifecycle service: SIGTERM and SIGINT start a graceful shutdown.
func serve(
    _ config: ProxyConfig,
    configSource: (@Sendable () throws -> ProxyConfig)? = nil,
    extraServices: [any Service] = []
) async throws {
    let logger = Logger(label: "ott-proxy")
    var config = config
    config.limits.maxConnections = adjustOpenFilesLimit(for: config, logger: logger)
    // Trapped before any listener opens: a SIGTERM or SIGINT that arrives while the proxy is still starting (a
    // listener may already accept) ends it gracefully once it has started, instead of killing it by the default action.
    let earlySignals = await UnixSignalsSequence(trapping: .sigterm, .sigint)
    let server: ProxyServer
    let directory: RedisOwnershipDirectory?
    do {
        directory = try await makeDirectory(config, logger: logger)
        server = try ProxyServer(
            config: config, logger: logger, policyFactory: PolicyRegistry.factory(), configSource: configSource,
            directory: directory)
        try await server.start()
    } catch {
        logger.critical("could not start", metadata: ["error": "\(error)"])
        throw ExitCode.failure
    }
    defer { if let directory { Task { await directory.close() } } }
    let group = ServiceGroup(
        configuration: .init(
            services: [.init(service: server)] + extraServices.map { .init(service: $0) },
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger
        )
    )
    try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try await group.run() }
        tasks.addTask {
            // The group traps these signals itself once it runs; this catches one that came before.
            for await _ in earlySignals {
                await group.triggerGracefulShutdown()
            }
        }
        try await tasks.next()
        tasks.cancelAll()
    }
}

/// Raises the soft open-file limit to what `config` may need (within the hard limit) and warns when that is short
/// (`OpenFilesLimit`). Returns the `limits.max_connections` to run with: the configured one, or, when the limit is
/// short, the number of connections that fit. Past the descriptors it has, `accept` fails with `EMFILE` and NIO's
/// listening socket retries it at once, at full CPU, until a descriptor frees up; within `max_connections` a
/// connection over the limit is accepted and closed at once instead (the reserve keeps a descriptor for that).
func adjustOpenFilesLimit(for config: ProxyConfig, logger: Logger) -> Int {
    let needed = OpenFilesLimit.needed(for: config, loops: config.threads.resolvedCount)
    guard let (before, after) = OpenFilesLimit.raise(to: needed) else { return config.limits.maxConnections }
    if after.soft > before.soft {
        logger.info(
            "open-file limit raised", metadata: ["from": "\(before.soft)", "to": "\(after.soft)", "needed": "\(needed)"])
    }
    if let warning = OpenFilesLimit.shortfall(
        limit: after.soft, needed: needed, maxConnections: config.limits.maxConnections)
    {
        logger.warning("\(warning)")
        return min(config.limits.maxConnections, OpenFilesLimit.connectionsFitting(limit: after.soft))
    }
    return config.limits.maxConnections
}

/// The Redis ownership directory when `ownership.store` is `redis` (nil for the in-memory default).
func makeDirectory(_ config: ProxyConfig, logger: Logger) async throws -> RedisOwnershipDirectory? {
    guard config.ownership.store == .redis else { return nil }
    let settings = config.ownership.redis ?? RedisOwnershipConfig()
    var configuration = try RedisConfiguration(url: settings.url)
    configuration.commandTimeout = settings.timeout
    configuration.connectTimeout = max(settings.timeout, .seconds(1))
    let shortestTTL = config.pools.map(\.idleTTL).min() ?? .seconds(330)
    let directory = RedisOwnershipDirectory(
        configuration: configuration,
        prefix: settings.prefix,
        onUnavailable: settings.onUnavailable == .fail ? .fail : .degrade,
        leaseRenewInterval: settings.leaseRenewInterval ?? .nanoseconds(max(shortestTTL.nanoseconds / 3, 1_000_000)),
        eventLoopGroup: MultiThreadedEventLoopGroup.singleton,
        logger: Logger(label: "ott-proxy.redis"))
    do {
        try await directory.start()
    } catch {
        // The directory keeps reconnecting; meanwhile it degrades or fails as configured.
        logger.error("redis ownership directory not reachable at start", metadata: ["error": "\(error)"])
    }
    return directory
}
