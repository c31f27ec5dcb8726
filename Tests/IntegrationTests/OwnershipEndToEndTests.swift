import DemoBackends
import Foundation
import NIOCore
import NIOPosix
import ProxyCore
import Testing

/// Key ownership through a real proxy: a Lua script keys `/rooms/{name}` requests (plain and WebSocket) to
/// `room:{name}`, `RoomServer`s are the backends, and the admin API is asked what the directory holds.
@Suite struct OwnershipEndToEndTests {
    static let group = MultiThreadedEventLoopGroup.singleton

    static func script(place: String) -> String {
        """
        function route(req)
            local room = req.path:match("^/rooms/([^/]+)")
            if room then return { key = "room:" .. room, pool = "main", place = "\(place)" } end
            return { pool = "main" }
        end
        """
    }

    /// Room servers `ids`, and a proxy in front of the first `inPool` of them (all by default) with an admin listener.
    struct Setup {
        let servers: [RoomServer]
        let proxy: ProxyHarness
        let directory: ScriptDirectory

        var adminPort: Int { self.proxy.adminPort! }
        var config: ProxyConfig { self.proxy.server.runtime.config }

        func server(_ id: String) -> RoomServer { self.servers.first { $0.id == id }! }

        /// Reloads with the pool's backends replaced by `ids` (room servers of this setup).
        func reload(backends ids: [String]) async throws {
            var config = self.config
            config.pools[0].backends = ids.map { BackendConfig(id: $0, host: "127.0.0.1", port: self.server($0).port) }
            let result = await self.proxy.server.reload(config)
            if case .failure(let error) = result { throw error }
        }

        // MARK: Requests

        /// The backend that served a plain request for the room (the room server names itself in `X-Backend`).
        func backend(ofRoom room: String) async throws -> String {
            let connection = try await RawHTTPConnection.connect(port: self.proxy.port)
            defer { Task { await connection.close() } }
            let response = try await connection.request("GET", "/rooms/\(room)", headers: [("Connection", "close")])
            try #require(response.status == 200, "GET /rooms/\(room): \(response.status) \(response.bodyText)")
            return try #require(response.header("x-backend"))
        }

        func join(_ room: String) async throws -> (WebSocketClient, String) {
            let client = try await WebSocketClient.connect(
                host: "127.0.0.1", port: self.proxy.port, path: "/rooms/\(room)/ws", group: OwnershipEndToEndTests.group)
            do {
                let joined = try await LuaRoutingEndToEndTests.joined(client)
                #expect(joined.room == room)
                return (client, joined.backend)
            } catch {
                await client.close()
                throw error
            }
        }

        // MARK: Admin

        func admin(_ method: String, _ target: String) async throws -> (status: Int, json: [String: Any]) {
            let connection = try await RawHTTPConnection.connect(port: self.adminPort)
            defer { Task { await connection.close() } }
            var headers = [("Connection", "close")]
            if method != "GET" { headers.append(("Content-Length", "0")) }
            let response = try await connection.request(method, target, headers: headers)
            let json = (try? JSONSerialization.jsonObject(with: Data(response.body))) as? [String: Any] ?? [:]
            return (response.status, json)
        }

        /// `GET /keys/{key}`: nil on 404.
        func owner(_ key: String) async throws -> (backend: String, epoch: Int, live: Int)? {
            let (status, json) = try await self.admin("GET", "/keys/\(key)")
            if status == 404 { return nil }
            try #require(status == 200, "GET /keys/\(key): \(status)")
            return (try #require(json["backend"] as? String), try #require(json["epoch"] as? Int), try #require(json["live_here"] as? Int))
        }

        func backendsByID() async throws -> [String: [String: Any]] {
            let (status, json) = try await self.admin("GET", "/backends")
            try #require(status == 200)
            let list = try #require(json["backends"] as? [[String: Any]])
            return Dictionary(uniqueKeysWithValues: list.map { ($0["id"] as? String ?? "?", $0) })
        }
    }

    static func withSetup(
        ids: [String] = ["r1", "r2", "r3"],
        inPool: Int? = nil,
        place: String = "least-keys",
        configure: @escaping (inout ProxyConfig) -> Void = { _ in },
        _ body: (Setup) async throws -> Void
    ) async throws {
        var servers: [RoomServer] = []
        for id in ids { servers.append(try await RoomServer.start(id: id, group: Self.group)) }
        let directory = try ScriptDirectory()
        let outcome: Result<Void, Error>
        do {
            let pooled = servers.prefix(inPool ?? servers.count)
            let proxy = try await startLuaProxy(
                script: Self.script(place: place), directory: directory, backends: pooled.map { ($0.id, $0.port) },
                group: Self.group,
                configure: { config in
                    config.admin = AdminConfig(address: "127.0.0.1", port: 0)
                    configure(&config)
                })
            do {
                try await body(Setup(servers: servers, proxy: proxy, directory: directory))
                outcome = .success(())
            } catch {
                outcome = .failure(error)
            }
            await proxy.stop()
        } catch {
            outcome = .failure(error)
        }
        for server in servers { try? await server.stop() }
        directory.remove()
        try outcome.get()
    }

    /// Reads messages until the server's close frame; its code, or nil when the connection ended without one.
    static func closeCode(of client: WebSocketClient, timeout: Duration = .seconds(5)) async throws -> UInt16? {
        try await LuaSupport.withTimeout("close frame", timeout) {
            while let message = try await client.receive() {
                if case .close(let code) = message { return code }
            }
            return nil
        }
    }

    // MARK: Adding a backend

    @Test func addingABackendMovesNoExistingKeyAndNewKeysGoToIt() async throws {
        try await Self.withSetup(ids: ["r1", "r2", "r3", "r4"], inPool: 3) { setup in
            var before: [String: String] = [:]
            var epochs: [String: Int] = [:]
            for index in 0..<50 {
                before["k\(index)"] = try await setup.backend(ofRoom: "k\(index)")
                epochs["k\(index)"] = try #require(try await setup.owner("room:k\(index)")).epoch
            }
            #expect(Set(before.values) == ["r1", "r2", "r3"], "least-keys spreads keys over the pool")

            try await setup.reload(backends: ["r1", "r2", "r3", "r4"])
            for index in 0..<50 {
                let key = "k\(index)"
                #expect(try await setup.backend(ofRoom: key) == before[key], "\(key) moved")
                #expect(try await setup.owner("room:\(key)")?.epoch == epochs[key], "\(key) was placed again")
            }
            // least-keys puts new keys on the empty backend: it is in the pool and would have taken the old ones.
            var placed: [String] = []
            for index in 0..<10 { placed.append(try await setup.backend(ofRoom: "new\(index)")) }
            #expect(placed == Array(repeating: "r4", count: 10))
            #expect(setup.server("r4").roomNames().count == 10)
        }
    }

    // MARK: Owner removed

    @Test(arguments: [nil, UInt16(1001)])
    func aRemovedOwnersKeyIsPlacedAgainAndItsWebSocketClosedWithTheCode(customCode: UInt16?) async throws {
        try await Self.withSetup(configure: { config in
            if let customCode { config.ownership.closeCode = customCode }
        }) { setup in
            let (client, owner) = try await setup.join("moving")
            let first = try #require(try await setup.owner("room:moving"))
            #expect(first.backend == owner)
            #expect(first.live == 1)

            try await setup.reload(backends: ["r1", "r2", "r3"].filter { $0 != owner })
            // The owner's room server still runs: the close frame is the proxy's.
            #expect(try await Self.closeCode(of: client) == (customCode ?? 1012))
            await client.close()

            let (again, newOwner) = try await setup.join("moving")
            #expect(newOwner != owner)
            let second = try #require(try await setup.owner("room:moving"))
            #expect(second.backend == newOwner)
            #expect(second.epoch > first.epoch)
            await again.close()
        }
    }

    // MARK: Forced re-placement

    @Test func deletingAKeyClosesItsWebSocketsAndTheNextRequestPlacesItAfresh() async throws {
        try await Self.withSetup { setup in
            let (a, owner) = try await setup.join("forced")
            let (b, sameOwner) = try await setup.join("forced")
            #expect(sameOwner == owner)
            let (other, _) = try await setup.join("bystander")
            let first = try #require(try await setup.owner("room:forced"))
            #expect(first.live == 2)

            let deleted = try await setup.admin("DELETE", "/keys/room:forced")
            #expect(deleted.status == 200)
            #expect(deleted.json["released"] as? Bool == true)
            #expect(deleted.json["key"] as? String == "room:forced")
            #expect(try await Self.closeCode(of: a) == 1012)
            #expect(try await Self.closeCode(of: b) == 1012)
            #expect(try await setup.owner("room:forced") == nil)

            // Another key's socket is untouched.
            try await other.sendText("still here")
            let echoed = try await LuaSupport.withTimeout("bystander message") { try await other.receive() }
            #expect(echoed != nil)
            if case .close = echoed { Issue.record("the bystander was closed") }

            let (again, _) = try await setup.join("forced")
            let second = try #require(try await setup.owner("room:forced"))
            #expect(second.epoch > first.epoch)
            #expect(try await setup.admin("DELETE", "/keys/room:nobody").status == 404)
            for client in [a, b, other, again] { await client.close() }
        }
    }

    // MARK: Drain

    @Test func aDrainedBackendGetsNoNewKeysAndKeepsServingItsOwn() async throws {
        try await Self.withSetup { setup in
            var owners: [String: String] = [:]
            for index in 0..<6 { owners["old\(index)"] = try await setup.backend(ofRoom: "old\(index)") }
            let drained = try #require(owners["old0"])
            let kept = owners.filter { $0.value == drained }.map(\.key)

            let answer = try await setup.admin("POST", "/backends/\(drained)/drain")
            #expect(answer.status == 202)
            #expect(answer.json["draining"] as? Bool == true)
            #expect(answer.json["migrate"] as? Bool == false)

            for key in kept { #expect(try await setup.backend(ofRoom: key) == drained, "\(key) left a draining backend") }
            for index in 0..<20 {
                #expect(try await setup.backend(ofRoom: "new\(index)") != drained, "new\(index) placed on a draining backend")
            }
            let row = try #require(try await setup.backendsByID()[drained])
            #expect(row["status"] as? String == "draining")
            #expect(row["draining"] as? Bool == true)
            #expect(row["migrating"] as? Bool == false)
            #expect(row["keys"] as? Int == kept.count)
            #expect(row["drained"] as? Bool == false, "it still holds keys")
            #expect(try await setup.admin("POST", "/backends/nope/drain").status == 404)
        }
    }

    /// Without migration, existing keys end naturally (their lease runs out); the admin API then reports the backend
    /// drained, without waiting for the background sweep (every 15 s).
    @Test func aDrainedBackendIsReportedDrainedOnceItsKeysEndNaturally() async throws {
        try await Self.withSetup(configure: { $0.pools[0].idleTTL = .milliseconds(300) }) { setup in
            // The open WebSocket holds the key's lease while the drain is checked.
            let (client, drained) = try await setup.join("ending")
            #expect(try await setup.admin("POST", "/backends/\(drained)/drain").status == 202)
            let row = try #require(try await setup.backendsByID()[drained])
            #expect(row["keys"] as? Int == 1)
            #expect(row["drained"] as? Bool == false)
            await client.close()
            let done = try await WSSupport.waitUntil(timeout: .seconds(3)) {
                let row = try await setup.backendsByID()[drained] ?? [:]
                return row["keys"] as? Int == 0 && row["drained"] as? Bool == true
            }
            let after = try await setup.backendsByID()[drained] ?? [:]
            #expect(done, "after the key expired: \(after)")
            #expect(try await setup.owner("room:ending") == nil)
        }
    }

    @Test func drainWithMigrateClosesTunnelsAtTheRateAndClientsReconnectElsewhere() async throws {
        try await Self.withSetup(place: "rendezvous", configure: { $0.ownership.migrateRate = 20 }) { setup in
            // Ten rooms rendezvous hashing puts on r1: ten keys, one tunnel each.
            let rooms = Array((0..<1_000).lazy.map { "m\($0)" }
                .filter { NamedOrigins.rendezvous("room:\($0)", among: ["r1", "r2", "r3"]) == "r1" }.prefix(10))
            #expect(rooms.count == 10)
            var clients: [WebSocketClient] = []
            for room in rooms {
                let (client, backend) = try await setup.join(room)
                clients.append(client)
                #expect(backend == "r1")
            }
            #expect(try await setup.backendsByID()["r1"]?["tunnels"] as? Int == 10)

            let started = ContinuousClock.now
            let answer = try await setup.admin("POST", "/backends/r1/drain?migrate=true")
            #expect(answer.status == 202)
            #expect(answer.json["migrate"] as? Bool == true)
            let codes = try await withThrowingTaskGroup(of: UInt16?.self) { group in
                for client in clients { group.addTask { try await Self.closeCode(of: client) } }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            let elapsed = ContinuousClock.now - started
            #expect(codes == Array(repeating: UInt16(1012), count: 10))
            // Ten closes at 20 per second: the last one about 9 × 50 ms after the first.
            #expect(elapsed >= .milliseconds(400), "all ten closed within \(elapsed)")
            #expect(elapsed < .seconds(3), "migration took \(elapsed)")
            for client in clients { await client.close() }

            for room in rooms {
                let (client, backend) = try await setup.join(room)
                #expect(backend != "r1", "\(room) reconnected to the migrated backend")
                await client.close()
            }
            let done = try await WSSupport.waitUntil(timeout: .seconds(3)) {
                let row = try await setup.backendsByID()["r1"] ?? [:]
                return row["keys"] as? Int == 0 && row["tunnels"] as? Int == 0 && row["drained"] as? Bool == true
            }
            let row = try await setup.backendsByID()["r1"] ?? [:]
            #expect(done, "r1 after migration: \(row)")
            #expect(row["migrating"] as? Bool == true)
        }
    }

    @Test func anUndrainedBackendTakesNewKeysAgain() async throws {
        try await Self.withSetup { setup in
            #expect(try await setup.admin("POST", "/backends/r1/drain").status == 202)
            for index in 0..<9 {
                #expect(try await setup.backend(ofRoom: "during\(index)") != "r1", "during\(index) placed while draining")
            }
            let answer = try await setup.admin("DELETE", "/backends/r1/drain")
            #expect(answer.status == 200)
            #expect(answer.json["draining"] as? Bool == false)
            let row = try #require(try await setup.backendsByID()["r1"])
            #expect(row["status"] as? String == "healthy")
            #expect(row["draining"] as? Bool == false)
            // least-keys: r1 holds none of the nine keys placed meanwhile, so new keys go to it again.
            var placedOnR1 = 0
            for index in 0..<6 where try await setup.backend(ofRoom: "after\(index)") == "r1" { placedOnR1 += 1 }
            #expect(placedOnR1 > 0, "no new key was placed on the undrained backend")
            #expect(try await setup.admin("DELETE", "/backends/nope/drain").status == 404)
        }
    }

    @Test func undrainingStopsAMigrationUnderWay() async throws {
        try await Self.withSetup(place: "rendezvous", configure: { $0.ownership.migrateRate = 2 }) { setup in
            let rooms = Array((0..<1_000).lazy.map { "u\($0)" }
                .filter { NamedOrigins.rendezvous("room:\($0)", among: ["r1", "r2", "r3"]) == "r1" }.prefix(6))
            var clients: [WebSocketClient] = []
            for room in rooms {
                let (client, backend) = try await setup.join(room)
                clients.append(client)
                #expect(backend == "r1")
            }
            #expect(try await setup.admin("POST", "/backends/r1/drain?migrate=true").status == 202)
            // The first key moves at once; the next would follow every 500 ms.
            let first = try await WSSupport.waitUntil(timeout: .seconds(3)) {
                (try await setup.backendsByID()["r1"]?["tunnels"] as? Int ?? 0) < rooms.count
            }
            #expect(first, "the migration did not start")
            #expect(try await setup.admin("DELETE", "/backends/r1/drain").status == 200)
            let left = try await setup.backendsByID()["r1"]?["tunnels"] as? Int ?? 0
            // Three more intervals: a migration still running would have moved three more keys by now.
            try await Task.sleep(for: .milliseconds(1_500))
            let row = try #require(try await setup.backendsByID()["r1"])
            #expect(row["tunnels"] as? Int == left, "tunnels kept closing after the undrain: \(row)")
            #expect(left >= rooms.count - 2)
            #expect(row["draining"] as? Bool == false)
            #expect(row["migrating"] as? Bool == false)
            for client in clients { await client.close() }
        }
    }

    // MARK: Leases

    @Test func anOpenWebSocketHoldsTheLeasePastIdleTTLAndTheKeyExpiresAfterItCloses() async throws {
        try await Self.withSetup(configure: { $0.pools[0].idleTTL = .milliseconds(300) }) { setup in
            _ = try await setup.backend(ofRoom: "plain")
            let (client, backend) = try await setup.join("leased")
            let first = try #require(try await setup.owner("room:leased"))
            try await Task.sleep(for: .milliseconds(900))
            // A key with no live connection expired meanwhile (the TTL really is short)...
            #expect(try await setup.owner("room:plain") == nil)
            // ...and the one with an open WebSocket did not.
            let held = try #require(try await setup.owner("room:leased"), "expired while its WebSocket was open")
            #expect(held.backend == backend)
            #expect(held.epoch == first.epoch)
            #expect(held.live == 1)

            let closing = ContinuousClock.now
            await client.close()
            #expect(try await WSSupport.waitUntil(timeout: .seconds(3)) { try await setup.owner("room:leased") == nil })
            // The lease was released after `closing`, and the TTL runs from there.
            #expect(ContinuousClock.now - closing >= .milliseconds(290), "expired before the idle TTL ran out")

            let (again, _) = try await setup.join("leased")
            let second = try #require(try await setup.owner("room:leased"))
            #expect(second.epoch > first.epoch)
            await again.close()
        }
    }

    // MARK: Key and epoch headers

    @Test func keyAndEpochHeadersReachTheBackend() async throws {
        let script = """
            function route(req)
                if req.args.room then return { key = "room:" .. req.args.room, pool = "main" } end
                return { pool = "main" }
            end
            """
        try await withLuaProxy(script: script, configure: { config, _ in
            config.pools[0].keyHeader = "X-Room-Key"
            config.pools[0].epochHeader = "X-Room-Epoch"
        }) { proxy, origins in
            let connection = try await RawHTTPConnection.connect(port: proxy.port)
            defer { Task { await connection.close() } }
            // A client cannot choose its own epoch or key.
            let spoofed = [("X-Room-Epoch", "999"), ("X-Room-Key", "room:other")]
            for (index, room) in ["alpha", "beta", "alpha"].enumerated() {
                let marker = "headers-\(index)"
                let response = try await connection.request("GET", "/echo?room=\(room)", marker: marker, headers: spoofed)
                #expect(response.status == 200)
                let receiver = try #require(origins.receivers(of: marker).first)
                let request = try #require(origins.origin(receiver).requests.first {
                    $0.head.headers.first(name: NamedOrigins.markerHeader) == marker
                })
                let owner = try #require(proxy.server.runtime.directory.owner(of: "room:\(room)"))
                #expect(owner.backend == receiver)
                #expect(request.head.headers["x-room-key"] == ["room:\(room)"])
                #expect(request.head.headers["x-room-epoch"] == [String(owner.epoch)])
            }
            // A request without a key carries neither header (and the client's pass through untouched).
            let response = try await connection.request("GET", "/echo", marker: "unkeyed")
            #expect(response.status == 200)
            let receiver = try #require(origins.receivers(of: "unkeyed").first)
            let request = try #require(origins.origin(receiver).lastRequest)
            #expect(request.head.headers["x-room-key"].isEmpty)
            #expect(request.head.headers["x-room-epoch"].isEmpty)
        }
    }

    // MARK: Admin JSON

    @Test func adminBackendsAndKeysJSONShapes() async throws {
        try await Self.withSetup { setup in
            for room in ["c", "a", "b"] { _ = try await setup.backend(ofRoom: room) }
            let (client, wsBackend) = try await setup.join("a")

            let (status, json) = try await setup.admin("GET", "/backends")
            #expect(status == 200)
            let backends = try #require(json["backends"] as? [[String: Any]])
            #expect(backends.map { $0["id"] as? String } == ["r1", "r2", "r3"])
            let expectedFields: Set<String> = [
                "id", "pool", "address", "status", "healthy", "draining", "migrating", "weight", "region", "keys",
                "tunnels", "connections", "drained",
            ]
            for row in backends {
                #expect(Set(row.keys) == expectedFields)
                let id = try #require(row["id"] as? String)
                #expect(row["pool"] as? String == "main")
                #expect(row["address"] as? String == "127.0.0.1:\(setup.server(id).port)")
                #expect(row["status"] as? String == "healthy")
                #expect(row["healthy"] as? Bool == true)
                #expect(row["draining"] as? Bool == false)
                #expect(row["drained"] as? Bool == false)
                #expect(row["weight"] as? Int == 1)
                #expect(row["region"] is NSNull)
                #expect(row["tunnels"] as? Int == (id == wsBackend ? 1 : 0))
                #expect(row["connections"] as? Int == (id == wsBackend ? 1 : 0), "an open WebSocket is a connection")
            }
            #expect(backends.compactMap { $0["keys"] as? Int }.reduce(0, +) == 3)

            let listed = try await setup.admin("GET", "/keys?prefix=room:&limit=2")
            #expect(listed.status == 200)
            let keys = try #require(listed.json["keys"] as? [[String: Any]])
            #expect(keys.map { $0["key"] as? String } == ["room:a", "room:b"])
            for row in keys {
                #expect(Set(row.keys) == ["key", "pool", "backend", "epoch", "since_seconds_ago", "live_here"])
                #expect(row["pool"] as? String == "main")
                #expect((row["since_seconds_ago"] as? Double ?? -1) >= 0)
            }
            #expect(keys[0]["live_here"] as? Int == 1)
            #expect(keys[0]["backend"] as? String == wsBackend)
            #expect(keys[1]["live_here"] as? Int == 0)
            #expect(try await setup.admin("GET", "/keys?prefix=nothing:").json["keys"] as? [Any] != nil)
            #expect((try await setup.admin("GET", "/keys?prefix=nothing:").json["keys"] as? [Any])?.isEmpty == true)
            #expect((try await setup.admin("GET", "/keys").json["keys"] as? [Any])?.count == 3)

            let one = try await setup.admin("GET", "/keys/room:c")
            #expect(one.status == 200)
            #expect(one.json["key"] as? String == "room:c")
            #expect(try await setup.admin("GET", "/keys/room:zzz").status == 404)
            await client.close()
        }
    }
}
