import NIOConcurrencyHelpers
import NIOCore

/// In-memory rooms of one backend: the "state" that makes sticky routing matter.
///
/// Members of one room may sit on channels owned by different event loops, so all access goes
/// through a lock. Writes to member channels happen outside the lock (`Channel` is thread-safe).
final class RoomRegistry: Sendable {
    private struct Room {
        var members: [ObjectIdentifier: any Channel] = [:]
    }

    private let rooms = NIOLockedValueBox<[String: Room]>([:])

    /// Loads the room if needed. `created` tells whether this call brought it into memory.
    func load(_ name: String) -> (created: Bool, members: Int) {
        self.rooms.withLockedValue { rooms in
            if let room = rooms[name] {
                return (false, room.members.count)
            }
            rooms[name] = Room()
            return (true, 0)
        }
    }

    /// Adds `channel` to the room (loading it if needed) and returns the new member count.
    func join(_ name: String, channel: any Channel) -> Int {
        self.rooms.withLockedValue { rooms in
            rooms[name, default: Room()].members[ObjectIdentifier(channel)] = channel
            return rooms[name]?.members.count ?? 0
        }
    }

    func leave(_ name: String, channel: any Channel) {
        self.rooms.withLockedValue { rooms in
            // The room itself stays loaded: rooms outlive their connections, like real watch-party state.
            _ = rooms[name]?.members.removeValue(forKey: ObjectIdentifier(channel))
        }
    }

    /// A snapshot of the room's member channels, taken so broadcasting does not hold the lock.
    func members(of name: String) -> [any Channel] {
        self.rooms.withLockedValue { rooms in
            rooms[name].map { Array($0.members.values) } ?? []
        }
    }

    func names() -> [String] {
        self.rooms.withLockedValue { $0.keys.sorted() }
    }
}
