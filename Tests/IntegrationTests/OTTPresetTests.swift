import DemoBackends
import Foundation
import Logging
import NIOCore
import NIOPosix
import ProxyCore
import Testing

/// The OTT preset end to end: the real proxy, configured from `examples/ott.yaml` (so with the repo's
/// `routing-scripts/ott.lua`), in front of three `OTTBackend`s that share one `OTTSharedStore`.
///
/// Every backend names itself in each answer (`served_by`, `X-OTT-Backend`) and each WebSocket message, and the store
/// knows which backends hold which rooms, so "one room, one server" is checked directly.
@Suite(.serialized) struct OTTPresetTests {
    private static let group = MultiThreadedEventLoopGroup.singleton
    private static let repository = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    private static let scriptPath = repository.appendingPathComponent("routing-scripts/ott.lua").standardizedFileURL.path
    private static let examplePath = repository.appendingPathComponent("examples/ott.yaml").path
    private static let apiKey = "test-apikey"
    private static let backendIDs = ["ott-1", "ott-2", "ott-3"]

    // MARK: Cluster

    private enum SetupError: Error { case optionsNotAMap }

    private struct Cluster {
        let store: OTTSharedStore
        let backends: [OTTBackend]
        let proxy: ProxyServer
        let port: Int
        let adminPort: Int

        func backend(_ id: String) -> OTTBackend {
            self.backends.first { $0.id == id }!
        }
    }

    /// Three backends and the proxy with the example configuration (ports, admin and logging adjusted for a test;
    /// `options` added to the script's options), torn down afterwards.
    private func withCluster(
        options: [String: ConfigValue] = [:], _ body: (Cluster) async throws -> Void
    ) async throws {
        let store = OTTSharedStore()
        var backends: [OTTBackend] = []
        do {
            for id in Self.backendIDs {
                backends.append(try await OTTBackend.start(id: id, apiKey: Self.apiKey, store: store, group: Self.group))
            }
            var config = try ConfigLoader.load(path: Self.examplePath)
            var routing = try #require(config.listeners.first?.routing)
            #expect(URL(fileURLWithPath: routing.script).standardizedFileURL.path == Self.scriptPath)
            guard case .map(var merged) = routing.options else { throw SetupError.optionsNotAMap }
            merged.merge(options) { _, new in new }
            routing.options = .map(merged)
            config.listeners[0].routing = routing
            config.listeners[0].address = "127.0.0.1"
            config.listeners[0].port = 0
            #expect(config.pools.count == 1 && config.pools[0].backends.map(\.id) == Self.backendIDs)
            config.pools[0].backends = backends.map { BackendConfig(id: $0.id, host: "127.0.0.1", port: $0.port) }
            config.admin = AdminConfig(address: "127.0.0.1", port: 0)
            config.logging = LoggingConfig(level: .critical, format: .logfmt, accessLog: false)
            config.timeouts.shutdownGrace = .seconds(1)
            var logger = Logger(label: "ott-preset-test")
            logger.logLevel = .critical
            let proxy = try ProxyServer(
                config: config, logger: logger, accessLogger: logger, group: Self.group, policyFactory: LuaSupport.factory())
            try await proxy.start()
            let cluster = Cluster(
                store: store, backends: backends, proxy: proxy,
                port: try #require(proxy.listenerPorts[config.listeners[0].name]), adminPort: try #require(proxy.adminPort))
            do {
                try await body(cluster)
            } catch {
                await proxy.shutdown()
                throw error
            }
            await proxy.shutdown()
        } catch {
            for backend in backends { await backend.kill() }
            throw error
        }
        for backend in backends { try? await backend.stop() }
    }

    // MARK: HTTP

    private struct Reply: Sendable {
        var status: Int
        var header: String?
        var text: String

        var object: [String: Any] { (try? JSONSerialization.jsonObject(with: Data(self.text.utf8))) as? [String: Any] ?? [:] }
        var array: [[String: Any]] { (try? JSONSerialization.jsonObject(with: Data(self.text.utf8))) as? [[String: Any]] ?? [] }
        /// The backend that answered, by the JSON `served_by` when it agrees with the `X-OTT-Backend` header.
        var servedBy: String? {
            let body = self.object["served_by"] as? String
            return body == nil || body == self.header ? self.header : "mismatch(\(body!) vs \(self.header ?? "-"))"
        }
    }

    private static func send(
        _ connection: RawHTTPConnection, _ method: String, _ path: String, headers: [(String, String)] = [],
        json: String? = nil
    ) async throws -> Reply {
        var all = headers
        if json != nil { all.append(("Content-Type", "application/json")) }
        let response = try await connection.request(method, path, headers: all, body: json)
        return Reply(status: response.status, header: response.header("x-ott-backend"), text: response.bodyText)
    }

    /// One request on its own connection.
    private static func call(
        port: Int, _ method: String, _ path: String, headers: [(String, String)] = [], json: String? = nil
    ) async throws -> Reply {
        let connection = try await RawHTTPConnection.connect(port: port)
        defer { Task { await connection.close() } }
        return try await self.send(connection, method, path, headers: headers + [("Connection", "close")], json: json)
    }

    private static func admin(_ cluster: Cluster, _ method: String, _ path: String) async throws -> Reply {
        try await self.call(port: cluster.adminPort, method, path)
    }

    /// The backend the proxy's directory names as the key's owner (nil: nobody owns it).
    private static func owner(of key: String, _ cluster: Cluster) async throws -> String? {
        let reply = try await self.admin(cluster, "GET", "/keys/\(key)")
        return reply.status == 200 ? reply.object["backend"] as? String : nil
    }

    /// `items` handled by `workers` concurrent tasks, each with one keep-alive connection to the proxy.
    private static func concurrently<T: Sendable>(
        _ items: [String], workers: Int = 20, port: Int,
        _ work: @escaping @Sendable (RawHTTPConnection, String) async throws -> T
    ) async throws -> [String: T] {
        try await withThrowingTaskGroup(of: [(String, T)].self) { group in
            for worker in 0..<min(workers, items.count) {
                let mine = stride(from: worker, to: items.count, by: workers).map { items[$0] }
                group.addTask {
                    let connection = try await RawHTTPConnection.connect(port: port)
                    var results: [(String, T)] = []
                    do {
                        for item in mine { results.append((item, try await work(connection, item))) }
                    } catch {
                        await connection.close()
                        throw error
                    }
                    await connection.close()
                    return results
                }
            }
            var all: [String: T] = [:]
            for try await results in group {
                for (item, result) in results { all[item] = result }
            }
            return all
        }
    }

    private static func createJSON(_ name: String, visibility: String = "public") -> String {
        #"{"name":"\#(name)","title":"t","visibility":"\#(visibility)","isTemporary":true}"#
    }

    private static func bearer(_ token: String) -> [(String, String)] {
        [("Authorization", "Bearer \(token)")]
    }

    private static let voteJSON = #"{"service":"youtube","id":"dQw4w9WgXcQ"}"#

    /// The name with each letter's case chosen at random, different from `name` itself.
    private static func randomCasing(_ name: String) -> String {
        guard name.contains(where: \.isLetter) else { return name }
        while true {
            let cased = String(name.flatMap { Bool.random() ? $0.uppercased() : $0.lowercased() })
            if cased != name { return cased }
        }
    }

    // MARK: WebSocket

    private struct Joined: Sendable {
        var client: WebSocketClient
        /// `served_by` of `sync` and of `you`.
        var syncServedBy: String?
        var youServedBy: String?
        var syncRoom: String?
    }

    private static func nextJSON(_ client: WebSocketClient) async throws -> [String: Any] {
        let message = try await WSSupport.withTimeout(.seconds(5), "WebSocket message") { try await client.receive() }
        guard case .text(let text) = message else {
            Issue.record("expected a text message, got \(String(describing: message))")
            return [:]
        }
        return (try JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
    }

    /// Opens `/api/room/{path}` through the proxy, authenticates and reads `sync` and `you`.
    private static func join(_ cluster: Cluster, _ path: String, token: String) async throws -> Joined {
        let client = try await WebSocketClient.connect(
            host: "127.0.0.1", port: cluster.port, path: "/api/room/\(path)", group: Self.group)
        try await client.sendText(#"{"action":"auth","token":"\#(token)"}"#)
        let sync = try await self.nextJSON(client)
        #expect(sync["action"] as? String == "sync", "joining \(path)")
        let you = try await self.nextJSON(client)
        #expect(you["action"] as? String == "you", "joining \(path)")
        return Joined(
            client: client, syncServedBy: sync["served_by"] as? String, youServedBy: you["served_by"] as? String,
            syncRoom: sync["room"] as? String)
    }

    private static func grant(_ connection: RawHTTPConnection) async throws -> String {
        let reply = try await self.send(connection, "GET", "/api/auth/grant")
        return try #require(reply.object["token"] as? String, "grant: \(reply.status) \(reply.text)")
    }

    // MARK: Tests

    /// What one room saw: every backend that answered for it, and every status.
    private struct RoomTrace: Sendable {
        var servedBy: [String?] = []
        var statuses: [String: Int] = [:]
        var syncRoom: String?
    }

    @Test func twoHundredRoomsEachLiveOnExactlyOneBackend() async throws {
        try await self.withCluster { cluster in
            let suffixes = ["alpha", "Beta", "GAMMA", "delta"]
            let names = (0..<200).map { "Room-\($0)-\(suffixes[$0 % suffixes.count])" }

            let creators = try await Self.concurrently(names, port: cluster.port) { connection, name in
                let reply = try await Self.send(connection, "POST", "/api/room/create", json: Self.createJSON(name))
                return reply.status == 201 ? reply.servedBy : "status \(reply.status)"
            }

            let traces = try await Self.concurrently(names, port: cluster.port) { connection, name in
                var trace = RoomTrace()
                let token = try await Self.grant(connection)
                let joined = try await Self.join(cluster, Self.randomCasing(name), token: token)
                trace.servedBy += [joined.syncServedBy, joined.youServedBy]
                trace.syncRoom = joined.syncRoom
                let room = try await Self.send(connection, "GET", "/api/room/\(Self.randomCasing(name))")
                let queued = try await Self.send(
                    connection, "POST", "/api/room/\(Self.randomCasing(name))/queue", json: #"{"service":"youtube","id":"\#(name)"}"#)
                let vote = try await Self.send(
                    connection, "POST", "/api/room/\(Self.randomCasing(name))/vote", headers: Self.bearer(token),
                    json: Self.voteJSON)
                trace.servedBy += [room.servedBy, queued.servedBy, vote.servedBy]
                trace.statuses = ["get": room.status, "queue": queued.status, "vote": vote.status]
                await joined.client.close()
                return trace
            }

            #expect(creators.count == 200 && traces.count == 200)
            for name in names {
                let creator = creators[name] ?? nil
                let trace = traces[name] ?? RoomTrace()
                #expect(Self.backendIDs.contains(creator ?? "-"), "\(name) created by \(String(describing: creator))")
                #expect(trace.statuses == ["get": 200, "queue": 200, "vote": 200], "\(name)")
                #expect(trace.syncRoom == name)
                #expect(trace.servedBy.allSatisfy { $0 == creator }, "\(name): created on \(creator ?? "-"), then \(trace.servedBy)")
                #expect(cluster.store.backends(holding: name) == [creator].compactMap { $0 }, "\(name)")
            }
            #expect(cluster.store.duplicates().isEmpty)
            #expect(cluster.backends.map(\.totalLoads).reduce(0, +) == 200)  // nothing was ever loaded twice
            let perBackend = cluster.backends.map { $0.loadedRooms().count }
            // Least-keys placement: every backend gets its share.
            #expect(perBackend.allSatisfy { $0 >= 50 }, "rooms per backend: \(perBackend)")
            #expect(perBackend.reduce(0, +) == 200)
        }
    }

    @Test func createdAndGeneratedRoomsAreJoinedOnTheBackendThatMadeThem() async throws {
        try await self.withCluster { cluster in
            let connection = try await RawHTTPConnection.connect(port: cluster.port)
            defer { Task { await connection.close() } }
            let token = try await Self.grant(connection)

            let created = try await Self.send(connection, "POST", "/api/room/create", json: Self.createJSON("Made-Here"))
            #expect(created.status == 201)
            let creator = try #require(created.servedBy)
            #expect(try await Self.owner(of: "made-here", cluster) == creator)
            let joined = try await Self.join(cluster, "mADE-hERE", token: token)
            #expect(joined.syncServedBy == creator && joined.youServedBy == creator)
            #expect(try await Self.send(connection, "POST", "/api/room/MADE-HERE/vote", headers: Self.bearer(token),
                                        json: Self.voteJSON).status == 200)
            await joined.client.close()

            var generators: Set<String> = []
            for _ in 0..<6 {
                let generated = try await Self.send(connection, "POST", "/api/room/generate", json: "{}")
                #expect(generated.status == 201)
                let name = try #require(generated.object["room"] as? String)
                let generator = try #require(generated.servedBy)
                generators.insert(generator)
                // Claimed from the 201 answer, before anyone joins.
                #expect(try await Self.owner(of: name, cluster) == generator, "\(name)")
                let member = try await Self.join(cluster, name.uppercased(), token: token)
                #expect(member.syncServedBy == generator, "\(name)")
                #expect(member.syncRoom == name)
                let vote = try await Self.send(connection, "POST", "/api/room/\(name)/vote", headers: Self.bearer(token),
                                               json: Self.voteJSON)
                #expect(vote.status == 200 && vote.servedBy == generator, "\(name): \(vote.status) from \(vote.servedBy ?? "-")")
                await member.client.close()
            }
            #expect(generators.count > 1, "generate is room-less: any backend may make the room")
            #expect(cluster.store.duplicates().isEmpty)
            #expect(cluster.backends.map(\.totalLoads).reduce(0, +) == 7)
        }
    }

    @Test func listMergesEveryBackendsRoomsAndSurvivesABackendGoingDown() async throws {
        try await self.withCluster { cluster in
            let connection = try await RawHTTPConnection.connect(port: cluster.port)
            defer { Task { await connection.close() } }
            var owners: [String: String] = [:]
            for (name, visibility) in [("Alpha", "public"), ("beta", "public"), ("Gamma", "public"), ("delta", "public"),
                                       ("Epsilon", "public"), ("zeta", "public"), ("Hidden", "unlisted")] {
                let reply = try await Self.send(connection, "POST", "/api/room/create",
                                                json: Self.createJSON(name, visibility: visibility))
                #expect(reply.status == 201, "\(name)")
                owners[name] = reply.servedBy
            }
            #expect(Set(owners.values).count == 3, "least-keys spreads the rooms: \(owners)")
            // A duplicate (as after a misrouting): Gamma is also loaded, directly, on a backend that does not own it.
            let gammaOwner = try #require(owners["Gamma"])
            let other = try #require(Self.backendIDs.first { $0 != gammaOwner })
            #expect(try await Self.call(port: cluster.backend(other).port, "GET", "/api/room/Gamma").status == 200)
            #expect(cluster.store.duplicates() == ["gamma": [gammaOwner, other].sorted()])

            var clients: [WebSocketClient] = []
            for (room, count) in [("zeta", 2), ("BETA", 1), ("hidden", 3)] {
                for _ in 0..<count {
                    clients.append(try await Self.join(cluster, room, token: try await Self.grant(connection)).client)
                }
            }

            let list = try await Self.send(connection, "GET", "/api/room/list")
            #expect(list.status == 200)
            #expect(list.array.map { $0["name"] as? String } == ["zeta", "beta", "Alpha", "delta", "Epsilon", "Gamma"])
            #expect(list.array.map { $0["users"] as? Int } == [2, 1, 0, 0, 0, 0])
            #expect(Set(list.array.compactMap { $0["served_by"] as? String }) == Set(Self.backendIDs))

            let admin = try await Self.send(connection, "GET", "/api/room/list", headers: [("apikey", Self.apiKey)])
            #expect(admin.status == 200)
            #expect(admin.array.map { $0["name"] as? String } == ["Hidden", "zeta", "beta", "Alpha", "delta", "Epsilon", "Gamma"])
            #expect(admin.array.first?["visibility"] as? String == "unlisted")
            let wrong = try await Self.send(connection, "GET", "/api/room/list", headers: [("apikey", "wrong")])
            #expect(wrong.status == 400)

            // The backend with zeta dies; the others' rooms are still listed.
            let dead = try #require(owners["zeta"])
            await cluster.backend(dead).kill()
            let survivors = cluster.backends.filter { $0.id != dead }
            let expected = Set(survivors.flatMap { backend in
                backend.loadedRooms().filter { $0 != "Hidden" }
            })
            #expect(!expected.isEmpty && !expected.contains("zeta"))
            let after = try await Self.call(port: cluster.port, "GET", "/api/room/list")
            #expect(after.status == 200)
            let names = after.array.compactMap { $0["name"] as? String }
            #expect(names.count == expected.count && Set(names) == expected, "\(names) after \(dead) died")
            let listed: [(users: Int, name: String)] = after.array.map { item in
                (item["users"] as? Int ?? -1, (item["name"] as? String ?? "").lowercased())
            }
            let sorted = listed.sorted { a, b in a.users != b.users ? a.users > b.users : a.name < b.name }
            #expect(listed.map(\.name) == sorted.map(\.name) && listed.map(\.users) == sorted.map(\.users))
            #expect(!after.array.contains { $0["served_by"] as? String == dead })
            for client in clients { await client.close() }
        }
    }

    @Test func roomlessPathsGoToAnyBackend() async throws {
        try await self.withCluster { cluster in
            let connection = try await RawHTTPConnection.connect(port: cluster.port)
            defer { Task { await connection.close() } }
            var servers: [String: Set<String>] = [:]
            for _ in 0..<3 {
                for path in ["/", "/room/abc", "/api/user", "/api/status"] {
                    let reply = try await Self.send(connection, "GET", path)
                    #expect(reply.status == 200, "\(path)")
                    servers[path, default: []].insert(reply.servedBy ?? "-")
                }
            }
            let all = servers.values.reduce(into: Set<String>()) { $0.formUnion($1) }
            #expect(all.isSubset(of: Set(Self.backendIDs)), "\(servers)")
            #expect(all.count > 1, "room-less requests all went to \(all)")
            // None of them named a room.
            let keys = try await Self.admin(cluster, "GET", "/keys")
            #expect(keys.status == 200)
            #expect((keys.object["keys"] as? [Any])?.isEmpty == true, "\(keys.text)")
            #expect(try await Self.owner(of: "abc", cluster) == nil)
        }
    }

    /// The preset has an `on_response` (for generated rooms), which reads only response heads for everything but
    /// `generate`: pages and room requests stay on the fast path (docs/architecture.md, "Fast path"); a room
    /// creation (a body) moves its connection to the full path, once.
    @Test func pagesAndRoomRequestsStayOnTheFastPath() async throws {
        try await self.withCluster { cluster in
            func handoffs() async throws -> Double {
                let metrics = try await Self.admin(cluster, "GET", "/metrics")
                let line = try #require(metrics.text.split(separator: "\n").first { $0.hasPrefix("ott_proxy_fast_path_handoffs_total") })
                return try #require(line.split(separator: " ").last.flatMap { Double($0) })
            }
            let connection = try await RawHTTPConnection.connect(port: cluster.port)
            defer { Task { await connection.close() } }
            for path in ["/", "/api/status", "/api/room/fastroom", "/room/fastroom", "/api/room/fastroom"] {
                let reply = try await Self.send(connection, "GET", path)
                #expect(reply.status < 500, "\(path): \(reply.status)")
            }
            #expect(try await handoffs() == 0)
            // Room requests between pages: the connection does not move to the HTTP relay only to come back (it moves
            // after two relayable exchanges in a row).
            #expect(cluster.proxy.httpRelayCounts.moved == 0)
            let created = try await Self.send(
                connection, "POST", "/api/room/create", json: #"{"name":"fastcreated","isTemporary":true}"#)
            #expect(created.status == 201 || created.status == 200, "\(created.status) \(created.text)")
            #expect(try await handoffs() == 1)
            // The room is then served by the one backend that created it, on the same (now full-path) connection.
            let joined = try await Self.send(connection, "GET", "/api/room/fastcreated")
            #expect(joined.status == 200)
            #expect(joined.servedBy == created.servedBy)

            // Room requests in a row on another connection: it moves to the HTTP relay after the second, which
            // serves the rest (the preset's `on_response` sees their heads there).
            let api = try await RawHTTPConnection.connect(port: cluster.port)
            defer { Task { await api.close() } }
            var servedBy: Set<String> = []
            for _ in 0..<5 {
                let reply = try await Self.send(api, "GET", "/api/room/fastcreated")
                #expect(reply.status == 200)
                servedBy.insert(reply.servedBy ?? "?")
            }
            #expect(servedBy == [created.servedBy ?? ""])
            #expect(cluster.proxy.httpRelayCounts.moved == 1)
            #expect(cluster.proxy.httpRelayCounts.requests == 3)
        }
    }

    @Test func theProbeAdoptsRoomsLoadedBehindItsBackAndReportsDuplicatesWithoutUnloading() async throws {
        try await self.withCluster(options: ["apikey": .string(Self.apiKey), "probe_interval": .double(0.2)]) { cluster in
            // Rooms loaded directly on backends, as before a proxy restart: created on ott-1, and on ott-3 a permanent
            // room loaded from the store by a GET.
            #expect(try await Self.call(port: cluster.backend("ott-1").port, "POST", "/api/room/create",
                                        json: Self.createJSON("Direct-One", visibility: "private")).status == 201)
            cluster.store.putRoom(.init(name: "Stored-Three", isTemporary: false))
            #expect(try await Self.call(port: cluster.backend("ott-3").port, "GET", "/api/room/stored-three").status == 200)
            let adopted = await WSSupport.waitUntil(timeout: .seconds(2)) {
                let one = try? await Self.owner(of: "direct-one", cluster)
                let three = try? await Self.owner(of: "stored-three", cluster)
                return one == "ott-1" && three == "ott-3"
            }
            let owners = [try await Self.owner(of: "direct-one", cluster), try await Self.owner(of: "stored-three", cluster)]
            #expect(adopted, "owners: \(owners)")

            let connection = try await RawHTTPConnection.connect(port: cluster.port)
            defer { Task { await connection.close() } }
            for (path, owner) in [("dIRECT-oNE", "ott-1"), ("STORED-three", "ott-3")] {
                let token = try await Self.grant(connection)
                let joined = try await Self.join(cluster, path, token: token)
                #expect(joined.syncServedBy == owner, "\(path)")
                #expect(try await Self.send(connection, "POST", "/api/room/\(path)/vote", headers: Self.bearer(token),
                                            json: Self.voteJSON).status == 200)
                await joined.client.close()
            }
            #expect(cluster.store.duplicates().isEmpty)

            // One room loaded on two backends directly: reported, and left alone.
            #expect(try await Self.call(port: cluster.backend("ott-1").port, "POST", "/api/room/create",
                                        json: Self.createJSON("Twice")).status == 201)
            #expect(try await Self.call(port: cluster.backend("ott-2").port, "GET", "/api/room/Twice").status == 200)
            var report: [String: Any] = [:]
            let reported = await WSSupport.waitUntil(timeout: .seconds(2)) {
                let reply = try? await Self.admin(cluster, "GET", "/reconciliation")
                let listeners = reply?.object["listeners"] as? [String: Any]
                report = listeners?.values.first as? [String: Any] ?? [:]
                let duplicates = report["duplicates"] as? [[String: Any]] ?? []
                return duplicates.contains { $0["key"] as? String == "twice" && $0["holders"] as? [String] == ["ott-1", "ott-2"] }
            }
            #expect(reported, "report: \(report)")
            try await Task.sleep(for: .milliseconds(600))  // a few more probe passes
            #expect(cluster.store.duplicates() == ["twice": ["ott-1", "ott-2"]])
            #expect(cluster.backend("ott-1").loadedRooms().contains("Twice"))
            #expect(cluster.backend("ott-2").loadedRooms().contains("Twice"))
            #expect(cluster.store.roomNames().contains("Twice"))  // nobody deleted its saved state
        }
    }

    @Test func drainWithMigrationClosesWith1012AndTheReconnectLandsElsewhere() async throws {
        try await self.withCluster { cluster in
            let connection = try await RawHTTPConnection.connect(port: cluster.port)
            defer { Task { await connection.close() } }
            let created = try await Self.send(connection, "POST", "/api/room/create", json: Self.createJSON("Moving"))
            #expect(created.status == 201)
            let from = try #require(created.servedBy)
            let bystander = try await Self.send(connection, "POST", "/api/room/create", json: Self.createJSON("Staying"))
            let bystanderHome = try #require(bystander.servedBy)
            #expect(bystanderHome != from, "least-keys puts the second room elsewhere")

            let token = try await Self.grant(connection)
            let mover = try await Self.join(cluster, "Moving", token: token)
            #expect(mover.syncServedBy == from)
            let stayer = try await Self.join(cluster, "staying", token: try await Self.grant(connection))
            #expect(stayer.syncServedBy == bystanderHome)

            let drain = try await Self.admin(cluster, "POST", "/backends/\(from)/drain?migrate=true")
            #expect(drain.status == 202)
            let closed = try await WSSupport.withTimeout(.seconds(5), "the close frame") { try await mover.client.receive() }
            #expect(closed == .close(code: 1012))
            if case .close(let code?) = closed { #expect(code < 4000) }

            // The client reconnects (OTT's client keeps the URL it had) and lands on a live backend, which loads the
            // room from the shared store.
            let again = try await Self.join(cluster, "Moving", token: token)
            let to = try #require(again.syncServedBy)
            #expect(to != from)
            #expect(again.syncRoom == "Moving")
            #expect(cluster.backend(to).loadCount(of: "moving") == 1)
            #expect(try await Self.owner(of: "moving", cluster) == to)
            #expect(try await Self.send(connection, "POST", "/api/room/moving/vote", headers: Self.bearer(token),
                                        json: Self.voteJSON).status == 200)
            // The old server still has the room in memory until its own unload; OTT drops it once it is empty.
            #expect(cluster.backend(from).users(in: "moving") == 0)
            #expect(cluster.backend(from).unloadIdle() == ["Moving"])
            #expect(cluster.store.duplicates().isEmpty)

            // The room on another backend was not touched: its client is still connected and served there.
            try await stayer.client.sendText(#"{"action":"req","request":{"type":"chat","text":"still here"}}"#)
            let event = try await Self.nextJSON(stayer.client)
            #expect(event["action"] as? String == "event" && event["served_by"] as? String == bystanderHome)
            #expect(try await Self.owner(of: "staying", cluster) == bystanderHome)
            await again.client.close()
            await stayer.client.close()
        }
    }
}
