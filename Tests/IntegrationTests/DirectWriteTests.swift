import NIOCore
import NIOPosix
import ProxyCore
import Testing

/// The fast path's direct writes (`DirectWriter`): from a connection's second exchange on, its bytes go to the socket
/// with one `send(2)`; whatever the socket does not take waits in NIO, and nothing is ever reordered or lost.
@Suite struct DirectWriteTests {
    @Test func exchangesAfterAConnectionsFirstAreWrittenDirectlyBothWays() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "a", port: origin.port)]) { proxy in
                #expect(await proxy.server.directWriteCounts() == DirectWriteCounts())
                let connection = try await RawHTTPConnection.connect(port: proxy.port)
                defer { Task { await connection.close() } }
                for index in 0..<10 {
                    try await connection.send("GET /echo?n=\(index) HTTP/1.1\r\nHost: test\r\n\r\n")
                    let response = try await connection.readResponse()
                    #expect(response.status == 200)
                    #expect(response.header("x-origin-uri") == "/echo?n=\(index)")
                }
                let counts = await proxy.server.directWriteCounts()
                // The first exchange of the client connection and of the (then new) backend connection go through
                // NIO; the nine after it are one `send` each way.
                #expect(counts.client.whole == 9, "\(counts)")
                #expect(counts.backend.whole == 9, "\(counts)")
                #expect(counts.client.partial == 0 && counts.backend.partial == 0, "\(counts)")
            }
        }
    }

    /// A client that stops reading while responses keep coming: the socket fills, direct writes hand the rest to
    /// NIO (and everything after it waits behind), and once the client reads again every response arrives whole and
    /// in order.
    @Test func responsesToAClientThatStopsReadingArriveWholeAndInOrder() async throws {
        try await withOrigin { origin in
            try await withOneLoopProxy(backends: [(id: "a", port: origin.port)]) { proxy in
                let client = try await RawHTTPConnection.connect(port: proxy.port)
                // Warm up: the connection's first exchange (never direct) and a second one (direct).
                for index in 0..<2 {
                    try await client.send("GET /echo?warm=\(index) HTTP/1.1\r\nHost: test\r\n\r\n")
                    #expect(try await client.readResponse().status == 200)
                }
                try await client.channel.setOption(ChannelOptions.autoRead, value: false).get()
                // 16 KB request targets come back in each response head: 500 of them (8 MB) outgrow what the kernel
                // buffers between proxy and client (the proxy's send buffer grows to 4 MB, the client's receive
                // buffer to 6 MB, but not both at once).
                let pad = String(repeating: "q", count: 16_000)
                let count = 500
                var burst = ""
                for index in 0..<count { burst += "GET /echo?i=\(index)&\(pad) HTTP/1.1\r\nHost: test\r\n\r\n" }
                client.channel.writeAndFlush(ByteBuffer(string: burst), promise: nil)
                // Until the socket is full (a loaded machine takes a while to produce the 8 MB).
                var stalled = DirectWriteCounts()
                let deadline = ContinuousClock.now + .seconds(15)
                while stalled.client.partial == 0, ContinuousClock.now < deadline {
                    try await Task.sleep(for: .milliseconds(50))
                    stalled = await proxy.server.directWriteCounts()
                }
                #expect(stalled.client.partial >= 1, "the socket never filled: \(stalled)")

                try await client.channel.setOption(ChannelOptions.autoRead, value: true).get()
                client.channel.read()
                for index in 0..<count {
                    let response = try await client.readResponse(timeout: .seconds(20))
                    guard response.status == 200, response.header("x-origin-uri") == "/echo?i=\(index)&\(pad)" else {
                        Issue.record("response \(index): \(response.status) \(response.header("x-origin-uri")?.prefix(40) ?? "-")")
                        break
                    }
                }
                // Direct writes resume once NIO has written what it held.
                let before = await proxy.server.directWriteCounts()
                try await client.send("GET /echo?after HTTP/1.1\r\nHost: test\r\n\r\n")
                #expect(try await client.readResponse().header("x-origin-uri") == "/echo?after")
                let after = await proxy.server.directWriteCounts()
                #expect(after.client.whole == before.client.whole + 1, "\(before) → \(after)")
                await client.close()
            }
        }
    }
}

extension TLSListenerTests {
    /// Bytes to a TLS client must go through the TLS handler: the fast path never writes them directly (the plain
    /// backend side still may).
    @Test func aTLSListenerNeverWritesToItsClientsDirectly() async throws {
        try await Self.withTLSProxy(room: "tls-direct") { proxy, connect in
            let (channel, collected) = try await connect()
            for index in 0..<5 {
                try await channel.writeAndFlush(
                    ByteBuffer(string: "GET /rooms/secure-\(index) HTTP/1.1\r\nHost: localhost\r\n\r\n"))
                let answered = await WSSupport.waitUntil(timeout: .seconds(5)) {
                    collected.text.contains("\"room\":\"secure-\(index)\"")
                }
                #expect(answered, "response \(index): \(collected.text.suffix(200))")
            }
            try await channel.close()
            let counts = await proxy.server.directWriteCounts()
            #expect(counts.client == DirectWriteCounts.Side(), "\(counts)")
            #expect(counts.backend.whole >= 1, "\(counts)")
        }
    }
}
