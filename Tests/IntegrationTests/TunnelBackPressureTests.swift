import Foundation
import Testing

/// A tunnel whose client stops reading must stop reading from the backend, so the proxy holds about a socket's
/// worth of data for it rather than everything the backend can send.
/// Serialized: each case measures the process's RSS, which a case running beside it would grow too.
@Suite(.serialized) struct TunnelBackPressureTests {
    @Test(arguments: [true, false])
    func slowReaderBoundsWhatTheProxyBuffers(relay: Bool) async throws {
        let limit = 512 * 1024 * 1024
        let backend = try await FloodBackend.start(limit: limit)
        defer { Task { await backend.stop() } }
        try await withProxy(backends: [(id: "flood", port: backend.port)], configure: { $0.threads.tunnelRelay = relay }) { proxy in
            let before = try #require(WSSupport.residentBytes())
            let (client, statusLine) = try await StalledUpgradeClient.connect(port: proxy.port, path: "/flood")
            #expect(statusLine.hasPrefix("HTTP/1.1 101"))
            #expect(backend.upgradedConnections == 1)
            let carried = await WSSupport.waitUntil(timeout: .seconds(3)) { proxy.server.relayedTunnels == (relay ? 1 : 0) }
            #expect(carried, "relayed tunnels: \(proxy.server.relayedTunnels) (relay: \(relay))")

            // Let the backend push for a while; with back-pressure it stalls after a few socket buffers.
            try await Task.sleep(for: .seconds(2))
            let stalledAt = backend.bytesWritten
            try await Task.sleep(for: .milliseconds(700))
            let after = try #require(WSSupport.residentBytes())
            let writtenWhileStalled = backend.bytesWritten - stalledAt
            let growth = after - before
            // RSS is the whole test process's, and the suites beside this one allocate too (a full parallel run once
            // added 132 MiB in these 2.7 s): this bound only catches gross buffering, half of the flood's 512 MiB; the
            // byte counts of the backend below are the precise checks.
            #expect(growth < 256 * 1024 * 1024, "RSS grew by \(growth / (1024 * 1024)) MiB while the client did not read")
            #expect(backend.bytesWritten < 128 * 1024 * 1024, "the backend wrote \(backend.bytesWritten) bytes")
            #expect(writtenWhileStalled < 1024 * 1024, "the backend kept writing (\(writtenWhileStalled) bytes) while blocked")

            // Reading again drains the buffers and the backend gets to write again: the tunnel resumed reading.
            // 16 MiB is more than every socket buffer on the way holds, so it has to pass through the client. A
            // stalled tunnel moves nothing; a slow one only needs the longer wait (alone this takes about 0.05 s, in
            // full parallel runs on two cores 0.8 to 4.7 s, and once more than the 5 s it was given before).
            let blockedAt = backend.bytesWritten
            let receivedAt = client.payloadBytes
            try await client.resumeReading()
            let resumed = await WSSupport.waitUntil(timeout: .seconds(20)) {
                backend.bytesWritten > blockedAt + 16 * 1024 * 1024
            }
            #expect(
                resumed,
                """
                the tunnel did not resume after the client read again: in 20 s the backend wrote \
                \(backend.bytesWritten - blockedAt) bytes more, the client received \(client.payloadBytes - receivedAt)
                """)
            #expect(client.payloadBytes > 0)
            await client.close()
        }
    }
}
