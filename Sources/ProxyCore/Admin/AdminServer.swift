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

    init(config: AdminConfig, proxy: ProxyServer, connections: ConnectionRegistry) {
        self.config = config
        self.proxy = proxy
        self.metrics = proxy.runtime.metrics
        self.connections = connections
    }

    /// Without a proxy (unit tests of the pure answers); `POST /reload` then reports that it cannot reload.
    init(config: AdminConfig, metrics: ProxyMetrics, connections: ConnectionRegistry) {
        self.config = config
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
        if let name = self.config.tokenEnv, let value = ProcessInfo.processInfo.environment[name], !value.isEmpty {
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
        if status == .accepted { return .reload }
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
            return (.notFound, "text/plain; charset=utf-8", "not found\n")
        }
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
