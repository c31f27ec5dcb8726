import DemoBackends
import NIOPosix
import ProxyCore
import Testing

/// The admin listener over real sockets, next to a proxy that has served traffic.
@Suite struct AdminTests {
    private func get(_ path: String, port: Int, token: String? = nil) async throws -> RawHTTPConnection.Response {
        let connection = try await RawHTTPConnection.connect(port: port)
        defer { Task { await connection.close() } }
        var request = "GET \(path) HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n"
        if let token { request += "Authorization: Bearer \(token)\r\n" }
        try await connection.send(request + "\r\n")
        return try await connection.readResponse()
    }

    /// The value of the 2xx request counter for the test listener, nil if the series is absent.
    private func requests2xx(_ metrics: String) -> Double? {
        for line in metrics.split(separator: "\n") where line.hasPrefix("ott_proxy_requests_total{") {
            guard line.contains("code=\"2xx\""), line.contains("listener=\"test\"") else { continue }
            return line.split(separator: " ").last.flatMap { Double($0) }
        }
        return nil
    }

    @Test func healthMetricsAndTokenOverRealSockets() async throws {
        let room = try await RoomServer.start(id: "a", group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { try? await room.stop() } }
        let admin = AdminConfig(address: "127.0.0.1", port: 0, token: "s3cret", metricsOpen: false)
        try await withProxy(backends: [(id: "a", port: room.port)], admin: admin) { proxy in
            let adminPort = try #require(proxy.adminPort)

            let health = try await self.get("/healthz", port: adminPort)
            #expect(health.status == 200)
            #expect(health.bodyText == "ok\n")

            let before = try await self.get("/metrics", port: adminPort, token: "s3cret")
            #expect(before.status == 200)
            #expect((self.requests2xx(before.bodyText) ?? 0) == 0)

            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            try await connection.send("GET /rooms/metered HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n")
            #expect(try await connection.readResponse().status == 200)
            await connection.close()

            let metrics = try await self.get("/metrics", port: adminPort, token: "s3cret")
            #expect(metrics.status == 200)
            #expect(metrics.bodyText.contains("ott_proxy_requests_total"))
            #expect(self.requests2xx(metrics.bodyText) == 1, "metrics: \(metrics.bodyText)")

            let anonymous = try await self.get("/metrics", port: adminPort)
            #expect(anonymous.status == 401)
            #expect(!anonymous.bodyText.contains("ott_proxy"))
            let wrongToken = try await self.get("/metrics", port: adminPort, token: "guess")
            #expect(wrongToken.status == 401)
        }
    }

    @Test func shutdownClosesTheAdminListenerAndItsConnections() async throws {
        let room = try await RoomServer.start(id: "a", group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { try? await room.stop() } }
        let admin = AdminConfig(address: "127.0.0.1", port: 0)
        try await withProxy(backends: [(id: "a", port: room.port)], admin: admin) { proxy in
            let adminPort = try #require(proxy.adminPort)
            let keepAlive = try await RawHTTPConnection.connect(port: adminPort)
            try await keepAlive.send("GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
            #expect(try await keepAlive.readResponse().status == 200)

            await proxy.server.shutdown()
            #expect(await keepAlive.waitForClose(timeout: .seconds(3)), "an admin keep-alive connection outlived shutdown")
            await #expect(throws: (any Error).self) {
                let connection = try await RawHTTPConnection.connect(port: adminPort)
                await connection.close()
            }
        }
    }
}
