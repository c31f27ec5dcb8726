import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing

@testable import ProxyCore

/// `DirectWriter` on a real loopback connection: it writes only while NIO holds nothing of the channel, so its
/// bytes can never overtake NIO's.
@Suite struct DirectWriterTests {
    private final class Collector: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let received = NIOLockedValueBox<[UInt8]>([])
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let bytes = Self.unwrapInboundIn(data)
            self.received.withLockedValue { $0.append(contentsOf: bytes.readableBytesView) }
        }
    }

    @Test func writesOnlyWhileNIOHoldsNothingOfTheChannelAndOnlyAnOpenOne() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let collector = Collector()
        let server = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(collector) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let near = try await ClientBootstrap(group: group).connect(host: "127.0.0.1", port: server.localAddress!.port!).get()

        // Each step on the channel's loop, as the fast path runs: what `write` left for NIO (nil: it sent it all).
        let steps = try await near.eventLoop.submit { () -> [String] in
            var writer = DirectWriter()
            var counts = DirectWriteCounts.Side()
            func write(_ text: String) -> String {
                writer.write(ByteBuffer(string: text), counts: &counts).map { String(buffer: $0) } ?? "sent"
            }
            var log: [String] = []
            log.append("before prepare: \(write("a"))")
            near.write(ByteBuffer(string: "b"), promise: nil)  // queued in NIO, not flushed
            writer.prepare(near)
            log.append("NIO holds bytes: direct \(writer.isDirect)")
            near.flush()  // the socket takes it at once
            writer.prepare(near)
            log.append("NIO empty: direct \(writer.isDirect)")
            log.append("c: \(write("c"))")
            writer.willQueueInNIO()
            log.append("behind a NIO write: \(write("d"))")
            writer.nioWriteCompleted()
            log.append("e: \(write("e"))")
            writer.pipelineWrote()
            log.append("after another writer: \(write("f"))")
            writer.prepare(near)
            log.append("g: \(write("g"))")
            log.append("counts \(counts.whole) \(counts.partial)")
            return log
        }.get()
        #expect(
            steps == [
                "before prepare: a", "NIO holds bytes: direct false", "NIO empty: direct true", "c: sent",
                "behind a NIO write: d", "e: sent", "after another writer: f", "g: sent", "counts 3 0",
            ])
        // What reached the peer, in order: NIO's "b", then the direct writes; nothing that was refused.
        var arrived = ""
        for _ in 0..<500 where arrived.count < 4 {
            arrived = String(decoding: collector.received.withLockedValue { $0 }, as: UTF8.self)
            try await Task.sleep(for: .milliseconds(2))
        }
        #expect(arrived == "bceg")

        let afterClose = try await near.eventLoop.submit { () -> (Bool, Bool) in
            var writer = DirectWriter()
            var counts = DirectWriteCounts.Side()
            writer.prepare(near)
            let direct = writer.isDirect
            near.close(promise: nil)  // on the loop: the socket is closed when this returns
            return (direct, writer.write(ByteBuffer(string: "z"), counts: &counts) != nil)
        }.get()
        #expect(afterClose.0)
        #expect(afterClose.1, "a closed channel's descriptor is never written")
        try await server.close()
    }
}
