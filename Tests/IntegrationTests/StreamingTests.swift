import NIOCore
import Testing

/// Bodies far larger than any buffer stream through with bounded memory, and a backend that dies mid-stream cuts
/// the client off rather than leaving it a response that looks complete.
///
/// Serialized: the memory checks read the whole process's RSS, so the two big transfers must not overlap.
@Suite(.serialized) struct StreamingTests {
    static let mebibyte = 1024 * 1024
    static let largeBody = 1024 * mebibyte
    /// The proxy, the origin and the client all live in this process; none of them may hold more than a few chunks.
    static let allowedGrowth = 64 * mebibyte

    /// The backend stops reading for half a second early on: without back-pressure the proxy would buffer everything
    /// the client sends meanwhile (hundreds of MiB on loopback).
    @Test(.timeLimit(.minutes(1)))
    func largeUploadStreamsWithBoundedMemory() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                let warmup = try await StreamingClient.connect(port: proxy.port)
                // Warm up every component once, so first-use allocations do not count as growth.
                try await warmup.send("POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: \(4 * Self.mebibyte)\r\n\r\n")
                try await warmup.sendBody(count: 4 * Self.mebibyte)
                _ = try await warmup.wait(timeout: .seconds(10)) { $0.headComplete && $0.bodyBytes >= 7 }
                await warmup.close()
                let before = try #require(residentMemory())

                let client = try await StreamingClient.connect(port: proxy.port)
                defer { Task { await client.close() } }
                try await client.send("POST /upload?pause=500 HTTP/1.1\r\nHost: test\r\nContent-Length: \(Self.largeBody)\r\n\r\n")
                let sending = Task { try await client.sendBody(count: Self.largeBody) }
                let expected = String(Self.largeBody)
                let (state, peak) = try await Self.sampleMemory(from: before, timeout: .seconds(20)) {
                    let state = client.snapshot
                    return (state.headComplete && state.bodyBytes >= expected.utf8.count) || state.closed ? state : nil
                }
                try await sending.value

                let head = try #require(client.responseHead)
                #expect(head.status == 200)
                #expect(String(decoding: try #require(state).firstBodyBytes, as: UTF8.self) == expected)
                #expect(origin.lastRequest?.bodyLength == Self.largeBody)
                #expect(peak - before < Self.allowedGrowth, "RSS grew by \((peak - before) / Self.mebibyte) MiB")
            }
        }
    }

    /// The client stops reading for half a second early on: without back-pressure the proxy would buffer everything
    /// the backend sends meanwhile.
    @Test(.timeLimit(.minutes(1)))
    func largeDownloadStreamsWithBoundedMemory() async throws {
        try await withOrigin { origin in
            try await withProxy(backends: [(id: "o", port: origin.port)]) { proxy in
                let warmup = try await StreamingClient.connect(port: proxy.port)
                try await warmup.send("GET /download/\(4 * Self.mebibyte) HTTP/1.1\r\nHost: test\r\n\r\n")
                _ = try await warmup.wait(timeout: .seconds(10)) { $0.bodyBytes >= 4 * Self.mebibyte }
                await warmup.close()
                let before = try #require(residentMemory())

                let client = try await StreamingClient.connect(port: proxy.port)
                defer { Task { await client.close() } }
                try await client.send("GET /download/\(Self.largeBody) HTTP/1.1\r\nHost: test\r\n\r\n")
                _ = try await client.wait(timeout: .seconds(10)) { $0.bodyBytes >= 8 * Self.mebibyte }
                let pausing = Task { try await client.pauseReading(for: .milliseconds(500)) }
                let (state, peak) = try await Self.sampleMemory(from: before, timeout: .seconds(20)) {
                    let state = client.snapshot
                    return state.bodyBytes >= Self.largeBody || state.closed ? state : nil
                }
                try await pausing.value

                let head = try #require(client.responseHead)
                #expect(head.status == 200)
                #expect(head.header("content-length") == String(Self.largeBody))
                #expect(state?.bodyBytes == Self.largeBody)
                #expect(state?.closed == false)
                #expect(peak - before < Self.allowedGrowth, "RSS grew by \((peak - before) / Self.mebibyte) MiB")
            }
        }
    }

    /// Polls `done` every 20 ms until it returns a value or the timeout passes, tracking the highest RSS seen.
    private static func sampleMemory<T>(
        from start: Int, timeout: Duration, done: () -> T?
    ) async throws -> (T?, peak: Int) {
        var peak = start
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            peak = max(peak, residentMemory() ?? 0)
            if let result = done() { return (result, peak) }
            try await Task.sleep(for: .milliseconds(20))
        }
        return (nil, max(peak, residentMemory() ?? 0))
    }

    @Test func backendKilledMidDownloadClosesClient() async throws {
        let doomed = try await TestOrigin.start()
        defer { Task { await doomed.stop() } }
        try await withProxyAndHealthyBackend(backends: [(id: "doomed", port: doomed.port)]) { proxy, _ in
            let client = try await StreamingClient.connect(port: proxy.port)
            defer { Task { await client.close() } }
            try await client.send("GET /download/\(Self.largeBody) HTTP/1.1\r\nHost: test\r\n\r\n")
            let started = try await client.wait(timeout: .seconds(10)) { $0.bodyBytes >= Self.mebibyte }
            #expect(started.bodyBytes >= Self.mebibyte)
            await doomed.stop()
            let ended = try await client.wait(timeout: .seconds(10)) { $0.closed }
            #expect(ended.closed, "the client connection must close when the backend dies mid-response")
            #expect(ended.bodyBytes < Self.largeBody)
            try await expectProxyStillServes(proxy)
        }
    }
}
