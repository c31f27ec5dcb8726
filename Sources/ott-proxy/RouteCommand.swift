import ArgumentParser
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import ProxyCore

/// `ott-proxy route`: what would the proxy do with this request? Runs the listener's routing script against a request
/// described on the command line and prints the decision and the backend it resolves to, without starting a server.
struct RouteCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "route",
        abstract: "Dry-run a request through the routing script: print the decision and the backend it would reach.",
        discussion: """
            Example: ott-proxy route --config examples/ott.yaml GET http://localhost:8080/api/room/Lobby \\
                       -H 'Connection: Upgrade' -H 'Upgrade: websocket'
            Keyed decisions resolve as the proxy would on a fresh start (no keys claimed yet).
            """
    )

    @Option(name: .shortAndLong, help: "Path to the YAML configuration file.")
    var config: String

    @Option(help: "The listener whose routing to use (default: the first).")
    var listener: String?

    @Argument(help: "HTTP method, e.g. GET.")
    var method: String

    @Argument(help: "Request URL (http://host[:port]/path?query) or just a path.")
    var url: String

    @Option(name: .customShort("H"), help: "A request header, 'Name: value' (repeatable).")
    var headers: [String] = []

    @Option(help: "A file whose contents are the request body (used when the script asks for the body).")
    var body: String?

    func run() async throws {
        guard let proxyConfig = loadConfig(self.config) else { throw ExitCode.failure }
        guard let listener = self.listener.map({ name in proxyConfig.listeners.first { $0.name == name } })
            ?? proxyConfig.listeners.first
        else {
            throw ValidationError("no listener named '\(self.listener ?? "")' in \(self.config)")
        }
        let request = try self.makeRequest(listener: listener)
        let runtime: ProxyRuntime
        let policy: RoutingPolicy
        do {
            let table = try RoutingTable(config: proxyConfig)
            runtime = ProxyRuntime(
                config: proxyConfig, table: table, logger: Logger(label: "route"), accessLogger: Logger(label: "route"),
                metrics: ProxyMetrics(listeners: proxyConfig.listeners.map(\.name)))
            policy = try PolicyRegistry.policy(
                for: listener, environment: PolicyRegistry.staticEnvironment(proxyConfig), logger: Logger(label: "route"))
        } catch {
            printError("error: \(error)")
            throw ExitCode.failure
        }

        var decision: RouteDecision
        do {
            decision = try policy.route(request)
            if decision.action == .needBody {
                print("decision: need_body (the script reads the body, then routes again)")
                var again = request
                let bytes = try self.body.map { try Data(contentsOf: URL(fileURLWithPath: $0)) } ?? Data()
                again.body = ByteBuffer(bytes: bytes)
                decision = try policy.route(again)
            }
        } catch {
            print("routing error: \(error)")
            print("the client would get: 500 routing error"
                + (listener.routing?.fallbackPool.map { " (or, with fallback_pool, any backend of '\($0)')" } ?? ""))
            throw ExitCode(2)
        }
        print(Self.describe(decision, runtime: runtime))
    }

    static func describe(_ decision: RouteDecision, runtime: ProxyRuntime) -> String {
        var lines: [String] = []
        switch decision.action {
        case .respond(let response):
            lines.append("decision: respond \(response.status.code) \(response.status.reasonPhrase)")
            for header in response.headers { lines.append("  \(header.name): \(header.value)") }
            if !response.body.isEmpty { lines.append("  body: \(response.body)") }
            return lines.joined(separator: "\n")
        case .fanout(let fanout):
            let pool = runtime.table.pools[fanout.pool]
            return "decision: fan out to every backend of pool '\(fanout.pool)' (\(pool?.backends.map(\.id).joined(separator: ", ") ?? "unknown pool")), "
                + "merge \(fanout.merge), timeout \(fanout.timeout)"
        case .needBody:
            return "decision: need_body again (a script must decide once it has the body; the client would get 500)"
        case .forward(let target):
            switch target {
            case .pool(let name):
                lines.append("decision: any backend of pool '\(name)'")
            case .backend(let id):
                lines.append("decision: backend '\(id)'")
            case .keyed(let key, let pool, let placement):
                lines.append("decision: key '\(key)' in pool '\(pool)'" + (placement.map { ", place \($0)" } ?? ""))
            }
            if let path = decision.path { lines.append("path rewritten to: \(path)") }
            for header in decision.setHeaders { lines.append("set header: \(header.name): \(header.value)") }
            for name in decision.removeHeaders { lines.append("remove header: \(name)") }
            if decision.responseBody { lines.append("on_response gets the response body") }
            switch (target, runtime.resolve(target, on: nil)) {
            case (.pool(let name), .backend):
                let pool = runtime.table.pools[name]!
                lines.append("backend: one of \(pool.backends.map(\.id).joined(separator: ", ")) (\(pool.balance.rawValue))")
            case (_, .backend(let backend)):
                lines.append("backend: \(backend.id) (\(backend.config.host):\(backend.config.port))")
            case (_, .owned(let backend, let ownership)):
                lines.append("backend: \(backend.id) (\(backend.config.host):\(backend.config.port)), epoch \(ownership.epoch)")
            case (_, .pending):
                lines.append("backend: decided by the shared ownership store")
            case (_, .noBackend):
                lines.append("backend: none available (the client would get 503)")
            case (_, .unknownPool(let name)):
                lines.append("error: unknown pool '\(name)' (the client would get 500 routing error)")
            case (_, .unknownBackend(let id)):
                lines.append("error: unknown backend '\(id)' (the client would get 500 routing error)")
            case (_, .unknownPlacement(let name)):
                lines.append("error: unknown placement '\(name)' (the client would get 500 routing error)")
            }
            return lines.joined(separator: "\n")
        }
    }

    private func makeRequest(listener: ListenerConfig) throws -> RouteRequest {
        var headers = HTTPHeaders()
        for line in self.headers {
            guard let colon = line.firstIndex(of: ":") else { throw ValidationError("header '\(line)' is not 'Name: value'") }
            headers.add(
                name: String(line[..<colon]).trimmingCharacters(in: .whitespaces),
                value: String(line[line.index(after: colon)...]).trimmingCharacters(in: .whitespaces))
        }
        var scheme = listener.tls == nil ? "http" : "https"
        var target = self.url
        if let range = target.range(of: "://") {
            scheme = String(target[..<range.lowerBound])
            let rest = target[range.upperBound...]
            let authority = rest.prefix { $0 != "/" && $0 != "?" }
            if !headers.contains(name: "host") { headers.add(name: "host", value: String(authority)) }
            target = String(rest.dropFirst(authority.count))
            if target.isEmpty || target.hasPrefix("?") { target = "/" + target }
        }
        let path = String(target.prefix { $0 != "?" })
        let query = target.dropFirst(path.count).dropFirst()
        let head = HTTPRequestHead(version: .http1_1, method: HTTPMethod(rawValue: self.method.uppercased()), uri: target, headers: headers)
        return RouteRequest(
            method: head.method,
            path: path,
            query: Substring(query),
            headers: headers,
            host: headers.first(name: "host") ?? "",
            scheme: scheme,
            clientIP: "127.0.0.1",
            isUpgrade: RequestValidator.upgradeProtocol(of: head) != nil,
            listener: listener.name
        )
    }
}
