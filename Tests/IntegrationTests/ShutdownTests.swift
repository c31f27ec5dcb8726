import DemoBackends
import NIOCore
import NIOPosix
import Testing

/// `ProxyServer.shutdown()`: stop accepting, let in-flight requests finish within `shutdown_grace`, then close
/// whatever is left, tunnels included.
@Suite struct ShutdownTests {
    @Test func inFlightRequestCompletesBeforeTheConnectionCloses() async throws {
        let origin = try await DelayedOrigin.start(delay: .milliseconds(300))
        defer { Task { await origin.stop() } }
        // (A 5 s grace against a 4 s bound: with 3 s against 2 s, a loaded CI run took 2.17 s, still well before the end.)
        try await withProxy(backends: [(id: "slow", port: origin.port)], configure: { $0.timeouts.shutdownGrace = .seconds(5) }) {
            proxy in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            try await connection.send("GET /slow HTTP/1.1\r\nHost: example\r\n\r\n")
            // Shut down once the request is at the origin, which answers 300 ms later.
            #expect(await WSSupport.waitUntil(timeout: .seconds(3)) { origin.requestsReceived == 1 })

            let started = ContinuousClock.now
            let shutdown = Task { await proxy.server.shutdown() }
            let response = try await connection.readResponse(timeout: .seconds(3))
            #expect(response.status == 200)
            #expect(response.bodyText == "slow ok\n")
            #expect(origin.responsesSent == 1)
            // The response was the connection's last: it closes instead of staying keep-alive.
            #expect(await connection.waitForClose(timeout: .seconds(2)))
            await shutdown.value
            let took = ContinuousClock.now - started
            // Finished as soon as the connection was done, not at the end of the grace period.
            #expect(took < .seconds(4), "shutdown took \(took)")
        }
    }

    @Test(arguments: [true, false])
    func openWebSocketIsClosedWhenTheGracePeriodEnds(relay: Bool) async throws {
        let room = try await RoomServer.start(id: "a", group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { try? await room.stop() } }
        try await withProxy(
            backends: [(id: "a", port: room.port)],
            configure: {
                $0.timeouts.shutdownGrace = .milliseconds(1500)
                $0.threads.tunnelRelay = relay
            }
        ) { proxy in
            let client = try await WebSocketClient.connect(
                host: "127.0.0.1", port: proxy.port, path: "/rooms/grace/ws", group: MultiThreadedEventLoopGroup.singleton)
            _ = try await WSSupport.withTimeout(.seconds(5)) { try await client.receive() }  // joined
            let carried = await WSSupport.waitUntil(timeout: .seconds(3)) { proxy.server.relayedTunnels == (relay ? 1 : 0) }
            #expect(carried, "relayed tunnels: \(proxy.server.relayedTunnels) (relay: \(relay))")

            let started = ContinuousClock.now
            let shutdown = Task { await proxy.server.shutdown() }
            // Still usable during the grace period.
            try await Task.sleep(for: .milliseconds(200))
            try await client.sendText("still here")
            let message = try await WSSupport.withTimeout(.seconds(2)) { try await client.receive() }
            guard case .text(let text) = message else {
                Issue.record("expected the broadcast during the grace period, got \(String(describing: message))")
                return
            }
            #expect(text.contains("still here"))

            #expect(try await WSSupport.withTimeout(.seconds(5)) { try await client.receive() } == nil)
            let closedAfter = ContinuousClock.now - started
            // The grace is long enough that a loaded machine still fits the message exchange above inside it.
            #expect(closedAfter >= .milliseconds(1450), "closed after \(closedAfter), before the grace period ended")
            #expect(closedAfter < .seconds(4), "closed after \(closedAfter)")
            await shutdown.value
            let membersGone = try await WSSupport.waitUntil(timeout: .seconds(3)) {
                try await WSSupport.roomMembers("grace", backendPort: room.port) == 0
            }
            #expect(membersGone, "the backend side of the tunnel stayed open")
        }
    }

    @Test func listenerRefusesConnectionsAfterShutdown() async throws {
        let room = try await RoomServer.start(id: "a", group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { try? await room.stop() } }
        try await withProxy(backends: [(id: "a", port: room.port)]) { proxy in
            let before = try await RawHTTPConnection.connect(port: proxy.port)
            await before.close()
            await proxy.server.shutdown()
            await #expect(throws: (any Error).self) {
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                await connection.close()
            }
        }
    }
}
