import Foundation
import Testing

/// A tunnel whose client stops reading must stop reading from the backend, so the proxy holds about a socket's
/// worth of data for it rather than everything the backend can send.
@Suite struct TunnelBackPressureTests {
    @Test func slowReaderBoundsWhatTheProxyBuffers() async throws {
        let limit = 512 * 1024 * 1024
        let backend = try await FloodBackend.start(limit: limit)
        defer { Task { await backend.stop() } }
        try await withProxy(backends: [(id: "flood", port: backend.port)]) { proxy in
            let before = try #require(WSSupport.residentBytes())
            let (client, statusLine) = try await StalledUpgradeClient.connect(port: proxy.port, path: "/flood")
            #expect(statusLine.hasPrefix("HTTP/1.1 101"))
            #expect(backend.upgradedConnections == 1)

            // Let the backend push for a while; with back-pressure it stalls after a few socket buffers.
            try await Task.sleep(for: .seconds(2))
            let stalledAt = backend.bytesWritten
            try await Task.sleep(for: .milliseconds(700))
            let after = try #require(WSSupport.residentBytes())
            let writtenWhileStalled = backend.bytesWritten - stalledAt
            let growth = after - before
            #expect(growth < 64 * 1024 * 1024, "RSS grew by \(growth / (1024 * 1024)) MiB while the client did not read")
            #expect(backend.bytesWritten < 128 * 1024 * 1024, "the backend wrote \(backend.bytesWritten) bytes")
            #expect(writtenWhileStalled < 1024 * 1024, "the backend kept writing (\(writtenWhileStalled) bytes) while blocked")

            // Reading again drains the buffers and the backend gets to write again: the tunnel resumed reading.
            let blockedAt = backend.bytesWritten
            try await client.resumeReading()
            let resumed = await WSSupport.waitUntil(timeout: .seconds(5)) {
                backend.bytesWritten > blockedAt + 16 * 1024 * 1024
            }
            #expect(resumed, "the tunnel did not resume after the client read again")
            #expect(client.payloadBytes > 0)
            await client.close()
        }
    }
}
