import ArgumentParser
import Logging
import ProxyCore
import ServiceLifecycle

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
    let server: ProxyServer
    do {
        server = try ProxyServer(
            config: config, logger: logger, policyFactory: PolicyRegistry.factory(), configSource: configSource)
        try await server.start()
    } catch {
        logger.critical("could not start", metadata: ["error": "\(error)"])
        throw ExitCode.failure
    }
    let group = ServiceGroup(
        configuration: .init(
            services: [.init(service: server)] + extraServices.map { .init(service: $0) },
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger
        )
    )
    try await group.run()
}
