import DemoBackends
import Foundation
import NIOCore
import NIOPosix
import Testing

/// The OTT-compatible test backend on its own (no proxy): it must behave like an OpenTogetherTube server wherever
/// routing depends on it.
@Suite struct OTTBackendTests {
    private static let group = MultiThreadedEventLoopGroup.singleton

    // MARK: Helpers

    private struct Reply {
        var status: Int
        var backend: String?
        var text: String
        var object: [String: Any] { (try? JSONSerialization.jsonObject(with: Data(self.text.utf8))) as? [String: Any] ?? [:] }
        var array: [[String: Any]] { (try? JSONSerialization.jsonObject(with: Data(self.text.utf8))) as? [[String: Any]] ?? [] }
        var errorName: String? { (self.object["error"] as? [String: Any])?["name"] as? String }
    }

    private func request(
        _ backend: OTTBackend, _ method: String, _ path: String, headers: [String: String] = [:], json: String? = nil
    ) async throws -> Reply {
        let connection = try await RawHTTPConnection.connect(port: backend.port)
        defer { Task { await connection.close() } }
        var text = "\(method) \(path) HTTP/1.1\r\nHost: ott\r\nConnection: close\r\n"
        for (name, value) in headers.sorted(by: { $0.key < $1.key }) { text += "\(name): \(value)\r\n" }
        if let json {
            text += "Content-Type: application/json\r\nContent-Length: \(json.utf8.count)\r\n\r\n\(json)"
        } else {
            text += "\r\n"
        }
        try await connection.send(text)
        let response = try await connection.readResponse(forMethod: method)
        return Reply(status: response.status, backend: response.header("x-ott-backend"), text: response.bodyText)
    }

    private func grant(_ backend: OTTBackend, base: String = "") async throws -> String {
        let reply = try await self.request(backend, "GET", "\(base)/api/auth/grant")
        return try #require(reply.object["token"] as? String)
    }

    private func create(_ backend: OTTBackend, _ name: String, visibility: String = "public") async throws -> Reply {
        try await self.request(backend, "POST", "/api/room/create",
                               json: #"{"name":"\#(name)","title":"t","visibility":"\#(visibility)","isTemporary":true}"#)
    }

    private func connect(_ backend: OTTBackend, _ path: String) async throws -> WebSocketClient {
        try await WebSocketClient.connect(host: "127.0.0.1", port: backend.port, path: path, group: Self.group)
    }

    private func next(_ client: WebSocketClient, timeout: Duration = .seconds(5)) async throws -> WebSocketClient.Message? {
        try await WSSupport.withTimeout(timeout, "WebSocket message") { try await client.receive() }
    }

    private func nextJSON(_ client: WebSocketClient) async throws -> [String: Any] {
        let message = try await self.next(client)
        guard case .text(let text) = message else {
            Issue.record("expected a text message, got \(String(describing: message))")
            return [:]
        }
        return (try JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
    }

    /// Connects to the room, authenticates and reads `sync` and `you`; returns the client and the `sync` message.
    private func join(_ backend: OTTBackend, room: String, token: String) async throws -> (WebSocketClient, [String: Any]) {
        let client = try await self.connect(backend, "/api/room/\(room)")
        try await client.sendText(#"{"action":"auth","token":"\#(token)"}"#)
        let sync = try await self.nextJSON(client)
        #expect(sync["action"] as? String == "sync")
        let you = try await self.nextJSON(client)
        #expect(you["action"] as? String == "you")
        #expect(you["served_by"] as? String == backend.id)
        return (client, sync)
    }

    private func expectClose(_ client: WebSocketClient, code: UInt16, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let message = try await self.next(client)
        #expect(message == .close(code: code), sourceLocation: sourceLocation)
    }

    private func withBackends(
        _ ids: [String], unloadAfter: Duration = .seconds(300), baseURL: String = "",
        _ body: ([OTTBackend], OTTSharedStore) async throws -> Void
    ) async throws {
        let store = OTTSharedStore()
        var backends: [OTTBackend] = []
        for id in ids {
            backends.append(try await OTTBackend.start(id: id, baseURL: baseURL, unloadAfter: unloadAfter, store: store, group: Self.group))
        }
        do {
            try await body(backends, store)
        } catch {
            for backend in backends { try? await backend.stop() }
            throw error
        }
        for backend in backends { try await backend.stop() }
    }

    // MARK: Tests

    @Test func createThenGetFindsTheRoomAndNamesTheBackend() async throws {
        try await self.withBackends(["a"]) { backends, store in
            let a = backends[0]
            let created = try await self.create(a, "Movie-Night")
            #expect(created.status == 201)
            #expect(created.object["success"] as? Bool == true)
            #expect(created.object["served_by"] as? String == "a")
            #expect(created.backend == "a")
            #expect(a.loadedRooms() == ["Movie-Night"])
            #expect(store.roomNames() == ["Movie-Night"])

            let room = try await self.request(a, "GET", "/api/room/movie-NIGHT")
            #expect(room.status == 200)
            #expect(room.object["name"] as? String == "Movie-Night")
            #expect(room.object["served_by"] as? String == "a")
            #expect(a.loadCount(of: "MOVIE-night") == 1)

            #expect(try await self.create(a, "movie-night").status == 400)  // taken in another casing
            #expect(try await self.create(a, "list").status == 400)
            #expect(try await self.create(a, "ab").status == 400)
            #expect(try await self.request(a, "GET", "/api/room/nowhere").status == 404)

            let generated = try await self.request(a, "POST", "/api/room/generate", json: "{}")
            #expect(generated.status == 201)
            let name = try #require(generated.object["room"] as? String)
            #expect(name == name.lowercased() && name.count == 36)
            #expect(a.loadedRooms().contains(name))
        }
    }

    @Test func webSocketJoinSyncsWithCanonicalNameAndBroadcastsRequests() async throws {
        try await self.withBackends(["a"]) { backends, _ in
            let a = backends[0]
            #expect(try await self.create(a, "Party").status == 201)
            let token = try await self.grant(a)
            let (alice, aliceSync) = try await self.join(a, room: "pArTy", token: token)
            #expect(aliceSync["room"] as? String == "Party")
            #expect(aliceSync["served_by"] as? String == "a")
            #expect(aliceSync["users"] as? Int == 1)
            let (bob, bobSync) = try await self.join(a, room: "party?reconnect=true", token: try await self.grant(a))
            #expect(bobSync["users"] as? Int == 2)
            #expect(a.users(in: "PARTY") == 2)

            try await alice.sendText(#"{"action":"req","request":{"type":"chat","text":"hi"}}"#)
            for client in [alice, bob] {
                let event = try await self.nextJSON(client)
                #expect(event["action"] as? String == "event")
                #expect(event["served_by"] as? String == "a")
                #expect((event["request"] as? [String: Any])?["text"] as? String == "hi")
            }
            await alice.close()
            await bob.close()
            #expect(await WSSupport.waitUntil { a.users(in: "party") == 0 })
        }
    }

    @Test func authOnAnUnknownRoomClosesWith4002AndLoadsNothing() async throws {
        try await self.withBackends(["a"]) { backends, _ in
            let a = backends[0]
            let client = try await self.connect(a, "/api/room/nosuchroom")
            try await client.sendText(#"{"action":"auth","token":"\#(try await self.grant(a))"}"#)
            try await self.expectClose(client, code: 4002)
            #expect(a.loadedRooms().isEmpty)
            #expect(a.loadCount(of: "nosuchroom") == 0)
        }
    }

    @Test func webSocketOnAWrongPathClosesWith4001() async throws {
        try await self.withBackends(["a"]) { backends, _ in
            let a = backends[0]
            for path in ["/foo", "/api/room/", "/api/room/bad.name", "/api/user/room"] {
                let client = try await self.connect(a, path)  // every path upgrades, as in OTT
                try await self.expectClose(client, code: 4001)
            }
        }
    }

    @Test func missingOrUnknownTokenClosesWith4004() async throws {
        try await self.withBackends(["a"]) { backends, _ in
            let a = backends[0]
            #expect(try await self.create(a, "tokens").status == 201)
            for first in [#"{"action":"auth"}"#, #"{"action":"auth","token":"forged"}"#, #"{"action":"req","request":{}}"#, "not json"] {
                let client = try await self.connect(a, "/api/room/tokens")
                try await client.sendText(first)
                try await self.expectClose(client, code: 4004)
            }
            #expect(a.users(in: "tokens") == 0)
        }
    }

    @Test func voteAndUndoNeedTheCallersWebSocketOnThisBackend() async throws {
        try await self.withBackends(["a", "b"]) { backends, store in
            let (a, b) = (backends[0], backends[1])
            #expect(try await self.create(a, "voting").status == 201)
            let token = try await self.grant(b)  // minted on b, valid on a too
            let auth = ["Authorization": "Bearer \(token)"]
            let body = #"{"service":"youtube","id":"abc"}"#

            let before = try await self.request(a, "POST", "/api/room/voting/vote", headers: auth, json: body)
            #expect(before.status == 400)
            #expect(before.errorName == "ClientNotFoundInRoomException")
            #expect(before.object["served_by"] as? String == "a")

            // A WebSocket on the wrong server (a duplicate load on b) does not help a vote on a.
            let (onB, _) = try await self.join(b, room: "voting", token: token)
            #expect(try await self.request(a, "POST", "/api/room/voting/vote", headers: auth, json: body).status == 400)
            #expect(try await self.request(b, "POST", "/api/room/voting/vote", headers: auth, json: body).status == 200)
            #expect(store.duplicates() == ["voting": ["a", "b"]])
            await onB.close()

            let (onA, _) = try await self.join(a, room: "VOTING", token: token)
            #expect(try await self.request(a, "POST", "/api/room/Voting/vote", headers: auth, json: body).status == 200)
            #expect(try await self.request(a, "DELETE", "/api/room/voting/vote", headers: auth, json: body).status == 200)
            #expect(try await self.request(a, "POST", "/api/room/voting/undo", headers: auth, json: #"{"data":{}}"#).status == 200)
            #expect(try await self.request(a, "POST", "/api/room/voting/vote", json: body).status == 400)  // no token
            await onA.close()
        }
    }

    @Test func listShowsOnlyThisBackendsRoomsSortedWithApikeySemantics() async throws {
        try await self.withBackends(["a", "b"]) { backends, _ in
            let (a, b) = (backends[0], backends[1])
            for name in ["zeta", "Alpha", "beta"] { #expect(try await self.create(a, name).status == 201) }
            #expect(try await self.create(a, "hidden", visibility: "unlisted").status == 201)
            #expect(try await self.create(b, "elsewhere").status == 201)
            let token = try await self.grant(a)
            let (z1, _) = try await self.join(a, room: "zeta", token: token)
            let (z2, _) = try await self.join(a, room: "zeta", token: token)
            let (h1, _) = try await self.join(a, room: "hidden", token: token)

            let list = try await self.request(a, "GET", "/api/room/list")
            #expect(list.status == 200)
            #expect(list.backend == "a")
            #expect(list.array.map { $0["name"] as? String } == ["zeta", "Alpha", "beta"])
            #expect(list.array.map { $0["users"] as? Int } == [2, 0, 0])
            #expect(list.array.allSatisfy { $0["served_by"] as? String == "a" })

            let admin = try await self.request(a, "GET", "/api/room/list", headers: ["apikey": "test-apikey"])
            #expect(admin.array.map { $0["name"] as? String } == ["zeta", "hidden", "Alpha", "beta"])
            #expect(admin.array.first { $0["name"] as? String == "hidden" }?["visibility"] as? String == "unlisted")
            #expect(try await self.request(a, "GET", "/api/room/list", headers: ["apikey": "wrong"]).status == 400)

            let other = try await self.request(b, "GET", "/api/room/list")
            #expect(other.array.map { $0["name"] as? String } == ["elsewhere"])
            for client in [z1, z2, h1] { await client.close() }
        }
    }

    @Test func aSecondBackendLoadingTheSameRoomIsADetectableDuplicate() async throws {
        try await self.withBackends(["a", "b"]) { backends, store in
            let (a, b) = (backends[0], backends[1])
            #expect(try await self.create(a, "Shared").status == 201)
            #expect(store.backends(holding: "shared") == ["a"])
            let onA = try await self.request(a, "GET", "/api/room/Shared")
            // The snapshot is stored under its exact name, as Redis `room:<name>` is, so b finds it by that name.
            let onB = try await self.request(b, "PATCH", "/api/room/Shared", json: #"{"title":"from b"}"#)
            #expect(onB.status == 200)
            #expect(onB.backend == "b")
            #expect(a.loadCount(of: "shared") == 1)
            #expect(b.loadCount(of: "shared") == 1)
            #expect(store.duplicates() == ["shared": ["a", "b"]])
            let epochA = try #require(onA.object["loadEpoch"] as? Int)
            let epochB = try #require(try await self.request(b, "GET", "/api/room/Shared").object["loadEpoch"] as? Int)
            #expect(epochB > epochA)
            // A temporary room's snapshot is not found in another casing on a server that has not loaded it.
            let c = try await OTTBackend.start(id: "c", store: store, group: Self.group)
            #expect(try await self.request(c, "GET", "/api/room/shared").status == 404)
            #expect(try await self.request(c, "POST", "/api/room/Shared/queue", json: #"{"service":"youtube","id":"x"}"#).status == 200)
            #expect(c.loadCount(of: "shared") == 1)
            try await c.stop()
        }
    }

    @Test func keepaliveUnloadClosesNobodyAndALaterJoinReloads() async throws {
        try await self.withBackends(["a"], unloadAfter: .milliseconds(300)) { backends, store in
            let a = backends[0]
            #expect(try await self.create(a, "idle").status == 201)
            // Loaded by HTTP only: unloads about `unloadAfter` later, keeping its snapshot.
            #expect(await WSSupport.waitUntil(timeout: .seconds(3)) { a.loadedRooms().isEmpty })
            #expect(store.roomNames() == ["idle"])
            #expect(store.backends(holding: "idle").isEmpty)

            let token = try await self.grant(a)
            let (client, sync) = try await self.join(a, room: "idle", token: token)
            #expect(sync["users"] as? Int == 1)
            #expect(a.loadCount(of: "idle") == 2)

            // A room with a user stays, even when the check is forced, and its client is not closed.
            try await Task.sleep(for: .milliseconds(600))
            #expect(a.unloadIdle().isEmpty)
            #expect(a.loadedRooms() == ["idle"])
            try await client.sendText(#"{"action":"req","request":{"type":"ping"}}"#)
            #expect(try await self.nextJSON(client)["action"] as? String == "event")  // no close frame came first

            await client.close()
            #expect(await WSSupport.waitUntil(timeout: .seconds(3)) { a.loadedRooms().isEmpty })
            let (again, _) = try await self.join(a, room: "idle", token: token)
            #expect(a.loadCount(of: "idle") == 3)
            await again.close()
            #expect(a.unloadIdle() == ["idle"])
        }
    }

    @Test func adminUnloadClosesWith4003AndDeletesTheSnapshot() async throws {
        try await self.withBackends(["a"]) { backends, store in
            let a = backends[0]
            #expect(try await self.create(a, "doomed").status == 201)
            let (client, _) = try await self.join(a, room: "doomed", token: try await self.grant(a))
            #expect(try await self.request(a, "DELETE", "/api/room/doomed").status == 400)  // no apikey
            let deleted = try await self.request(a, "DELETE", "/api/room/doomed", headers: ["apikey": "test-apikey"])
            #expect(deleted.status == 200)
            try await self.expectClose(client, code: 4003)
            #expect(a.loadedRooms().isEmpty)
            #expect(store.roomNames().isEmpty)
        }
    }

    @Test func shutdownClosesWith1001AndKeepsTheSnapshot() async throws {
        let store = OTTSharedStore()
        let a = try await OTTBackend.start(id: "a", store: store, group: Self.group)
        #expect(try await self.create(a, "lasting").status == 201)
        let (client, _) = try await self.join(a, room: "lasting", token: try await self.grant(a))
        try await a.stop()
        try await self.expectClose(client, code: 1001)
        #expect(store.roomNames() == ["lasting"])
    }

    @Test func otherEndpointsAnswerAndNameTheBackend() async throws {
        try await self.withBackends(["a"]) { backends, _ in
            let a = backends[0]
            let status = try await self.request(a, "GET", "/api/status")
            #expect(status.object["status"] as? String == "ok")
            #expect(status.object["served_by"] as? String == "a")
            for path in ["/", "/room/foo", "/assets/index.js", "/api/user", "/api/data/previewAdd?input=x"] {
                let reply = try await self.request(a, "GET", path)
                #expect(reply.status == 200, "\(path)")
                #expect(reply.backend == "a", "\(path)")
                #expect(reply.text.contains("a"), "\(path)")
            }
        }
    }

    @Test func baseURLIsHonoured() async throws {
        try await self.withBackends(["a"], baseURL: "/ott/") { backends, _ in
            let a = backends[0]
            #expect(try await self.request(a, "GET", "/ott/api/status").status == 200)
            #expect(try await self.request(a, "GET", "/api/status").status == 404)
            #expect(try await self.request(a, "POST", "/ott/api/room/create", json: #"{"name":"based"}"#).status == 201)
            #expect(try await self.request(a, "GET", "/ott/api/room/BASED").object["name"] as? String == "based")
            let token = try await self.grant(a, base: "/ott")

            let outside = try await self.connect(a, "/api/room/based")
            try await self.expectClose(outside, code: 4001)
            let client = try await self.connect(a, "/ott/api/room/Based")
            try await client.sendText(#"{"action":"auth","token":"\#(token)"}"#)
            #expect(try await self.nextJSON(client)["room"] as? String == "based")
            await client.close()
        }
    }
}
