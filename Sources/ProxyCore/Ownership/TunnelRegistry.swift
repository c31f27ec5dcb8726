import NIOCore
import Synchronization

/// Open tunnels by key and by backend, so an owner change or a migration can close exactly the sockets it concerns.
public final class TunnelRegistry: Sendable {
    /// Closes one tunnel on its own event loop, with a WebSocket close code when a frame boundary allows it.
    public typealias Closer = @Sendable (_ code: UInt16) -> Void

    struct Record: Sendable {
        let id: UInt64
        let key: String?
        let backend: String
        let close: Closer
    }

    private let records = Mutex<[UInt64: Record]>([:])
    private let nextID = Atomic<UInt64>(1)

    public init() {}

    /// Registers a tunnel; returns the token to unregister it with when it closes.
    public func register(key: String?, backend: String, close: @escaping Closer) -> UInt64 {
        let id = self.nextID.add(1, ordering: .relaxed).oldValue
        self.records.withLock { $0[id] = Record(id: id, key: key, backend: backend, close: close) }
        return id
    }

    public func unregister(_ id: UInt64) {
        _ = self.records.withLock { $0.removeValue(forKey: id) }
    }

    /// Closes the key's tunnels that run to `backend` (the previous owner); returns how many.
    @discardableResult
    public func close(key: String, onBackend backend: String, code: UInt16) -> Int {
        let matching = self.records.withLock { records in records.values.filter { $0.key == key && $0.backend == backend } }
        for record in matching { record.close(code) }
        return matching.count
    }

    /// Tunnels to `backend`, oldest first (for gradual migration).
    func tunnels(onBackend backend: String) -> [Record] {
        self.records.withLock { records in records.values.filter { $0.backend == backend }.sorted { $0.id < $1.id } }
    }

    public func count(onBackend backend: String) -> Int {
        self.records.withLock { records in records.values.count { $0.backend == backend } }
    }

    public var count: Int { self.records.withLock { $0.count } }
}

/// Follows WebSocket framing (RFC 6455 §5.2) in the backend → client byte stream, only to know whether the next
/// byte starts a frame: the one place the proxy may inject its own close frame without corrupting the stream.
struct WebSocketFrameTracker: Sendable {
    private var header: [UInt8] = []
    private var payloadRemaining: UInt64 = 0
    /// Once the stream stops looking like WebSocket framing, never inject.
    private(set) var broken = false

    var atFrameBoundary: Bool { !self.broken && self.header.isEmpty && self.payloadRemaining == 0 }

    mutating func consume(_ buffer: ByteBuffer) {
        guard !self.broken else { return }
        var view = buffer.readableBytesView[...]
        while !view.isEmpty {
            if self.payloadRemaining > 0 {
                let skip = Int(min(UInt64(view.count), self.payloadRemaining))
                view = view.dropFirst(skip)
                self.payloadRemaining -= UInt64(skip)
                continue
            }
            self.header.append(view.removeFirst())
            guard let needed = Self.headerLength(self.header) else { continue }
            if self.header.count < needed { continue }
            guard let length = Self.payloadLength(self.header) else {
                self.broken = true
                return
            }
            self.payloadRemaining = length
            self.header.removeAll(keepingCapacity: true)
        }
    }

    /// Total header length once the first two bytes are known.
    private static func headerLength(_ header: [UInt8]) -> Int? {
        guard header.count >= 2 else { return nil }
        let masked = header[1] & 0x80 != 0
        let base: Int
        switch header[1] & 0x7F {
        case 126: base = 4
        case 127: base = 10
        default: base = 2
        }
        return base + (masked ? 4 : 0)
    }

    private static func payloadLength(_ header: [UInt8]) -> UInt64? {
        switch header[1] & 0x7F {
        case 126:
            return UInt64(header[2]) << 8 | UInt64(header[3])
        case 127:
            var length: UInt64 = 0
            for byte in header[2..<10] { length = length << 8 | UInt64(byte) }
            return length >> 63 == 0 ? length : nil
        case let small:
            return UInt64(small)
        }
    }

    /// A server-to-client close frame (unmasked) carrying `code`.
    static func closeFrame(code: UInt16, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 4)
        buffer.writeBytes([0x88, 0x02, UInt8(code >> 8), UInt8(code & 0xFF)])
        return buffer
    }
}
