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
    let runtime: ProxyRuntime
    let connections: ConnectionRegistry

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
        let route = path.split(separator: "?", maxSplits: 1).first.map(String.init) ?? path
        let open = route == "/healthz" || route == "/readyz" || (route == "/metrics" && self.config.metricsOpen)
        if !open, let token = self.token {
            let presented = headers.first(name: "authorization") ?? ""
            guard presented == "Bearer \(token)" else {
                return (.unauthorized, "text/plain; charset=utf-8", "unauthorized: bearer token required\n")
            }
        }
        switch (method, route) {
        case (.GET, "/healthz"):
            return (.ok, "text/plain; charset=utf-8", "ok\n")
        case (.GET, "/readyz"):
            return (.ok, "text/plain; charset=utf-8", "ready\n")
        case (.GET, "/metrics"):
            return (.ok, "text/plain; version=0.0.4; charset=utf-8", self.runtime.metrics.prometheusText())
        case (_, "/healthz"), (_, "/readyz"), (_, "/metrics"):
            return (.methodNotAllowed, "text/plain; charset=utf-8", "method not allowed\n")
        default:
            return (.notFound, "text/plain; charset=utf-8", "not found\n")
        }
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
            let (status, contentType, body) = self.server.respond(method: head.method, path: head.uri, headers: head.headers)
            var headers = HTTPHeaders()
            headers.add(name: "content-type", value: contentType)
            headers.add(name: "content-length", value: String(body.utf8.count))
            if !head.isKeepAlive { headers.add(name: "connection", value: "close") }
            context.write(Self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
            context.write(Self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            let done = context.writeAndFlush(Self.wrapOutboundOut(.end(nil)))
            if !head.isKeepAlive {
                done.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            }
        }
    }
}
