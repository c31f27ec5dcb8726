import DemoBackends
import NIOPosix
import Testing

@Suite struct SmokeTests {
    @Test func getThroughProxyReachesRoomServer() async throws {
        let room = try await RoomServer.start(id: "a", group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { try? await room.stop() } }
        try await withProxy(backends: [(id: "a", port: room.port)]) { proxy in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            try await connection.send("GET /rooms/lobby HTTP/1.1\r\nHost: example\r\n\r\n")
            let response = try await connection.readResponse()
            #expect(response.status == 200)
            #expect(response.header("x-backend") == "a")
            #expect(response.bodyText.contains("\"room\":\"lobby\""))
            try await connection.send("GET /rooms/lobby HTTP/1.1\r\nHost: example\r\n\r\n")
            let second = try await connection.readResponse()
            #expect(second.status == 200)
            #expect(room.acceptedConnections == 1)
            await connection.close()
        }
    }

    @Test func webSocketThroughProxy() async throws {
        let room = try await RoomServer.start(id: "a", group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { try? await room.stop() } }
        try await withProxy(backends: [(id: "a", port: room.port)]) { proxy in
            let client = try await WebSocketClient.connect(
                host: "127.0.0.1", port: proxy.port, path: "/rooms/lobby/ws", group: MultiThreadedEventLoopGroup.singleton)
            let joined = try await client.receive()
            guard case .text(let text) = joined else { Issue.record("expected joined, got \(String(describing: joined))"); return }
            #expect(text.contains("joined"))
            try await client.sendText("hello")
            let echoed = try await client.receive()
            guard case .text(let message) = echoed else { Issue.record("expected message"); return }
            #expect(message.contains("hello"))
            try await client.sendText("close:4003")
            #expect(try await client.receive() == .close(code: 4003))
            await client.close()
        }
    }
}
