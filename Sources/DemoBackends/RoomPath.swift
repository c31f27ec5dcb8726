/// The two URL shapes the room server understands.
///
/// Parsing lives in one place so the HTTP handler and the WebSocket upgrader agree on what
/// a room URL is (a mismatch would make `/rooms/x/ws` upgrade but `/rooms/x` 404, or vice versa).
enum RoomPath: Equatable {
    /// `GET /rooms/{name}`
    case room(String)
    /// `GET /rooms/{name}/ws`
    case webSocket(String)

    init?(uri: String) {
        // Query strings and fragments never name a room; drop them before splitting.
        let path = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        let segments = path.split(separator: "/", omittingEmptySubsequences: true)
        guard segments.first == "rooms" else { return nil }
        switch segments.count {
        case 2:
            self = .room(String(segments[1]))
        case 3 where segments[2] == "ws":
            self = .webSocket(String(segments[1]))
        default:
            return nil
        }
    }
}
