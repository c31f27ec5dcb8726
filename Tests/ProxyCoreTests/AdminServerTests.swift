import Foundation
import Logging
import NIOHTTP1
import Synchronization
import Testing

@testable import ProxyCore

@Suite("AdminServer.respond")
struct AdminServerTests {
    private static let plain = "text/plain; charset=utf-8"
    private static let unauthorized = "unauthorized: bearer token required\n"

    private func server(_ config: AdminConfig, environment: Environment = Environment()) -> AdminServer {
        AdminServer(
            config: config, metrics: ProxyMetrics(listeners: ["l"]), connections: ConnectionRegistry(limit: 10),
            environment: { environment.value($0) })
    }

    /// A stand-in for the process environment: `setenv` would change it for every test running in parallel.
    final class Environment: Sendable {
        private let values = Mutex<[String: String]>([:])
        func set(_ name: String, _ value: String?) { self.values.withLock { $0[name] = value } }
        func value(_ name: String) -> String? { self.values.withLock { $0[name] } }
    }

    private func bearer(_ token: String) -> HTTPHeaders {
        HTTPHeaders([("Authorization", "Bearer \(token)")])
    }

    @Test("without a token every endpoint is open")
    func noToken() {
        let admin = server(AdminConfig(metricsOpen: false))
        #expect(admin.token == nil)
        let health = admin.respond(method: .GET, path: "/healthz", headers: [:])
        #expect(health.0 == .ok && health.1 == Self.plain && health.2 == "ok\n")
        let ready = admin.respond(method: .GET, path: "/readyz", headers: [:])
        #expect(ready.0 == .ok && ready.2 == "ready\n")
        #expect(admin.respond(method: .GET, path: "/metrics", headers: [:]).0 == .ok)
    }

    @Test("with a token, /healthz and /readyz stay open")
    func probesOpen() {
        let admin = server(AdminConfig(token: "s3cret", metricsOpen: false))
        #expect(admin.respond(method: .GET, path: "/healthz", headers: [:]).0 == .ok)
        #expect(admin.respond(method: .GET, path: "/readyz", headers: [:]).0 == .ok)
        #expect(admin.respond(method: .GET, path: "/healthz?from=lb", headers: [:]).2 == "ok\n")
    }

    @Test("with a token and metrics closed, /metrics needs the right bearer token")
    func metricsNeedsToken() {
        let admin = server(AdminConfig(token: "s3cret", metricsOpen: false))
        let missing = admin.respond(method: .GET, path: "/metrics", headers: [:])
        #expect(missing.0 == .unauthorized && missing.1 == Self.plain && missing.2 == Self.unauthorized)
        #expect(admin.respond(method: .GET, path: "/metrics", headers: bearer("wrong")).0 == .unauthorized)
        #expect(admin.respond(method: .GET, path: "/metrics", headers: bearer("s3cret ")).0 == .unauthorized)
        #expect(admin.respond(method: .GET, path: "/metrics", headers: ["Authorization": "s3cret"]).0 == .unauthorized)
        #expect(
            admin.respond(method: .GET, path: "/metrics", headers: ["Authorization": "Basic czNjcmV0"]).0
                == .unauthorized)
        #expect(admin.respond(method: .GET, path: "/metrics?x=1", headers: [:]).0 == .unauthorized)

        let ok = admin.respond(method: .GET, path: "/metrics", headers: bearer("s3cret"))
        #expect(ok.0 == .ok)
        #expect(ok.1 == "text/plain; version=0.0.4; charset=utf-8")
        #expect(ok.2.contains("ott_proxy_requests_total"))
    }

    @Test("with metrics_open, /metrics needs no token")
    func metricsOpen() {
        let admin = server(AdminConfig(token: "s3cret", metricsOpen: true))
        let metrics = admin.respond(method: .GET, path: "/metrics", headers: [:])
        #expect(metrics.0 == .ok)
        #expect(metrics.2.contains("ott_proxy_requests_total"))
        // Only /metrics is opened, not everything else.
        #expect(admin.respond(method: .GET, path: "/other", headers: [:]).0 == .unauthorized)
    }

    @Test("the metrics body is Prometheus text with the proxy's counters")
    func metricsBody() {
        let admin = server(AdminConfig())
        let body = admin.respond(method: .GET, path: "/metrics", headers: [:]).2
        #expect(body.contains("# TYPE ott_proxy_requests_total counter"))
        #expect(body.contains(#"ott_proxy_requests_total{listener="l",code="2xx"} 0"#))
        #expect(body.contains("ott_proxy_upstream_errors_total"))
    }

    @Test("an unknown path is 401 without the token and 404 with it")
    func unknownPath() {
        let admin = server(AdminConfig(token: "s3cret"))
        #expect(admin.respond(method: .GET, path: "/nope", headers: [:]).0 == .unauthorized)
        let notFound = admin.respond(method: .GET, path: "/nope", headers: bearer("s3cret"))
        #expect(notFound.0 == .notFound && notFound.1 == Self.plain && notFound.2 == "not found\n")
        #expect(server(AdminConfig()).respond(method: .GET, path: "/", headers: [:]).0 == .notFound)
    }

    @Test("a method other than GET on a known endpoint is 405", arguments: ["/healthz", "/readyz", "/metrics"])
    func methodNotAllowed(path: String) {
        let admin = server(AdminConfig(token: "s3cret"))
        let answer = admin.respond(method: .POST, path: path, headers: bearer("s3cret"))
        #expect(answer.0 == .methodNotAllowed && answer.2 == "method not allowed\n")
        #expect(admin.respond(method: .DELETE, path: path, headers: bearer("s3cret")).0 == .methodNotAllowed)
    }

    @Test("POST /healthz is 405 even without a token (the probe endpoints are open)")
    func postHealthzWithoutToken() {
        let admin = server(AdminConfig(token: "s3cret"))
        #expect(admin.respond(method: .POST, path: "/healthz", headers: [:]).0 == .methodNotAllowed)
    }

    @Test("the token can come from the environment variable named by token_env")
    func tokenFromEnvironment() {
        let name = "OTT_PROXY_ADMIN_TOKEN"
        let environment = Environment()
        let admin = server(AdminConfig(tokenEnv: name, metricsOpen: false), environment: environment)

        // Unset: no token, so everything is open.
        #expect(admin.token == nil)
        #expect(admin.respond(method: .GET, path: "/metrics", headers: [:]).0 == .ok)

        environment.set(name, "from-env")
        #expect(admin.token == "from-env")
        #expect(admin.respond(method: .GET, path: "/metrics", headers: [:]).0 == .unauthorized)
        #expect(admin.respond(method: .GET, path: "/metrics", headers: bearer("wrong")).0 == .unauthorized)
        #expect(admin.respond(method: .GET, path: "/metrics", headers: bearer("from-env")).0 == .ok)

        // Empty counts as unset.
        environment.set(name, "")
        #expect(admin.token == nil)
    }

    @Test("an inline token wins over token_env")
    func inlineTokenWins() {
        let name = "OTT_PROXY_ADMIN_TOKEN"
        let environment = Environment()
        environment.set(name, "from-env")
        let admin = server(AdminConfig(token: "inline", tokenEnv: name, metricsOpen: false), environment: environment)
        #expect(admin.token == "inline")
        #expect(admin.respond(method: .GET, path: "/metrics", headers: bearer("inline")).0 == .ok)
        #expect(admin.respond(method: .GET, path: "/metrics", headers: bearer("from-env")).0 == .unauthorized)
    }
}

@Suite struct BearerTokenTests {
    @Test(arguments: [
        ("Bearer s3cret", true), ("bearer s3cret", true), ("BEARER s3cret", true), ("Bearer s3cre", false),
        ("Bearer s3cretx", false), ("Basic s3cret", false), ("s3cret", false), ("Bearer ", false),
    ])
    func bearerMatching(header: String, expected: Bool) {
        #expect(AdminServer.bearerMatches(header, token: "s3cret") == expected)
    }

    @Test func missingHeaderIsRefused() {
        #expect(AdminServer.bearerMatches(nil, token: "s3cret") == false)
    }
}
