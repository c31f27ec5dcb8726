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
    // Fixed-size state, no buffer: it runs on every read of every WebSocket tunnel, and a header array kept its
    // allocation for the life of the tunnel and cost a uniqueness check per byte.
    private var payloadRemaining: UInt64 = 0
    /// The extended payload length being read (16 or 64 bits, big-endian).
    private var extendedLength: UInt64 = 0
    /// Header bytes of the current frame seen so far; 0 between frames.
    private var headerSeen: UInt8 = 0
    /// The header's total length (2 to 14 bytes), known from its second byte on.
    private var headerLength: UInt8 = 2
    /// The 7-bit length field of the second byte (126: 16-bit length follows, 127: 64-bit length follows).
    private var lengthCode: UInt8 = 0
    /// Once the stream stops looking like WebSocket framing, never inject.
    private(set) var broken = false

    var atFrameBoundary: Bool { !self.broken && self.headerSeen == 0 && self.payloadRemaining == 0 }

    mutating func consume(_ buffer: ByteBuffer) {
        guard !self.broken else { return }
        buffer.withUnsafeReadableBytes { self.consume($0) }
    }

    mutating func consume(_ bytes: UnsafeRawBufferPointer) {
        guard !self.broken else { return }
        do {
            var index = 0
            while index < bytes.count {
                if self.payloadRemaining > 0 {
                    let skip = Int(min(UInt64(bytes.count - index), self.payloadRemaining))
                    index += skip
                    self.payloadRemaining -= UInt64(skip)
                    continue
                }
                let byte = bytes[index]
                index += 1
                self.headerSeen += 1
                if self.headerSeen == 2 {
                    self.lengthCode = byte & 0x7F
                    let extended: UInt8 = self.lengthCode == 126 ? 2 : self.lengthCode == 127 ? 8 : 0
                    self.headerLength = 2 + extended + (byte & 0x80 != 0 ? 4 : 0)
                    self.extendedLength = 0
                } else if self.headerSeen > 2, self.headerSeen <= 2 + self.extendedLengthBytes {
                    self.extendedLength = self.extendedLength << 8 | UInt64(byte)
                }
                // `headerLength` is at least 2 and set at the second byte, so this holds once the header is whole.
                guard self.headerSeen == self.headerLength else { continue }
                let length = self.extendedLengthBytes == 0 ? UInt64(self.lengthCode) : self.extendedLength
                guard length >> 63 == 0 else {
                    self.broken = true
                    return
                }
                self.payloadRemaining = length
                self.headerSeen = 0
            }
        }
    }

    private var extendedLengthBytes: UInt8 {
        self.lengthCode == 126 ? 2 : self.lengthCode == 127 ? 8 : 0
    }

    /// A server-to-client close frame (unmasked) carrying `code`.
    static func closeFrame(code: UInt16, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 4)
        buffer.writeBytes([0x88, 0x02, UInt8(code >> 8), UInt8(code & 0xFF)])
        return buffer
    }
}
