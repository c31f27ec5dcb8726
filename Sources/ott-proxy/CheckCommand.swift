import ArgumentParser
import Logging
import ProxyCore

struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Validate a configuration file: exit 0 if it is valid, 1 after printing every error."
    )

    @Option(name: .shortAndLong, help: "Path to the YAML configuration file.")
    var config: String

    func run() async throws {
        guard let proxyConfig = loadConfig(self.config) else { throw ExitCode.failure }
        do {
            // Addresses are resolved here too, so a backend host that does not resolve fails the check.
            _ = try RoutingTable(config: proxyConfig)
        } catch {
            printError("error: \(self.config): a backend address does not resolve: \(error)")
            throw ExitCode.failure
        }
        // Scripts are compiled and run to their end (defining `route`), exactly as `run` would.
        var failed = false
        for listener in proxyConfig.listeners where listener.routing != nil {
            do {
                _ = try PolicyRegistry.policy(
                    for: listener, environment: PolicyRegistry.staticEnvironment(proxyConfig), logger: Logger(label: "check"))
            } catch {
                printError("error: listener '\(listener.name)': \(error)")
                failed = true
            }
        }
        if failed { throw ExitCode.failure }
        print("configuration file \(self.config) is valid")
    }
}
