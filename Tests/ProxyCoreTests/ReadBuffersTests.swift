import NIOCore
import Testing

@testable import ProxyCore

@Suite struct ReadBuffersTests {
    /// The compact allocator must size buffers exactly as NIO's adaptive allocator with the same bounds would.
    @Test(arguments: [64, 256, 300, 512, 4096, 65536])
    func sizesBuffersAsNIOsAdaptiveAllocatorDoes(initial: Int) {
        var ours = ReadBuffers.Allocator(initial: initial)
        var nio = AdaptiveRecvByteBufferAllocator(minimum: 64, initial: initial, maximum: 65536)
        var random = SystemRandomNumberGenerator()
        #expect(ours.nextBufferSize() == nio.nextBufferSize())
        for step in 0..<5_000 {
            // Runs of full reads (growth), tiny reads (shrinking) and anything in between.
            let size = nio.nextBufferSize() ?? 0
            let read: Int
            switch Int.random(in: 0..<4, using: &random) {
            case 0: read = size
            case 1: read = Int.random(in: 0...(size / 2), using: &random)
            default: read = Int.random(in: 0...size, using: &random)
            }
            let grew = ours.record(actualReadBytes: read)
            #expect(grew == nio.record(actualReadBytes: read), "step \(step), read \(read)")
            #expect(ours.nextBufferSize() == nio.nextBufferSize(), "step \(step), read \(read)")
            #expect(ours.buffer(allocator: ByteBufferAllocator()).capacity >= ours.nextBufferSize() ?? 0)
        }
    }

    /// The point of the type: NIO keeps a channel's allocator in an existential, whose inline storage is three words.
    /// Anything bigger is boxed on the heap for every channel.
    @Test func fitsAnExistentialsInlineStorage() {
        #expect(MemoryLayout<ReadBuffers.Allocator>.size <= 3 * MemoryLayout<Int>.size)
        #expect(MemoryLayout<AdaptiveRecvByteBufferAllocator>.size > 3 * MemoryLayout<Int>.size)
    }

    @Test func backendBuffersHoldASwitchingProtocolsResponse() {
        let response = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        #expect(ReadBuffers.backendAllocator.nextBufferSize()! >= response.utf8.count)
        #expect(ReadBuffers.clientAllocator.nextBufferSize() == 512)
    }
}
