import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// Helpers for the WebSocket, shutdown and CLI integration tests. Names are prefixed or namespaced so they do not
/// collide with helpers written for other test files.
enum WSSupport {
    struct TimedOut: Error, CustomStringConvertible {
        var what: String
        var description: String { "timed out: \(self.what)" }
    }

    /// Runs `operation`, cancelling it and throwing `TimedOut` if it takes longer than `timeout`.
    static func withTimeout<T: Sendable>(
        _ timeout: Duration,
        _ what: String = "operation",
        _ operation: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        try await withThrowingTaskGroup(of: T.self) { group in
            group.addTask { try await operation() }
            group.addTask {
                try await Task.sleep(for: timeout)
                throw TimedOut(what: what)
            }
            defer { group.cancelAll() }
            return try await group.next()!
        }
    }

    /// Polls `condition` every 10 ms; true as soon as it holds, false if it never did within `timeout`.
    static func waitUntil(timeout: Duration = .seconds(5), _ condition: () async throws -> Bool) async rethrows -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try await condition() { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return try await condition()
    }

    /// The resident set size of this process, from `/proc/self/status` (Linux), in bytes.
    static func residentBytes() -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return nil }
        for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 2, let kib = Int(fields[1]) else { return nil }
            return kib * 1024
        }
        return nil
    }

    /// The sample key and accept value of RFC 6455 §1.3: a hand-written handshake needs no SHA-1.
    static let sampleKey = "dGhlIHNhbXBsZSBub25jZQ=="
    static let sampleAccept = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

    static func upgradeRequest(path: String, host: String = "example") -> String {
        "GET \(path) HTTP/1.1\r\nHost: \(host)\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            + "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: \(sampleKey)\r\n\r\n"
    }

    /// The number of members `RoomServer` reports for a room, asked directly (not through the proxy).
    static func roomMembers(_ room: String, backendPort: Int) async throws -> Int? {
        let connection = try await RawHTTPConnection.connect(port: backendPort)
        defer { Task { await connection.close() } }
        try await connection.send("GET /rooms/\(room) HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        let response = try await connection.readResponse()
        guard let object = try JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any] else { return nil }
        return object["members"] as? Int
    }
}

// MARK: - A backend that floods an upgraded connection

/// A raw TCP server that answers any request with `101 Switching Protocols` (plus `greeting` in the same write, so
/// it arrives right behind the head), records what the client sends after its request head, and then writes `limit`
/// bytes as fast as the socket takes them, respecting its own channel's writability (so its own memory stays bounded).
final class FloodBackend: Sendable {
    let port: Int
    private let serverChannel: Channel
    private let written: NIOLockedValueBox<Int>
    private let upgraded: NIOLockedValueBox<Int>
    private let received: NIOLockedValueBox<[UInt8]>

    /// What clients sent after their request heads (the first 64 KiB).
    var receivedText: String { String(decoding: self.received.withLockedValue { $0 }, as: UTF8.self) }

    /// Bytes handed to the socket so far (across all connections).
    var bytesWritten: Int { self.written.withLockedValue { $0 } }
    /// Connections that received their 101.
    var upgradedConnections: Int { self.upgraded.withLockedValue { $0 } }

    private init(
        port: Int, serverChannel: Channel, written: NIOLockedValueBox<Int>, upgraded: NIOLockedValueBox<Int>,
        received: NIOLockedValueBox<[UInt8]>
    ) {
        self.port = port
        self.serverChannel = serverChannel
        self.written = written
        self.upgraded = upgraded
        self.received = received
    }

    static func start(
        limit: Int, greeting: String = "", group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) async throws -> FloodBackend {
        let written = NIOLockedValueBox(0)
        let upgraded = NIOLockedValueBox(0)
        let received = NIOLockedValueBox<[UInt8]>([])
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        FloodHandler(limit: limit, greeting: greeting, written: written, upgraded: upgraded, received: received))
                }
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        return FloodBackend(
            port: channel.localAddress!.port!, serverChannel: channel, written: written, upgraded: upgraded, received: received)
    }

    func stop() async {
        try? await self.serverChannel.close()
    }

    private final class FloodHandler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer

        private let limit: Int
        private let greeting: String
        private let written: NIOLockedValueBox<Int>
        private let upgraded: NIOLockedValueBox<Int>
        private let received: NIOLockedValueBox<[UInt8]>
        private var request: [UInt8] = []
        private var streaming = false
        private var sent = 0
        private var chunk: ByteBuffer

        init(
            limit: Int, greeting: String, written: NIOLockedValueBox<Int>, upgraded: NIOLockedValueBox<Int>,
            received: NIOLockedValueBox<[UInt8]>
        ) {
            self.limit = limit
            self.greeting = greeting
            self.written = written
            self.upgraded = upgraded
            self.received = received
            self.chunk = ByteBuffer(repeating: 0x5A, count: 64 * 1024)
        }

        private func record(_ bytes: some Collection<UInt8>) {
            self.received.withLockedValue { received in
                received.append(contentsOf: bytes.prefix(max(0, 64 * 1024 - received.count)))
            }
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = Self.unwrapInboundIn(data)
            guard !self.streaming else {
                self.record(buffer.readableBytesView)
                return
            }
            self.request.append(contentsOf: buffer.readableBytesView)
            guard let end = RawHTTPConnection.find([13, 10, 13, 10], in: self.request, from: 0) else { return }
            self.streaming = true
            self.record(self.request[(end + 4)...])
            let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + "Sec-WebSocket-Accept: \(WSSupport.sampleAccept)\r\n\r\n"
            context.writeAndFlush(Self.wrapOutboundOut(ByteBuffer(string: head + self.greeting)), promise: nil)
            self.upgraded.withLockedValue { $0 += 1 }
            self.pump(context: context)
        }

        func channelWritabilityChanged(context: ChannelHandlerContext) {
            if self.streaming { self.pump(context: context) }
            context.fireChannelWritabilityChanged()
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            context.close(promise: nil)
        }

        /// Writes 64 KiB chunks while the channel is writable (the payload is not WebSocket-framed: the proxy relays
        /// bytes without looking at them).
        private func pump(context: ChannelHandlerContext) {
            while context.channel.isActive && context.channel.isWritable && self.sent < self.limit {
                let size = min(self.chunk.readableBytes, self.limit - self.sent)
                self.sent += size
                self.written.withLockedValue { $0 += size }
                context.writeAndFlush(Self.wrapOutboundOut(self.chunk.getSlice(at: 0, length: size)!), promise: nil)
            }
        }
    }
}

// MARK: - A client that stops reading

/// A raw client that sends an upgrade request (with `extra` bytes in the same write), reads just the response head by
/// hand (`autoRead` is off), and then reads nothing more until `resumeReading()`.
final class StalledUpgradeClient: Sendable {
    let channel: Channel
    private let received: NIOLockedValueBox<[UInt8]>
    private let count: NIOLockedValueBox<Int>

    /// Everything received, response head included (the first 64 KiB).
    var receivedText: String { String(decoding: self.received.withLockedValue { $0 }, as: UTF8.self) }

    private init(channel: Channel, received: NIOLockedValueBox<[UInt8]>, count: NIOLockedValueBox<Int>) {
        self.channel = channel
        self.received = received
        self.count = count
    }

    /// Bytes received after the response head (the tunnel's payload).
    var payloadBytes: Int { self.count.withLockedValue { $0 } }

    /// Connects with `autoRead` off and a small receive buffer, sends the upgrade request and returns the status
    /// line once the response head has arrived.
    static func connect(port: Int, path: String, extra: String = "") async throws -> (StalledUpgradeClient, String) {
        let received = NIOLockedValueBox<[UInt8]>([])
        let count = NIOLockedValueBox(0)
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.autoRead, value: false)
            .channelOption(.socketOption(.so_rcvbuf), value: 64 * 1024)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(HeadCollector(received: received, count: count))
                }
            }
            .connect(host: "127.0.0.1", port: port)
            .get()
        let client = StalledUpgradeClient(channel: channel, received: received, count: count)
        try await channel.writeAndFlush(ByteBuffer(string: WSSupport.upgradeRequest(path: path) + extra))
        let deadline = ContinuousClock.now + .seconds(5)
        while true {
            let bytes = received.withLockedValue { $0 }
            if let end = RawHTTPConnection.find([13, 10, 13, 10], in: bytes, from: 0) {
                let head = String(decoding: bytes[..<end], as: UTF8.self)
                return (client, head.components(separatedBy: "\r\n").first ?? "")
            }
            guard ContinuousClock.now < deadline, channel.isActive else {
                throw WSSupport.TimedOut(what: "upgrade response head")
            }
            // One read at a time, only until the head is complete: the payload behind it is left in the socket.
            channel.read()
            try await Task.sleep(for: .milliseconds(5))
        }
    }

    func resumeReading() async throws {
        try await self.channel.setOption(.autoRead, value: true).get()
    }

    func close() async {
        try? await self.channel.close()
    }

    private final class HeadCollector: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let received: NIOLockedValueBox<[UInt8]>
        let count: NIOLockedValueBox<Int>
        private var headDone = false

        init(received: NIOLockedValueBox<[UInt8]>, count: NIOLockedValueBox<Int>) {
            self.received = received
            self.count = count
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = Self.unwrapInboundIn(data)
            let headDone = self.headDone
            let all = self.received.withLockedValue { bytes -> [UInt8] in
                bytes.append(contentsOf: buffer.readableBytesView.prefix(max(0, 64 * 1024 - bytes.count)))
                return headDone ? [] : bytes
            }
            if headDone {
                self.count.withLockedValue { $0 += buffer.readableBytes }
                return
            }
            if let end = RawHTTPConnection.find([13, 10, 13, 10], in: all, from: 0) {
                self.headDone = true
                self.count.withLockedValue { $0 += all.count - (end + 4) }
            }
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            context.close(promise: nil)
        }
    }
}

// MARK: - An origin that answers slowly

/// A tiny HTTP/1.1 origin that answers every request with `200` and `body`, after `delay`.
final class DelayedOrigin: Sendable {
    let port: Int
    private let serverChannel: Channel
    private let served: NIOLockedValueBox<Int>
    private let received: NIOLockedValueBox<Int>

    /// Responses fully written so far.
    var responsesSent: Int { self.served.withLockedValue { $0 } }
    /// Complete requests received so far.
    var requestsReceived: Int { self.received.withLockedValue { $0 } }

    private init(port: Int, serverChannel: Channel, served: NIOLockedValueBox<Int>, received: NIOLockedValueBox<Int>) {
        self.port = port
        self.serverChannel = serverChannel
        self.served = served
        self.received = received
    }

    static func start(delay: TimeAmount, body: String = "slow ok\n") async throws -> DelayedOrigin {
        let served = NIOLockedValueBox(0)
        let received = NIOLockedValueBox(0)
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(Handler(delay: delay, body: body, served: served, received: received))
                }
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        return DelayedOrigin(port: channel.localAddress!.port!, serverChannel: channel, served: served, received: received)
    }

    func stop() async {
        try? await self.serverChannel.close()
    }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart

        let delay: TimeAmount
        let body: String
        let served: NIOLockedValueBox<Int>
        let received: NIOLockedValueBox<Int>

        init(delay: TimeAmount, body: String, served: NIOLockedValueBox<Int>, received: NIOLockedValueBox<Int>) {
            self.delay = delay
            self.body = body
            self.served = served
            self.received = received
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard case .end = Self.unwrapInboundIn(data) else { return }
            self.received.withLockedValue { $0 += 1 }
            let body = self.body
            let served = self.served
            context.eventLoop.assumeIsolated().scheduleTask(in: self.delay) {
                guard context.channel.isActive else { return }
                var headers = HTTPHeaders()
                headers.add(name: "content-type", value: "text/plain")
                headers.add(name: "content-length", value: String(body.utf8.count))
                context.write(Self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))), promise: nil)
                context.write(Self.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
                context.writeAndFlush(Self.wrapOutboundOut(.end(nil))).assumeIsolated().whenSuccess {
                    served.withLockedValue { $0 += 1 }
                }
            }
        }
    }
}
