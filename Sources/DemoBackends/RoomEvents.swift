import Foundation

/// JSON bodies the room server sends. Encoded with `JSONEncoder` (never string interpolation)
/// so room names and chat text containing quotes or control characters stay valid JSON.
struct RoomInfo: Encodable {
    let room: String
    let backend: String
    let members: Int
    let created: Bool
}

struct JoinedEvent: Encodable {
    let event = "joined"
    let room: String
    let backend: String
    let members: Int
}

struct MessageEvent: Encodable {
    let event = "message"
    let room: String
    let backend: String
    let text: String
}

enum RoomJSON {
    static func encode<Value: Encodable>(_ value: Value) -> String {
        let encoder = JSONEncoder()
        // Sorted keys: Foundation otherwise emits keys in per-process random order, which makes
        // demo output and logs needlessly hard to compare. Unescaped slashes are still valid JSON.
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Encoding these flat structs of strings/ints/bools cannot fail.
        let data = (try? encoder.encode(value)) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }
}
