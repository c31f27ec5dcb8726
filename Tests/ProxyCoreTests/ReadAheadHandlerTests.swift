import NIOCore
import NIOEmbedded
import Testing

@testable import ProxyCore

/// Counts the `read()` calls that reach the socket (it sits next to the head of the pipeline).
private final class ReadCounter: ChannelOutboundHandler {
    typealias OutboundIn = Any
    var reads = 0

    func read(context: ChannelHandlerContext) {
        self.reads += 1
        context.read()
    }
}

@Suite struct ReadAheadHandlerTests {
    @Test func readsAheadUpToTheLimitThenWaitsForTheHandlersBehind() throws {
        let counter = ReadCounter()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(counter)
        try channel.pipeline.syncOperations.addHandler(ReadAheadHandler(limit: 100))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        defer { _ = try? channel.finish() }

        // Nothing behind asked for more, but under the limit the socket stays readable.
        try channel.writeInbound(ByteBuffer(repeating: 0x61, count: 50))
        #expect(counter.reads == 1)
        // 110 bytes ahead: past the limit, no further read until the handlers behind ask.
        try channel.writeInbound(ByteBuffer(repeating: 0x62, count: 60))
        #expect(counter.reads == 1)
        // They ask (the pipelining handler after a response): the read goes through and the count starts again.
        channel.read()
        #expect(counter.reads == 2)
        try channel.writeInbound(ByteBuffer(repeating: 0x63, count: 10))
        #expect(counter.reads == 3)
        // Every byte still reaches the handlers behind, in order.
        var received = 0
        while let buffer = try channel.readInbound(as: ByteBuffer.self) { received += buffer.readableBytes }
        #expect(received == 120)
    }

    @Test func aClosedChannelIsNotAskedToRead() throws {
        let counter = ReadCounter()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(counter)
        try channel.pipeline.syncOperations.addHandler(ReadAheadHandler(limit: 100))
        // Never connected: not active.
        try channel.writeInbound(ByteBuffer(repeating: 0x61, count: 10))
        #expect(counter.reads == 0)
        _ = try? channel.finish()
    }
}
