import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// A test server that behaves like an OpenTogetherTube monolith for routing purposes (see
/// `shared/reference/ott-routing.md` §2-3): rooms load lazily into this server's memory on a WebSocket `auth`, on
/// `GET`/`PATCH` of the room and on queue calls; `create`/`generate` create and load here; `list` shows only this
/// server's rooms; `vote`/`undo` need the caller's WebSocket on this same server; OTT's close codes; idle rooms unload
/// after `unloadAfter`. Shared state (room snapshots, tokens, the load epoch) lives in an `OTTSharedStore` given to
/// every backend of a test.
///
/// Every JSON response carries `"served_by": id` (in each item for the list) and every response the header
/// `X-OTT-Backend: id`; every WebSocket message carries `"served_by"`.
///
/// Simplifications: tokens are only checked where routing depends on them (the WebSocket `auth`, `vote`, `undo`);
/// snapshots are written through at once (OTT debounces 5 s); a keepalive unload keeps the snapshot (as for a
/// permanent room), while an admin `DELETE` deletes it as OTT does.
public final class OTTBackend: Sendable {
    public let id: String
    /// The bound port.
    public let port: Int
    public let store: OTTSharedStore

    private let serverChannel: any Channel
    private let state: OTTBackendState
    private let keepalive: RepeatedTask

    private init(id: String, port: Int, store: OTTSharedStore, serverChannel: any Channel, state: OTTBackendState,
                 keepalive: RepeatedTask) {
        self.id = id
        self.port = port
        self.store = store
        self.serverChannel = serverChannel
        self.state = state
        self.keepalive = keepalive
    }

    /// - Parameters:
    ///   - apiKey: the admin `apikey` (list with non-public rooms, admin unload).
    ///   - baseURL: OTT's `base_url`, e.g. `/ott`; everything is served below it.
    ///   - unloadAfter: OTT's `room.unload_after`: how long a room with no users stays loaded.
    ///   - store: shared by all backends of one test.
    public static func start(
        id: String,
        apiKey: String = "test-apikey",
        baseURL: String = "",
        unloadAfter: Duration = .seconds(300),
        store: OTTSharedStore = OTTSharedStore(),
        host: String = "127.0.0.1",
        port: Int = 0,
        group: any EventLoopGroup
    ) async throws -> OTTBackend {
        var base = baseURL
        while base.hasSuffix("/") { base.removeLast() }
        let config = OTTBackendConfig(id: id, apiKey: apiKey, baseURL: base, unloadAfter: TimeAmount(unloadAfter))
        let state = OTTBackendState(config: config, store: store)
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                state.connectionAccepted(channel)
                return channel.eventLoop.makeCompletedFuture {
                    try OTTPipeline.configure(channel: channel, state: state)
                }
            }
            .bind(host: host, port: port)
            .get()
        // OTT's room manager ticks every second; tests use short `unloadAfter`s, so tick proportionally faster.
        let tick = TimeAmount.nanoseconds(min(max(config.unloadAfter.nanoseconds / 10, 5_000_000), 1_000_000_000))
        let keepalive = group.next().scheduleRepeatedTask(initialDelay: tick, delay: tick) { _ in
            state.unloadStaleRooms(force: false)
        }
        return OTTBackend(id: id, port: channel.localAddress?.port ?? port, store: store, serverChannel: channel,
                          state: state, keepalive: keepalive)
    }

    /// Canonical names of the rooms loaded in this server's memory, sorted.
    public func loadedRooms() -> [String] {
        self.state.loadedRooms()
    }

    /// How many times the room (any casing) was loaded into this server's memory. A room also loaded elsewhere is a
    /// duplicate; see also `OTTSharedStore.duplicates()`.
    public func loadCount(of name: String) -> Int {
        self.state.loadCount(of: name)
    }

    /// Loads of all rooms on this server so far.
    public var totalLoads: Int { self.state.totalLoads }

    /// WebSocket clients in the room on this server (0 when not loaded here).
    public func users(in name: String) -> Int {
        self.state.users(in: name)
    }

    /// HTTP requests (WebSocket upgrades included) handled so far.
    public var requestCount: Int { self.state.requestCount }

    /// Test hook: runs the keepalive check now as if every idle room's `unloadAfter` had passed, unloading every
    /// loaded room without users (rooms with users are never unloaded by keepalive, as in OTT since PR #2048).
    /// Returns the unloaded rooms' canonical names.
    @discardableResult
    public func unloadIdle() -> [String] {
        self.state.unloadStaleRooms(force: true)
    }

    /// Graceful shutdown: stops listening, unloads every room (clients get close 1001, snapshots kept) and closes
    /// every connection.
    public func stop() async throws {
        self.keepalive.cancel()
        do {
            try await self.serverChannel.close()
        } catch ChannelError.alreadyClosed {
            // Stopping twice is harmless.
        }
        self.state.unloadAll(code: OTTCloseCode.away)
        await self.closeConnections()
    }

    /// A crash: stops listening and drops every connection without a close frame (clients see 1006).
    public func kill() async {
        self.keepalive.cancel()
        try? await self.serverChannel.close()
        self.state.forgetAllRooms()
        await self.closeConnections()
    }

    private func closeConnections() async {
        let connections = self.state.openConnections()
        for connection in connections {
            connection.close(promise: nil)
        }
        for connection in connections {
            try? await connection.closeFuture.get()
        }
    }
}

struct OTTBackendConfig: Sendable {
    let id: String
    let apiKey: String
    /// Without a trailing slash; empty for none.
    let baseURL: String
    let unloadAfter: TimeAmount
}

/// Sent down a WebSocket's pipeline to make its handler close with `code` (after its room was unloaded).
struct OTTKick: Sendable {
    let code: UInt16
    /// Close the TCP connection once the close frame is written instead of waiting for the peer's reply.
    let immediate: Bool
}

/// Everything the per-connection handlers of one `OTTBackend` share: its loaded rooms and connections.
final class OTTBackendState: Sendable {
    struct Client {
        let channel: any Channel
        let token: String
        let clientID: String
    }

    struct LoadedRoom {
        var snapshot: OTTSharedStore.RoomSnapshot
        let loadEpoch: Int
        var clients: [ObjectIdentifier: Client] = [:]
        /// When the room last became empty (or was loaded without a user); nil while it has users.
        var idleSince: NIODeadline?
    }

    /// A loaded room as handlers see it.
    struct RoomView {
        var snapshot: OTTSharedStore.RoomSnapshot
        var loadEpoch: Int
        var clientIDs: [String]
        var users: Int { self.clientIDs.count }
    }

    private struct State {
        /// Keyed by lower-cased name: OTT matches loaded rooms case-insensitively.
        var rooms: [String: LoadedRoom] = [:]
        var loadCounts: [String: Int] = [:]
        var requestCount = 0
        var nextClientNumber = 0
        var openConnections: [ObjectIdentifier: any Channel] = [:]
    }

    let config: OTTBackendConfig
    let store: OTTSharedStore
    private let state = NIOLockedValueBox(State())

    init(config: OTTBackendConfig, store: OTTSharedStore) {
        self.config = config
        self.store = store
    }

    var id: String { self.config.id }

    // MARK: Connections and counters

    func connectionAccepted(_ channel: any Channel) {
        self.state.withLockedValue { $0.openConnections[ObjectIdentifier(channel)] = channel }
        channel.closeFuture.whenComplete { _ in
            self.state.withLockedValue { _ = $0.openConnections.removeValue(forKey: ObjectIdentifier(channel)) }
        }
    }

    func openConnections() -> [any Channel] {
        self.state.withLockedValue { Array($0.openConnections.values) }
    }

    func requestReceived() {
        self.state.withLockedValue { $0.requestCount += 1 }
    }

    var requestCount: Int { self.state.withLockedValue { $0.requestCount } }

    // MARK: Rooms

    func loadedRooms() -> [String] {
        self.state.withLockedValue { $0.rooms.values.map(\.snapshot.name).sorted() }
    }

    func loadCount(of name: String) -> Int {
        self.state.withLockedValue { $0.loadCounts[name.lowercased()] ?? 0 }
    }

    var totalLoads: Int { self.state.withLockedValue { $0.loadCounts.values.reduce(0, +) } }

    func users(in name: String) -> Int {
        self.state.withLockedValue { $0.rooms[name.lowercased()]?.clients.count ?? 0 }
    }

    func view(of name: String) -> RoomView? {
        self.state.withLockedValue { state in state.rooms[name.lowercased()].map(Self.view) }
    }

    func allRooms() -> [RoomView] {
        self.state.withLockedValue { state in state.rooms.values.map(Self.view) }
    }

    private static func view(_ room: LoadedRoom) -> RoomView {
        RoomView(snapshot: room.snapshot, loadEpoch: room.loadEpoch, clientIDs: room.clients.values.map(\.clientID).sorted())
    }

    /// OTT's `getRoom`: the loaded room (any casing), else the shared snapshot loaded into memory here, else nil.
    func load(_ name: String) -> RoomView? {
        self.state.withLockedValue { state in
            Self.loadLocked(name, state: &state, config: self.config, store: self.store).map(Self.view)
        }
    }

    private static func loadLocked(
        _ name: String, state: inout State, config: OTTBackendConfig, store: OTTSharedStore
    ) -> LoadedRoom? {
        let key = name.lowercased()
        if let room = state.rooms[key] { return room }
        guard let snapshot = store.snapshot(named: name) else { return nil }
        let room = LoadedRoom(snapshot: snapshot, loadEpoch: store.nextLoadEpoch(), idleSince: .now())
        state.rooms[key] = room
        state.loadCounts[key, default: 0] += 1
        store.roomLoaded(key, on: config.id)
        return room
    }

    enum CreateResult {
        case created(RoomView)
        case nameTaken
    }

    /// `POST /api/room/create` and `generate`: stores the snapshot and loads the room here.
    func create(_ snapshot: OTTSharedStore.RoomSnapshot) -> CreateResult {
        self.state.withLockedValue { state in
            let key = snapshot.name.lowercased()
            guard state.rooms[key] == nil, self.store.create(snapshot) else { return .nameTaken }
            let room = LoadedRoom(snapshot: snapshot, loadEpoch: self.store.nextLoadEpoch(), idleSince: .now())
            state.rooms[key] = room
            state.loadCounts[key, default: 0] += 1
            self.store.roomLoaded(key, on: self.config.id)
            return .created(Self.view(room))
        }
    }

    /// Applies `change` to a loaded room's snapshot and writes it to the shared store.
    func update(_ name: String, _ change: (inout OTTSharedStore.RoomSnapshot) -> Void) -> RoomView? {
        self.state.withLockedValue { state in
            let key = name.lowercased()
            guard Self.loadLocked(name, state: &state, config: self.config, store: self.store) != nil,
                  var room = state.rooms[key] else { return nil }
            change(&room.snapshot)
            state.rooms[key] = room
            self.store.putRoom(room.snapshot)
            return Self.view(room)
        }
    }

    /// A WebSocket client authenticated: loads the room if needed and adds the client. Nil if the room does not exist.
    func join(_ name: String, channel: any Channel, token: String) -> (view: RoomView, clientID: String)? {
        self.state.withLockedValue { state in
            let key = name.lowercased()
            guard Self.loadLocked(name, state: &state, config: self.config, store: self.store) != nil else { return nil }
            state.nextClientNumber += 1
            let clientID = "\(self.config.id)-client-\(state.nextClientNumber)"
            state.rooms[key]?.clients[ObjectIdentifier(channel)] = Client(channel: channel, token: token, clientID: clientID)
            state.rooms[key]?.idleSince = nil
            return state.rooms[key].map { (Self.view($0), clientID) }
        }
    }

    func leave(_ name: String, channel: any Channel) {
        self.state.withLockedValue { state in
            let key = name.lowercased()
            guard state.rooms[key]?.clients.removeValue(forKey: ObjectIdentifier(channel)) != nil else { return }
            if state.rooms[key]?.clients.isEmpty == true {
                state.rooms[key]?.idleSince = .now()
            }
        }
    }

    /// The room's client channels on this server (for broadcasting outside the lock).
    func members(of name: String) -> [any Channel] {
        self.state.withLockedValue { state in
            state.rooms[name.lowercased()].map { $0.clients.values.map(\.channel) } ?? []
        }
    }

    /// Whether a WebSocket authenticated with `token` is in the room on this server (`getClientByToken`).
    func hasClient(token: String, in name: String) -> Bool {
        self.state.withLockedValue { state in
            state.rooms[name.lowercased()]?.clients.values.contains { $0.token == token } ?? false
        }
    }

    // MARK: Unloading

    /// Removes the room from memory and closes its clients with `code`; returns the snapshot it had.
    @discardableResult
    func unload(_ name: String, code: UInt16) -> OTTSharedStore.RoomSnapshot? {
        let removed = self.state.withLockedValue { state -> LoadedRoom? in
            let key = name.lowercased()
            guard let room = state.rooms.removeValue(forKey: key) else { return nil }
            self.store.roomUnloaded(key, from: self.config.id)
            return room
        }
        guard let removed else { return nil }
        for client in removed.clients.values {
            client.channel.pipeline.fireUserInboundEventTriggered(OTTKick(code: code, immediate: false))
        }
        return removed.snapshot
    }

    /// Keepalive: unloads rooms without users whose idle time exceeds `unloadAfter` (every such room when `force`).
    @discardableResult
    func unloadStaleRooms(force: Bool) -> [String] {
        let now = NIODeadline.now()
        let stale = self.state.withLockedValue { state -> [String] in
            var names: [String] = []
            for (key, room) in state.rooms where room.clients.isEmpty {
                guard let idleSince = room.idleSince, force || now - idleSince >= self.config.unloadAfter else { continue }
                state.rooms[key] = nil
                self.store.roomUnloaded(key, from: self.config.id)
                names.append(room.snapshot.name)
            }
            return names
        }
        return stale.sorted()
    }

    /// Shutdown: every room unloads and its clients get `code`, closed as soon as the frame is written.
    func unloadAll(code: UInt16) {
        let rooms = self.takeAllRooms()
        for room in rooms {
            for client in room.clients.values {
                client.channel.pipeline.fireUserInboundEventTriggered(OTTKick(code: code, immediate: true))
            }
        }
    }

    /// A crash: memory is simply gone.
    func forgetAllRooms() {
        _ = self.takeAllRooms()
    }

    private func takeAllRooms() -> [LoadedRoom] {
        self.state.withLockedValue { state in
            let rooms = Array(state.rooms.values)
            for key in state.rooms.keys {
                self.store.roomUnloaded(key, from: self.config.id)
            }
            state.rooms.removeAll()
            return rooms
        }
    }
}
