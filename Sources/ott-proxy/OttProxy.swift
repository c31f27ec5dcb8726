import ArgumentParser
import Logging
import ProxyCore

@main
struct OttProxy: AsyncParsableCommand {
    static let version = "0.1.0"

    static let configuration = CommandConfiguration(
        commandName: "ott-proxy",
        abstract: "A reverse proxy that lets a stateful server scale out: every request for one key reaches one backend.",
        version: version,
        subcommands: [Run.self, Check.self, RouteCommand.self, Demo.self, WebSocketCat.self],
        defaultSubcommand: nil
    )
}

/// Loads a configuration file, printing every error the way `nginx -t` does.
func loadConfig(_ path: String) -> ProxyConfig? {
    do {
        return try ConfigLoader.load(path: path)
    } catch {
        for item in error.errors {
            printError("error: \(item)")
        }
        printError("configuration file \(path) has \(error.errors.count) error\(error.errors.count == 1 ? "" : "s")")
        return nil
    }
}

func printError(_ line: String) {
    LineLogHandler.stderr(line)
}

/// Routes every log line through one formatter, at the configured level.
func bootstrapLogging(_ logging: LoggingConfig) {
    let level = Logger.Level(rawValue: logging.level.rawValue) ?? .info
    LoggingSystem.bootstrap { label in
        LineLogHandler(label: label, level: level, format: logging.format)
    }
}
