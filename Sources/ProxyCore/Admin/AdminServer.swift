import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

/// The admin listener: health, readiness and Prometheus metrics, on its own port (never the public one).
///
/// When a token is configured (`admin.token`, or the variable named by `admin.token_env`), every endpoint but
/// `/healthz`, `/readyz` (load balancers probe those without credentials) and, with `metrics_open`, `/metrics`
/// requires `Authorization: Bearer <token>`.
struct AdminServer: Sendable {
    let config: AdminConfig
    let proxy: ProxyServer?
    let metrics: ProxyMetrics
    let connections: ConnectionRegistry
    /// Reads an environment variable (`token_env`): the process environment, or a stand-in in tests (so they need not
    /// change the environment of a process whose other tests run in parallel).
    let environment: @Sendable (String) -> String?

    static let processEnvironment: @Sendable (String) -> String? = { ProcessInfo.processInfo.environment[$0] }

    init(config: AdminConfig, proxy: ProxyServer, connections: ConnectionRegistry) {
        self.config = config
        self.environment = Self.processEnvironment
        self.proxy = proxy
        self.metrics = proxy.runtime.metrics
        self.connections = connections
    }

    /// Without a proxy (unit tests of the pure answers); `POST /reload` then reports that it cannot reload.
    init(
        config: AdminConfig, metrics: ProxyMetrics, connections: ConnectionRegistry,
        environment: @escaping @Sendable (String) -> String? = AdminServer.processEnvironment
    ) {
        self.config = config
        self.environment = environment
        self.proxy = nil
        self.metrics = metrics
        self.connections = connections
    }

    /// An answer, or the instruction to reload first (the only admin action that waits on something).
    enum Answer {
        case now(HTTPResponseStatus, String, String)
        case reload
    }

    var token: String? {
        if let token = self.config.token { return token }
        if let name = self.config.tokenEnv, let value = self.environment(name), !value.isEmpty {
            return value
        }
        return nil
    }

    /// - Parameter tracking: receives every admin connection while it is open, so shutdown can close them.
    func bind(group: EventLoopGroup, tracking: ConnectionRegistry) async throws -> Channel {
        let server = self
        return try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                guard tracking.add(channel) else {
                    return channel.close()
                }
                channel.closeFuture.whenComplete { _ in tracking.remove(channel) }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(AdminHandler(server: server))
                }
            }
            .bind(host: self.config.address, port: self.config.port)
            .get()
    }

    /// Answers one admin request. Pure apart from reading counters, so it is testable without sockets.
    func respond(method: HTTPMethod, path: String, headers: HTTPHeaders) -> (HTTPResponseStatus, String, String) {
        switch self.answer(method: method, path: path, headers: headers) {
        case .now(let status, let type, let body): return (status, type, body)
        case .reload: return (.ok, "application/json", "")
        }
    }

    func answer(method: HTTPMethod, path: String, headers: HTTPHeaders) -> Answer {
        let (status, type, body) = self.route(method: method, path: path, headers: headers)
        // `route` answers an authorized `POST /reload` with 202 to mean "run the reload"; other endpoints (a drain)
        // answer 202 too and are complete as they are.
        let route = path.split(separator: "?", maxSplits: 1).first.map(String.init) ?? path
        if status == .accepted && method == .POST && route == "/reload" { return .reload }
        return .now(status, type, body)
    }

    /// Runs a reload and renders its result as the admin response.
    func reload() async -> (HTTPResponseStatus, String, String) {
        guard let proxy = self.proxy else {
            return (.serviceUnavailable, "application/json", #"{"reloaded":false,"error":"reload is not available"}"# + "\n")
        }
        switch await proxy.reload() {
        case .success(let generation):
            return (.ok, "application/json", #"{"reloaded":true,"generation":\#(generation)}"# + "\n")
        case .failure(let error):
            return (.unprocessableEntity, "application/json",
                    #"{"reloaded":false,"error":"# + LineLogHandler.jsonString(error.description) + "}\n")
        }
    }

    private func route(method: HTTPMethod, path: String, headers: HTTPHeaders) -> (HTTPResponseStatus, String, String) {
        let route = path.split(separator: "?", maxSplits: 1).first.map(String.init) ?? path
        let open = route == "/healthz" || route == "/readyz" || (route == "/metrics" && self.config.metricsOpen)
        if !open, let token = self.token {
            guard Self.bearerMatches(headers.first(name: "authorization"), token: token) else {
                return (.unauthorized, "text/plain; charset=utf-8", "unauthorized: bearer token required\n")
            }
        }
        switch (method, route) {
        case (.GET, "/healthz"):
            return (.ok, "text/plain; charset=utf-8", "ok\n")
        case (.GET, "/readyz"):
            return (.ok, "text/plain; charset=utf-8", "ready\n")
        case (.GET, "/metrics"):
            return (.ok, "text/plain; version=0.0.4; charset=utf-8", self.metrics.prometheusText())
        case (.POST, "/reload"):
            return (.accepted, "", "")
        case (_, "/healthz"), (_, "/readyz"), (_, "/metrics"), (_, "/reload"):
            return (.methodNotAllowed, "text/plain; charset=utf-8", "method not allowed\n")
        default:
            if let proxy = self.proxy, let answer = Self.ownershipAPI(method: method, path: path, proxy: proxy) {
                return answer
            }
            return (.notFound, "text/plain; charset=utf-8", "not found\n")
        }
    }
}

// MARK: Backends and keys (docs/admin-api.md)

extension AdminServer {
    static let json = "application/json"

    /// `GET /backends`, `POST /backends/{id}/drain[?migrate=true]`, `DELETE /backends/{id}/drain`,
    /// `GET /keys?prefix=&limit=`, `GET /keys/{key}`, `DELETE /keys/{key}`; nil when the path is none of these.
    static func ownershipAPI(method: HTTPMethod, path: String, proxy: ProxyServer) -> (HTTPResponseStatus, String, String)? {
        let runtime = proxy.runtime
        let components = URLComponents(string: path)
        let route = components?.percentEncodedPath ?? path
        let query = Dictionary(
            (components?.queryItems ?? []).map { ($0.name, $0.value ?? "") }, uniquingKeysWith: { _, last in last })
        let segments = route.split(separator: "/", omittingEmptySubsequences: true).map {
            String($0).removingPercentEncoding ?? String($0)
        }
        switch (method, segments.first, segments.count) {
        case (.GET, "backends", 1):
            // Per-backend key counts include expired keys until they are swept (every 15 s): sweep first, so a
            // drained backend whose keys ended naturally reports `keys: 0` and `drained: true` as soon as it is.
            (runtime.directory as? InMemoryOwnershipDirectory)?.sweep()
            let pools = runtime.config.pools.map(\.name)
            let backends: [[String: Any]] = pools.flatMap { name in
                (runtime.table.pools[name]?.backends ?? []).map { backend in
                    let keys = runtime.directory.keyCount(on: backend.id)
                    let tunnels = runtime.tunnels.count(onBackend: backend.id)
                    let draining = runtime.drains.state(of: backend.id)
                    return [
                        "id": backend.id, "pool": name, "address": "\(backend.config.host):\(backend.config.port)",
                        "status": backend.status.state.rawValue,
                        "healthy": backend.isHealthy, "draining": draining != nil, "migrating": draining?.migrate ?? false,
                        "weight": backend.config.weight, "region": backend.config.region ?? NSNull(),
                        "keys": keys, "tunnels": tunnels, "connections": backend.active,
                        "drained": draining != nil && keys == 0 && tunnels == 0,
                    ]
                }
            }
            return (.ok, json, render(["backends": backends]))
        case (.POST, "backends", 3) where segments[2] == "drain":
            let migrate = ["true", "1", "yes"].contains(query["migrate"]?.lowercased() ?? "")
            guard proxy.drain(backend: segments[1], migrate: migrate) else {
                return (.notFound, json, render(["error": "no backend '\(segments[1])'"]))
            }
            return (.accepted, json, render(["backend": segments[1], "draining": true, "migrate": migrate]))
        case (.DELETE, "backends", 3) where segments[2] == "drain":
            guard proxy.undrain(backend: segments[1]) else {
                return (.notFound, json, render(["error": "no backend '\(segments[1])'"]))
            }
            return (.ok, json, render(["backend": segments[1], "draining": false]))
        case (.GET, "keys", 1):
            let limit = max(1, min(Int(query["limit"] ?? "") ?? 100, 10_000))
            let keys = runtime.directory.list(prefix: query["prefix"] ?? "", limit: limit).map {
                describe($0.ownership, live: $0.live)
            }
            return (.ok, json, render(["keys": keys]))
        case (.GET, "keys", 2):
            guard let ownership = runtime.directory.owner(of: segments[1]) else {
                return (.notFound, json, render(["error": "no owner for key '\(segments[1])'"]))
            }
            return (.ok, json, render(describe(ownership, live: runtime.directory.liveCount(of: segments[1]))))
        case (.DELETE, "keys", 2):
            guard runtime.directory.owner(of: segments[1]) != nil else {
                return (.notFound, json, render(["error": "no owner for key '\(segments[1])'"]))
            }
            // Releasing publishes the change: the key's tunnels close and its next request places it afresh.
            runtime.directory.release(key: segments[1])
            return (.ok, json, render(["key": segments[1], "released": true]))
        case (.GET, "reconciliation", 1):
            let reports = proxy.reconciliationReports.all.mapValues { report -> [String: Any] in
                [
                    "adopted": report.adopted,
                    "duplicates": report.duplicates.map {
                        ["key": $0.key, "holders": $0.holders, "owner": $0.owner ?? NSNull()] as [String: Any]
                    },
                    "backends_probed": report.backendsProbed,
                    "backends_failed": report.backendsFailed,
                ]
            }
            return (.ok, json, render(["listeners": reports]))
        case (_, "backends", _), (_, "keys", _), (_, "reconciliation", _):
            return (.methodNotAllowed, "text/plain; charset=utf-8", "method not allowed\n")
        default:
            return nil
        }
    }

    static func describe(_ ownership: Ownership, live: Int) -> [String: Any] {
        let age = InMemoryOwnershipDirectory.monotonicSeconds() - ownership.since
        return [
            "key": ownership.key, "pool": ownership.pool, "backend": ownership.backend,
            "epoch": ownership.epoch, "since_seconds_ago": (age * 1000).rounded() / 1000, "live_here": live,
        ]
    }

    static func render(_ object: Any) -> String {
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return "{}\n" }
        return String(decoding: data, as: UTF8.self) + "\n"
    }
}

extension AdminServer {
    /// The auth scheme is case-insensitive (RFC 9110 §11.1); the token comparison takes the same time wherever the
    /// first difference is, so response timing does not reveal a prefix of the token.
    static func bearerMatches(_ header: String?, token: String) -> Bool {
        guard let header, header.count > 7, header.prefix(7).lowercased() == "bearer " else { return false }
        let presented = Array(header.dropFirst(7).utf8)
        let expected = Array(token.utf8)
        var difference = presented.count ^ expected.count
        for index in 0..<expected.count {
            difference |= Int(expected[index] ^ (index < presented.count ? presented[index] : 0))
        }
        return difference == 0
    }
}

final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let server: AdminServer
    private var head: HTTPRequestHead?

    init(server: AdminServer) {
        self.server = server
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch Self.unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
        case .body:
            break
        case .end:
            guard let head = self.head else { return }
            self.head = nil
            switch self.server.answer(method: head.method, path: head.uri, headers: head.headers) {
            case .now(let status, let contentType, let body):
                Self.write(status: status, contentType: contentType, body: body, head: head, context: context)
            case .reload:
                let server = self.server
                let promise = context.eventLoop.makePromise(of: AdminReply.self)
                promise.completeWithTask {
                    let (status, contentType, body) = await server.reload()
                    return AdminReply(status: status, contentType: contentType, body: body)
                }
                promise.futureResult.assumeIsolated().whenSuccess { reply in
                    Self.write(status: reply.status, contentType: reply.contentType, body: reply.body, head: head, context: context)
                }
            }
        }
    }

    private static func write(
        status: HTTPResponseStatus, contentType: String, body: String, head: HTTPRequestHead, context: ChannelHandlerContext
    ) {
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: contentType)
        headers.add(name: "content-length", value: String(body.utf8.count))
        if !head.isKeepAlive { headers.add(name: "connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !head.isKeepAlive {
            done.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        }
    }
}

struct AdminReply: Sendable {
    let status: HTTPResponseStatus
    let contentType: String
    let body: String
}
