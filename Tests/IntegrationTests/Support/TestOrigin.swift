import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// An in-process HTTP/1.1 backend on an ephemeral loopback port that records every request it receives.
///
/// Paths:
/// - `/echo`: 200, body = request body, plus `x-origin-method` and `x-origin-uri`.
/// - `/chunked`: a chunked response of several parts (`?trailers` adds a trailer field).
/// - `/status/{code}`: that status; 204 and 304 without a body, others with a short one.
/// - `/head`: a fixed body for GET; HEAD gets the same `Content-Length` and no body.
/// - `/slow/{ms}`: the response head is sent after `ms` milliseconds.
/// - `/download/{bytes}`: that many bytes in 64 KiB chunks, each written once the previous write completed.
/// - `/upload`: consumes a body of any size without keeping it and answers with the byte count; `?pause={ms}` stops
///   reading for that long after the first body part (a slow backend, to exercise back-pressure).
/// - `/continue`: sends `100 Continue` when asked to (`Expect: 100-continue`), then echoes the body.
/// - anything else: 404.
final class TestOrigin: Sendable {
    struct Request: Sendable {
        var head: HTTPRequestHead
        /// The whole body, except for `/upload` (counted in `bodyLength` only, so huge uploads are not kept).
        var body: [UInt8]
        var bodyLength: Int
        var trailers: HTTPHeaders?

        var bodyText: String { String(decoding: self.body, as: UTF8.self) }
    }

    static let headBody = String(repeating: "head-body ", count: 123)
    static let chunkedParts = ["first part\n", "second, longer part: " + String(repeating: "x", count: 3000) + "\n", "third\n", "last\n"]

    let port: Int
    private let serverChannel: Channel
    private let state: NIOLockedValueBox<State>

    struct State {
        var accepted = 0
        var requests: [Request] = []
        var open: [ObjectIdentifier: Channel] = [:]
    }

    private init(port: Int, serverChannel: Channel, state: NIOLockedValueBox<State>) {
        self.port = port
        self.serverChannel = serverChannel
        self.state = state
    }

    static func start(group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> TestOrigin {
        let state = NIOLockedValueBox(State())
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                state.withLockedValue {
                    $0.accepted += 1
                    $0.open[ObjectIdentifier(channel)] = channel
                }
                channel.closeFuture.whenComplete { _ in
                    _ = state.withLockedValue { $0.open.removeValue(forKey: ObjectIdentifier(channel)) }
                }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(TestOriginHandler(state: state))
                }
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        return TestOrigin(port: channel.localAddress!.port!, serverChannel: channel, state: state)
    }

    /// TCP connections accepted so far.
    var acceptedConnections: Int { self.state.withLockedValue { $0.accepted } }
    /// Connections currently open to this origin.
    var openConnections: Int { self.state.withLockedValue { $0.open.count } }
    /// Every complete request received so far, in order of completion.
    var requests: [Request] { self.state.withLockedValue { $0.requests } }
    var lastRequest: Request? { self.requests.last }

    func stop() async {
        try? await self.serverChannel.close()
        for channel in self.state.withLockedValue({ Array($0.open.values) }) {
            try? await channel.close()
        }
    }
}

/// Runs `body` with a started `TestOrigin` and always stops it.
func withOrigin<T>(_ body: (TestOrigin) async throws -> T) async throws -> T {
    let origin = try await TestOrigin.start()
    do {
        let result = try await body(origin)
        await origin.stop()
        return result
    } catch {
        await origin.stop()
        throw error
    }
}

private final class TestOriginHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private enum Route {
        case echo, chunked, status(Int), head, slow(Int), download(Int), upload(pause: Int?), expectContinue, notFound

        init(uri: String) {
            let halves = uri.split(separator: "?", maxSplits: 1).map(String.init)
            let path = halves.first ?? uri
            let query = halves.count > 1 ? halves[1] : ""
            let parts = path.split(separator: "/").map(String.init)
            switch (parts.first, parts.count) {
            case ("echo", 1): self = .echo
            case ("chunked", 1): self = .chunked
            case ("head", 1): self = .head
            case ("upload", 1):
                self = .upload(pause: query.hasPrefix("pause=") ? Int(query.dropFirst("pause=".count)) : nil)
            case ("continue", 1): self = .expectContinue
            case ("status", 2): self = Int(parts[1]).map { .status($0) } ?? .notFound
            case ("slow", 2): self = Int(parts[1]).map { .slow($0) } ?? .notFound
            case ("download", 2): self = Int(parts[1]).map { .download($0) } ?? .notFound
            default: self = .notFound
            }
        }
    }

    private let state: NIOLockedValueBox<TestOrigin.State>
    private var head: HTTPRequestHead?
    private var route: Route = .notFound
    private var body: [UInt8] = []
    private var bodyLength = 0
    private var paused = false

    init(state: NIOLockedValueBox<TestOrigin.State>) {
        self.state = state
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch Self.unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            self.route = Route(uri: head.uri)
            self.body = []
            self.bodyLength = 0
            if case .expectContinue = self.route,
                head.headers[canonicalForm: "expect"].contains(where: { $0.lowercased() == "100-continue" })
            {
                context.writeAndFlush(Self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .continue))), promise: nil)
            }
        case .body(let buffer):
            self.bodyLength += buffer.readableBytes
            if case .upload(let pause) = self.route {
                if let pause, !self.paused {
                    self.paused = true
                    self.pauseReading(for: .milliseconds(Int64(pause)), context: context)
                }
                return
            }
            self.body.append(contentsOf: buffer.readableBytesView)
        case .end(let trailers):
            guard let head = self.head else { return }
            self.head = nil
            let request = TestOrigin.Request(head: head, body: self.body, bodyLength: self.bodyLength, trailers: trailers)
            self.state.withLockedValue { $0.requests.append(request) }
            self.respond(to: request, context: context)
        }
    }

    private func respond(to request: TestOrigin.Request, context: ChannelHandlerContext) {
        let keepAlive = request.head.isKeepAlive
        switch self.route {
        case .echo:
            self.send(
                status: .ok, body: request.body,
                headers: [("x-origin-method", request.head.method.rawValue), ("x-origin-uri", request.head.uri)],
                keepAlive: keepAlive, context: context)
        case .expectContinue:
            self.send(status: .ok, body: request.body, keepAlive: keepAlive, context: context)
        case .chunked:
            context.write(Self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok))), promise: nil)
            for part in TestOrigin.chunkedParts {
                context.writeAndFlush(Self.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: part)))), promise: nil)
            }
            let trailers: HTTPHeaders? = request.head.uri.contains("trailers") ? ["x-trailer": "done"] : nil
            self.end(trailers: trailers, keepAlive: keepAlive, context: context)
        case .status(let code):
            let status = HTTPResponseStatus(statusCode: code)
            if code == 204 || code == 304 {
                var headers = HTTPHeaders()
                if code == 304 { headers.add(name: "etag", value: "\"v1\"") }
                context.write(Self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
                self.end(trailers: nil, keepAlive: keepAlive, context: context)
            } else {
                self.send(status: status, body: Array("status \(code)\n".utf8), keepAlive: keepAlive, context: context)
            }
        case .head:
            let body = Array(TestOrigin.headBody.utf8)
            if request.head.method == .HEAD {
                let headers: HTTPHeaders = ["content-length": String(body.count)]
                context.write(Self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))), promise: nil)
                self.end(trailers: nil, keepAlive: keepAlive, context: context)
            } else {
                self.send(status: .ok, body: body, keepAlive: keepAlive, context: context)
            }
        case .slow(let milliseconds):
            context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(Int64(milliseconds))) {
                self.send(status: .ok, body: Array("slow\n".utf8), keepAlive: keepAlive, context: context)
            }
        case .download(let total):
            let headers: HTTPHeaders = ["content-length": String(total)]
            context.write(Self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))), promise: nil)
            var chunk = context.channel.allocator.buffer(capacity: 64 * 1024)
            chunk.writeRepeatingByte(UInt8(ascii: "d"), count: 64 * 1024)
            self.writeDownload(remaining: total, chunk: chunk, keepAlive: keepAlive, context: context)
        case .upload:
            self.send(status: .ok, body: Array(String(request.bodyLength).utf8), keepAlive: keepAlive, context: context)
        case .notFound:
            self.send(status: .notFound, body: Array("not found\n".utf8), keepAlive: keepAlive, context: context)
        }
    }

    private func pauseReading(for delay: TimeAmount, context: ChannelHandlerContext) {
        let options = context.channel.syncOptions
        try? options?.setOption(.autoRead, value: false)
        context.eventLoop.assumeIsolated().scheduleTask(in: delay) {
            try? options?.setOption(.autoRead, value: true)
            context.read()
        }
    }

    /// Writes the next chunk only once the previous one was written: memory stays at one chunk however slow the
    /// reader. The next write is scheduled rather than run inline, so an immediately completed write cannot recurse.
    private func writeDownload(remaining: Int, chunk: ByteBuffer, keepAlive: Bool, context: ChannelHandlerContext) {
        guard remaining > 0 else {
            self.end(trailers: nil, keepAlive: keepAlive, context: context)
            return
        }
        let size = min(remaining, chunk.readableBytes)
        let slice = chunk.getSlice(at: chunk.readerIndex, length: size)!
        let loop = context.eventLoop.assumeIsolated()
        context.writeAndFlush(Self.wrapOutboundOut(.body(.byteBuffer(slice)))).assumeIsolated().whenComplete { result in
            guard case .success = result else { return }
            loop.execute {
                self.writeDownload(remaining: remaining - size, chunk: chunk, keepAlive: keepAlive, context: context)
            }
        }
    }

    private func send(
        status: HTTPResponseStatus, body: [UInt8], headers extra: [(String, String)] = [], keepAlive: Bool,
        context: ChannelHandlerContext
    ) {
        var headers = HTTPHeaders(extra)
        headers.add(name: "content-length", value: String(body.count))
        context.write(Self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        if !body.isEmpty {
            context.write(Self.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(bytes: body)))), promise: nil)
        }
        self.end(trailers: nil, keepAlive: keepAlive, context: context)
    }

    private func end(trailers: HTTPHeaders?, keepAlive: Bool, context: ChannelHandlerContext) {
        let written = context.writeAndFlush(Self.wrapOutboundOut(.end(trailers)))
        if !keepAlive {
            written.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        }
    }
}
