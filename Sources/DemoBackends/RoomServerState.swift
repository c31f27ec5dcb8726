import NIOConcurrencyHelpers
import NIOCore

/// Everything the per-connection handlers of one `RoomServer` share.
///
/// Handlers run on many event loops at once, so counters and the open-connection set are locked.
final class RoomServerState: Sendable {
    let backendID: String
    let rooms = RoomRegistry()

    private struct Counters {
        var acceptedConnections = 0
        var requestCount = 0
        // Tracked so `stop()` can close connections that are still open (keep-alive, WebSocket).
        var openConnections: [ObjectIdentifier: any Channel] = [:]
    }

    private let counters = NIOLockedValueBox(Counters())

    init(backendID: String) {
        self.backendID = backendID
    }

    var acceptedConnections: Int { self.counters.withLockedValue { $0.acceptedConnections } }
    var requestCount: Int { self.counters.withLockedValue { $0.requestCount } }

    func connectionAccepted(_ channel: any Channel) {
        self.counters.withLockedValue {
            $0.acceptedConnections += 1
            $0.openConnections[ObjectIdentifier(channel)] = channel
        }
        channel.closeFuture.whenComplete { _ in
            self.counters.withLockedValue { _ = $0.openConnections.removeValue(forKey: ObjectIdentifier(channel)) }
        }
    }

    func requestReceived() {
        self.counters.withLockedValue { $0.requestCount += 1 }
    }

    func openConnections() -> [any Channel] {
        self.counters.withLockedValue { Array($0.openConnections.values) }
    }
}
