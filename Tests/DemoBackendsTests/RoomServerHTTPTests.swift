import DemoBackends
import Testing

@Suite(.timeLimit(.minutes(1)))
struct RoomServerHTTPTests {
    @Test func roomRequestReturnsJSONAndBackendHeader() async throws {
        try await withEventLoopGroup { group in
            let server = try await RoomServer.start(id: "b1", group: group)
            let responses = try await RawHTTPClient.get(
                ["/rooms/abc", "/rooms/abc", "/"],
                port: server.port,
                group: group
            )
            try await server.stop()

            let first = responses[0]
            #expect(first.status == .ok)
            #expect(first.headers["X-Backend"] == ["b1"])
            let json = try jsonObject(first.body)
            #expect(json["room"] as? String == "abc")
            #expect(json["backend"] as? String == "b1")
            #expect(json["members"] as? Int == 0)
            #expect(json["created"] as? Bool == true)

            // The room is now in memory, so the second load does not create it.
            #expect(try jsonObject(responses[1].body)["created"] as? Bool == false)

            #expect(responses[2].body == "served by backend b1\n")
            #expect(responses[2].headers["X-Backend"] == ["b1"])
            #expect(server.roomNames() == ["abc"])
        }
    }

    @Test func keepAliveReusesOneConnection() async throws {
        try await withEventLoopGroup { group in
            let server = try await RoomServer.start(id: "b1", group: group)
            let responses = try await RawHTTPClient.get(["/", "/rooms/x"], port: server.port, group: group)
            #expect(responses.map(\.status) == [.ok, .ok])
            #expect(server.acceptedConnections == 1)
            #expect(server.requestCount == 2)
            try await server.stop()
        }
    }
}
