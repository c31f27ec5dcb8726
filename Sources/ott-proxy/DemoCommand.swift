import ArgumentParser
import Foundation
import DemoBackends
import Logging
import NIOPosix
import ProxyCore
import ServiceLifecycle

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start three in-process demo room servers with the proxy in front, on the embedded defaults."
    )

    @Option(help: "Port the proxy listens on.")
    var port: Int = 8080

    @Option(help: "Port of the admin listener (health, metrics).")
    var adminPort: Int = 9901

    @Option(help: "Number of demo backends.")
    var backends: Int = 3

    func run() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        var servers: [RoomServer] = []
        for index in 1...max(1, self.backends) {
            servers.append(try await RoomServer.start(id: "room-\(index)", host: "127.0.0.1", port: 0, group: group))
        }
        let config = Self.embeddedConfig(port: self.port, adminPort: self.adminPort, servers: servers)
        bootstrapLogging(config.logging)
        print(Self.instructions(port: self.port, adminPort: self.adminPort, servers: servers))
        fflush(nil)  // every output stream: `stdout` itself is a global Swift 6 refuses to touch
        try await serve(config)
        for server in servers { try? await server.stop() }
    }

    /// The shipped `routing-scripts/path-key.lua`, found next to this source file (the demo runs from a checkout).
    static var pathKeyScript: String? {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let script = root.appendingPathComponent("routing-scripts/path-key.lua").path
        return FileManager.default.fileExists(atPath: script) ? script : nil
    }

    /// The demo's configuration: what `ott-proxy run` would read from a file.
    static func embeddedConfig(port: Int, adminPort: Int, servers: [RoomServer]) -> ProxyConfig {
        ProxyConfig(
            listeners: [
                ListenerConfig(
                    name: "demo", address: "127.0.0.1", port: port, pool: "rooms",
                    routing: pathKeyScript.map { RoutingScriptConfig(script: $0) })
            ],
            pools: [
                PoolConfig(
                    name: "rooms",
                    balance: .leastConnections,
                    backends: servers.map { BackendConfig(id: $0.id, host: "127.0.0.1", port: $0.port) }
                )
            ],
            admin: AdminConfig(address: "127.0.0.1", port: adminPort),
            logging: LoggingConfig(level: .info, format: .logfmt, accessLog: true)
        )
    }

    static func instructions(port: Int, adminPort: Int, servers: [RoomServer]) -> String {
        let backendList = servers.map { "  \($0.id) on 127.0.0.1:\($0.port)" }.joined(separator: "\n")
        return """
            ott-proxy demo: proxy on http://127.0.0.1:\(port), \(servers.count) room servers behind it:
            \(backendList)

            Try, in another terminal:
              curl -i http://127.0.0.1:\(port)/rooms/lobby        # which backend answered is in X-Backend and the body
              curl -s http://127.0.0.1:\(port)/ ; curl -s http://127.0.0.1:\(port)/    # stateless requests are balanced
              ott-proxy wscat ws://127.0.0.1:\(port)/rooms/lobby/ws   # type lines: they are broadcast to the room
              curl -s http://127.0.0.1:\(adminPort)/metrics | grep ott_proxy_requests

            \(pathKeyScript.map { "Routing script: \($0)\n    every request and WebSocket for /rooms/{name} reaches one backend;" } ?? "No routing script found:")
            other paths are balanced by least-connections. Ctrl-C stops everything gracefully.

            """
    }
}
