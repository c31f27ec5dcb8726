import NIOCore

/// How the proxy sizes what it reads from sockets.
enum ReadBuffers {
    /// The receive buffers of client and backend connections start at 512 bytes and adapt (NIO's
    /// `AdaptiveRecvByteBufferAllocator`, doubling when a read fills the buffer, up to 64 KiB).
    ///
    /// NIO keeps each channel's receive buffer for reuse for the life of the channel, so its first size is memory every
    /// idle WebSocket holds twice (client side and backend side). NIO's default of 2 KiB made idle tunnels cost about
    /// 3 KiB more than 512-byte buffers do (measured with `ws-load idle`, docs/benchmarks.md). 512 bytes holds a typical
    /// request head or `101` response in one read; bigger heads (long cookies) take a second read on that connection,
    /// after which the buffer has grown, and keep-alive connections carrying larger responses grow theirs once.
    static var allocator: AdaptiveRecvByteBufferAllocator {
        AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 512, maximum: 65536)
    }

    /// Bytes a client may send ahead of the request being answered before reads stop (see `ReadAheadHandler`).
    static let readAheadLimit = 16 * 1024
}
