import DemoBackends
import Testing

@Suite(.timeLimit(.minutes(1)))
struct RoomServerWebSocketTests {
    @Test func textIsBroadcastToEveryMemberOfTheRoom() async throws {
        try await withEventLoopGroup { group in
            let server = try await RoomServer.start(id: "b1", group: group)
            let alice = try await WebSocketClient.connect(
                host: "127.0.0.1", port: server.port, path: "/rooms/party/ws", group: group)
            let aliceJoined = try jsonObject(try await Self.nextText(alice))
            #expect(aliceJoined["event"] as? String == "joined")
            #expect(aliceJoined["room"] as? String == "party")
            #expect(aliceJoined["backend"] as? String == "b1")
            #expect(aliceJoined["members"] as? Int == 1)

            let bob = try await WebSocketClient.connect(
                host: "127.0.0.1", port: server.port, path: "/rooms/party/ws", group: group)
            #expect(try jsonObject(try await Self.nextText(bob))["members"] as? Int == 2)

            // Quotes and newlines check that the server JSON-escapes instead of interpolating.
            let text = "hello \"room\"\nbye"
            try await alice.sendText(text)
            for client in [alice, bob] {
                let event = try jsonObject(try await Self.nextText(client))
                #expect(event["event"] as? String == "message")
                #expect(event["room"] as? String == "party")
                #expect(event["backend"] as? String == "b1")
                #expect(event["text"] as? String == text)
            }
            #expect(server.roomNames() == ["party"])

            await alice.close()
            await bob.close()
            try await server.stop()
        }
    }

    @Test func binaryIsEchoedUnchanged() async throws {
        try await withEventLoopGroup { group in
            let server = try await RoomServer.start(id: "b1", group: group)
            let client = try await WebSocketClient.connect(
                host: "127.0.0.1", port: server.port, path: "/rooms/bin/ws", group: group)
            _ = try await Self.nextText(client)

            let payload = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
            try await client.sendBinary(payload)
            #expect(try await client.receive() == .binary(payload))

            await client.close()
            try await server.stop()
        }
    }

    @Test func pingIsAnsweredWithSamePayload() async throws {
        try await withEventLoopGroup { group in
            let server = try await RoomServer.start(id: "b1", group: group)
            let client = try await WebSocketClient.connect(
                host: "127.0.0.1", port: server.port, path: "/rooms/p/ws", group: group)
            _ = try await Self.nextText(client)

            try await client.sendPing([1, 2, 3])
            #expect(try await client.receive() == .pong([1, 2, 3]))

            await client.close()
            try await server.stop()
        }
    }

    @Test(arguments: [UInt16(4003), 1001])
    func serverCloseCarriesRequestedCode(code: UInt16) async throws {
        try await withEventLoopGroup { group in
            let server = try await RoomServer.start(id: "b1", group: group)
            let client = try await WebSocketClient.connect(
                host: "127.0.0.1", port: server.port, path: "/rooms/c/ws", group: group)
            _ = try await Self.nextText(client)

            try await client.sendText("close:\(code)")
            #expect(try await client.receive() == .close(code: code))
            #expect(try await client.receive() == nil)

            await client.close()
            try await server.stop()
        }
    }

    @Test func clientCloseCodeIsEchoed() async throws {
        try await withEventLoopGroup { group in
            let server = try await RoomServer.start(id: "b1", group: group)
            let client = try await WebSocketClient.connect(
                host: "127.0.0.1", port: server.port, path: "/rooms/c/ws", group: group)
            _ = try await Self.nextText(client)

            try await client.sendClose(code: 4001)
            #expect(try await client.receive() == .close(code: 4001))
            #expect(try await client.receive() == nil)

            try await server.stop()
        }
    }

    @Test func upgradeOutsideRoomsFailsWithStatus() async throws {
        try await withEventLoopGroup { group in
            let server = try await RoomServer.start(id: "b1", group: group)
            // Not a room URL, so the server answers plain HTTP 200 instead of 101.
            await #expect(throws: WebSocketClient.ConnectError.upgradeRejected(status: 200)) {
                _ = try await WebSocketClient.connect(
                    host: "127.0.0.1", port: server.port, path: "/lobby/ws", group: group)
            }
            try await server.stop()
        }
    }

    @Test func stopClosesOpenWebSockets() async throws {
        try await withEventLoopGroup { group in
            let server = try await RoomServer.start(id: "b1", group: group)
            let client = try await WebSocketClient.connect(
                host: "127.0.0.1", port: server.port, path: "/rooms/s/ws", group: group)
            _ = try await Self.nextText(client)

            try await server.stop()
            #expect(try await client.receive() == nil)
        }
    }

    private static func nextText(_ client: WebSocketClient) async throws -> String {
        let message = try await client.receive()
        guard case .text(let text)? = message else {
            throw TestFailure(description: "expected a text message, got \(String(describing: message))")
        }
        return text
    }
}
