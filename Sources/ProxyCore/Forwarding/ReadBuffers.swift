import NIOCore

/// How the proxy sizes what it reads from sockets.
///
/// NIO keeps each channel's receive buffer for reuse for the life of the channel, so its first size is memory every
/// idle WebSocket holds twice (client side and backend side). NIO's default of 2 KiB made idle tunnels cost about
/// 3 KiB more than 512-byte buffers do (measured with `ws-load idle`, docs/benchmarks.md).
enum ReadBuffers {
    /// Client connections start at 512 bytes: that holds a typical request head in one read (browsers send 400 to
    /// 700 bytes); bigger heads (long cookies) take a second read on that connection, after which the buffer has
    /// grown.
    static var clientAllocator: Allocator { Allocator(initial: 512) }

    /// Backend connections start at 256 bytes: that holds a `101 Switching Protocols` (about 130 bytes from
    /// OpenTogetherTube and most WebSocket servers), the only thing a tunnel's backend connection reads before its
    /// tunnel starts. A pooled keep-alive connection carrying larger responses doubles its buffer on each full read,
    /// so it reaches their size within its first response.
    static var backendAllocator: Allocator { Allocator(initial: 256) }

    /// Bytes a client may send ahead of the request being answered before reads stop (see `ReadAheadHandler`).
    static let readAheadLimit = 16 * 1024

    /// NIO's `AdaptiveRecvByteBufferAllocator` policy (power-of-two sizes from 64 bytes to 64 KiB: double after a
    /// read that filled the buffer, halve after two reads in a row that used at most half of it) in 8 bytes.
    ///
    /// NIO stores a channel's allocator as an existential; NIO's own struct is 33 bytes, too big for an
    /// existential's inline storage, so every channel boxed it on the heap, and each accepted connection boxed
    /// another copy in its channel options: about 100 bytes per idle tunnel (heaptrack, docs/benchmarks.md). This
    /// one fits inline.
    struct Allocator: RecvByteBufferAllocator {
        static let minimum: UInt32 = 64
        static let maximum: UInt32 = 65536

        private var next: UInt32
        private var decreaseNow = false

        /// `initial` is rounded down to a power of two within `minimum...maximum`.
        init(initial: Int) {
            let clamped = UInt32(min(max(initial, Int(Self.minimum)), Int(Self.maximum)))
            self.next = 1 << (31 - UInt32(clamped.leadingZeroBitCount))
        }

        func buffer(allocator: ByteBufferAllocator) -> ByteBuffer {
            allocator.buffer(capacity: Int(self.next))
        }

        func nextBufferSize() -> Int? {
            Int(self.next)
        }

        mutating func record(actualReadBytes: Int) -> Bool {
            let lower = self.next >> 1
            if actualReadBytes <= Int(lower) && lower >= Self.minimum {
                if self.decreaseNow {
                    self.next = lower
                    self.decreaseNow = false
                } else {
                    self.decreaseNow = true
                }
                return false
            }
            self.decreaseNow = false
            if actualReadBytes >= Int(self.next) && self.next < Self.maximum {
                self.next <<= 1
                return true
            }
            return false
        }
    }
}
