import Foundation
import NIOConcurrencyHelpers

/// OpenTogetherTube's WebSocket close codes (`common/models/types.ts`).
public enum OTTCloseCode {
    /// Commanded or shutdown unload; the client reconnects.
    public static let away: UInt16 = 1001
    public static let invalidConnectionURL: UInt16 = 4001
    public static let roomNotFound: UInt16 = 4002
    /// Keepalive or admin unload; the client does not reconnect.
    public static let roomUnloaded: UInt16 = 4003
    public static let missingToken: UInt16 = 4004
}

/// OTT's room-name rules.
public enum OTTRoomName {
    /// Never room names: `/api/room/list`, `/create` and `/generate` are endpoints.
    public static let reserved: Set<String> = ["list", "create", "generate"]

    /// `ROOM_NAME_REGEX` (`^[a-z0-9_-]+$`, case-insensitive): what the WebSocket path and the HTTP routes check.
    /// No length limit here, because `generate` makes 36-character UUIDs that must still be joinable.
    public static func matchesPattern(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.allSatisfy { byte in
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "_"), UInt8(ascii: "-"):
                return true
            default:
                return false
            }
        }
    }

    /// What `POST /api/room/create` accepts: the pattern, 3-32 characters, and not a reserved word.
    public static func isValidForCreate(_ name: String) -> Bool {
        matchesPattern(name) && (3...32).contains(name.utf8.count) && !reserved.contains(name.lowercased())
    }
}

/// An in-memory stand-in for the Redis and Postgres that several OTT servers share: room snapshots, auth tokens,
/// the load-epoch counter. Give one store to every `OTTBackend` of a test.
///
/// Snapshots are keyed by their exact name, like Redis `room:<name>`: a lookup with other casing only finds a
/// permanent room (`isTemporary: false`), as OTT's Postgres fallback (`lower(name)`) does.
///
/// The store also records which backends hold which rooms in memory right now, so tests can assert that every room
/// lives on exactly one server (the real servers have no such view; this is test instrumentation).
public final class OTTSharedStore: Sendable {
    public struct QueueItem: Sendable, Equatable, Hashable {
        public var service: String
        public var id: String

        public init(service: String, id: String) {
            self.service = service
            self.id = id
        }
    }

    /// The stored part of a room (OTT's `storableProps`, reduced to what routing tests care about).
    public struct RoomSnapshot: Sendable, Equatable {
        public var name: String
        public var title: String
        public var description: String
        /// `public`, `unlisted` or `private`.
        public var visibility: String
        public var queueMode: String
        public var isTemporary: Bool
        public var queue: [QueueItem]

        public init(
            name: String, title: String = "", description: String = "", visibility: String = "public",
            queueMode: String = "manual", isTemporary: Bool = true, queue: [QueueItem] = []
        ) {
            self.name = name
            self.title = title
            self.description = description
            self.visibility = visibility
            self.queueMode = queueMode
            self.isTemporary = isTemporary
            self.queue = queue
        }
    }

    private struct State {
        var rooms: [String: RoomSnapshot] = [:]
        var tokens: Set<String> = []
        var loadEpoch = 0
        /// Lower-cased room name → ids of the backends that have it loaded.
        var holders: [String: Set<String>] = [:]
    }

    private let state = NIOLockedValueBox(State())

    public init() {}

    // MARK: Tokens

    /// A new anonymous session token (OTT: 512 random bytes, base64; here 64 URL-safe characters).
    public func mintToken() -> String {
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        let token = String((0..<64).map { _ in alphabet.randomElement()! })
        self.state.withLockedValue { _ = $0.tokens.insert(token) }
        return token
    }

    public func isValidToken(_ token: String) -> Bool {
        self.state.withLockedValue { $0.tokens.contains(token) }
    }

    // MARK: Room snapshots

    /// How OTT finds a room it has not loaded: Redis `room:<exact name>`, then Postgres by `lower(name)` (permanent
    /// rooms only).
    public func snapshot(named name: String) -> RoomSnapshot? {
        self.state.withLockedValue { state in
            if let exact = state.rooms[name] { return exact }
            let lower = name.lowercased()
            return state.rooms.values.first { !$0.isTemporary && $0.name.lowercased() == lower }
        }
    }

    /// Whether a room of that name exists in any casing (OTT's create checks memory, Redis and Postgres).
    public func isNameTaken(_ name: String) -> Bool {
        let lower = name.lowercased()
        return self.state.withLockedValue { state in state.rooms.keys.contains { $0.lowercased() == lower } }
    }

    /// Canonical names of every stored room, sorted.
    public func roomNames() -> [String] {
        self.state.withLockedValue { $0.rooms.keys.sorted() }
    }

    /// Stores a room as if it had been created earlier (on some server); replaces one of the same exact name.
    public func putRoom(_ snapshot: RoomSnapshot) {
        self.state.withLockedValue { $0.rooms[snapshot.name] = snapshot }
    }

    /// Inserts `snapshot` unless its name is taken in any casing; false if it was.
    func create(_ snapshot: RoomSnapshot) -> Bool {
        let lower = snapshot.name.lowercased()
        return self.state.withLockedValue { state in
            guard !state.rooms.keys.contains(where: { $0.lowercased() == lower }) else { return false }
            state.rooms[snapshot.name] = snapshot
            return true
        }
    }

    /// Deletes the snapshot stored under exactly `name` (OTT deletes `room:<name>` on an admin unload).
    public func deleteRoom(named name: String) {
        self.state.withLockedValue { _ = $0.rooms.removeValue(forKey: name) }
    }

    // MARK: Load epochs and holders

    /// `INCR roommanager:load_epoch`.
    func nextLoadEpoch() -> Int {
        self.state.withLockedValue { state in
            state.loadEpoch += 1
            return state.loadEpoch
        }
    }

    /// The last load epoch handed out (0 before any load).
    public var loadEpoch: Int { self.state.withLockedValue { $0.loadEpoch } }

    func roomLoaded(_ name: String, on backend: String) {
        self.state.withLockedValue { _ = $0.holders[name.lowercased(), default: []].insert(backend) }
    }

    func roomUnloaded(_ name: String, from backend: String) {
        self.state.withLockedValue { state in
            let key = name.lowercased()
            state.holders[key]?.remove(backend)
            if state.holders[key]?.isEmpty == true { state.holders[key] = nil }
        }
    }

    /// Ids of the backends that currently have the room (any casing) loaded, sorted.
    public func backends(holding name: String) -> [String] {
        self.state.withLockedValue { ($0.holders[name.lowercased()] ?? []).sorted() }
    }

    /// Rooms loaded on more than one backend right now: lower-cased name → sorted backend ids.
    public func duplicates() -> [String: [String]] {
        self.state.withLockedValue { state in
            state.holders.filter { $0.value.count > 1 }.mapValues { $0.sorted() }
        }
    }
}
