import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A client connection that sends exact bytes and reads raw bytes back, so tests can speak malformed HTTP and check
/// the precise framing the proxy produces.
final class RawHTTPConnection: Sendable {
    struct Response: Sendable {
        var status: Int
        var headers: [(String, String)]
        var body: [UInt8]

        func header(_ name: String) -> String? {
            self.headers.first { $0.0.lowercased() == name.lowercased() }?.1
        }
        func headers(_ name: String) -> [String] {
            self.headers.filter { $0.0.lowercased() == name.lowercased() }.map(\.1)
        }
        var bodyText: String { String(decoding: self.body, as: UTF8.self) }
    }

    enum Failure: Error { case timedOut, closedBeforeResponse, malformed(String) }

    let channel: Channel
    private let state: NIOLockedValueBox<(buffer: [UInt8], closed: Bool)>

    private init(channel: Channel, state: NIOLockedValueBox<(buffer: [UInt8], closed: Bool)>) {
        self.channel = channel
        self.state = state
    }

    /// - Parameter receiveBuffer: the socket's `SO_RCVBUF`, set before it connects (so the window it offers is small).
    static func connect(
        port: Int, group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton, receiveBuffer: Int? = nil
    ) async throws -> RawHTTPConnection {
        let state = NIOLockedValueBox<(buffer: [UInt8], closed: Bool)>(([], false))
        var bootstrap = ClientBootstrap(group: group)
        if let receiveBuffer { bootstrap = bootstrap.channelOption(.socketOption(.so_rcvbuf), value: receiveBuffer) }
        let channel = try await bootstrap
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(Collector(state: state))
                }
            }
            .connect(host: "127.0.0.1", port: port)
            .get()
        return RawHTTPConnection(channel: channel, state: state)
    }

    func send(_ text: String) async throws {
        try await self.channel.writeAndFlush(ByteBuffer(string: text))
    }

    func send(bytes: [UInt8]) async throws {
        try await self.channel.writeAndFlush(ByteBuffer(bytes: bytes))
    }

    var isClosed: Bool { self.state.withLockedValue { $0.closed } }

    func close() async {
        try? await self.channel.close()
    }

    /// Waits until the peer closes the connection (or the timeout passes) and returns everything received.
    func readUntilClosed(timeout: Duration = .seconds(5)) async throws -> [UInt8] {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if self.isClosed { break }
            try await Task.sleep(for: .milliseconds(5))
        }
        guard self.isClosed else { throw Failure.timedOut }
        return self.state.withLockedValue { state in
            defer { state.buffer.removeAll() }
            return state.buffer
        }
    }

    /// Waits until at least `count` unread bytes have arrived and returns exactly `count` of them.
    func readBytes(count: Int, timeout: Duration = .seconds(5)) async throws -> [UInt8] {
        let deadline = ContinuousClock.now + timeout
        while true {
            let bytes: [UInt8]? = self.state.withLockedValue { state in
                guard state.buffer.count >= count else { return nil }
                defer { state.buffer.removeFirst(count) }
                return Array(state.buffer.prefix(count))
            }
            if let bytes { return bytes }
            if self.isClosed { throw Failure.closedBeforeResponse }
            if ContinuousClock.now > deadline { throw Failure.timedOut }
            try await Task.sleep(for: .milliseconds(2))
        }
    }

    /// Waits for the connection to close; true if it did within the timeout.
    func waitForClose(timeout: Duration = .seconds(5)) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if self.isClosed { return true }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return self.isClosed
    }

    /// Reads one complete response, framed by Content-Length, chunked encoding, or close.
    func readResponse(forMethod method: String = "GET", timeout: Duration = .seconds(5)) async throws -> Response {
        let deadline = ContinuousClock.now + timeout
        while true {
            let attempt: Result<Response, Failure>? = self.state.withLockedValue { state in
                switch RawHTTPConnection.parse(state.buffer, method: method, closed: state.closed) {
                case .complete(let response, let consumed):
                    state.buffer.removeFirst(consumed)
                    return .success(response)
                case .incomplete:
                    return state.closed ? .failure(.closedBeforeResponse) : nil
                case .malformed(let why):
                    return .failure(.malformed(why))
                }
            }
            if let attempt { return try attempt.get() }
            if ContinuousClock.now > deadline { throw Failure.timedOut }
            try await Task.sleep(for: .milliseconds(2))
        }
    }

    enum ParseResult {
        case complete(Response, consumed: Int)
        case incomplete
        case malformed(String)
    }

    static func parse(_ bytes: [UInt8], method: String, closed: Bool) -> ParseResult {
        guard let headEnd = find([13, 10, 13, 10], in: bytes, from: 0) else { return .incomplete }
        let headText = String(decoding: bytes[0..<headEnd], as: UTF8.self)
        var lines = headText.components(separatedBy: "\r\n")
        let statusLine = lines.removeFirst()
        let statusParts = statusLine.split(separator: " ", maxSplits: 2)
        guard statusParts.count >= 2, let status = Int(statusParts[1]) else { return .malformed(statusLine) }
        let headers: [(String, String)] = lines.compactMap { line in
            guard let colon = line.firstIndex(of: ":") else { return nil }
            return (String(line[..<colon]), line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces))
        }
        var response = Response(status: status, headers: headers, body: [])
        let bodyStart = headEnd + 4
        if (100..<200).contains(status) || status == 204 || status == 304 || method == "HEAD" {
            return .complete(response, consumed: bodyStart)
        }
        if response.header("transfer-encoding")?.lowercased() == "chunked" {
            var index = bodyStart
            var body: [UInt8] = []
            while true {
                guard let lineEnd = find([13, 10], in: bytes, from: index) else { return .incomplete }
                let sizeText = String(decoding: bytes[index..<lineEnd], as: UTF8.self).split(separator: ";").first ?? ""
                guard let size = Int(sizeText.trimmingCharacters(in: .whitespaces), radix: 16) else {
                    return .malformed("chunk size '\(sizeText)'")
                }
                index = lineEnd + 2
                if size == 0 {
                    // Trailers, if any, end with an empty line.
                    guard let trailerEnd = find([13, 10], in: bytes, from: index) else { return .incomplete }
                    var cursor = trailerEnd
                    var start = index
                    while cursor != start {
                        start = cursor + 2
                        guard let next = find([13, 10], in: bytes, from: start) else { return .incomplete }
                        cursor = next
                    }
                    response.body = body
                    return .complete(response, consumed: cursor + 2)
                }
                guard bytes.count >= index + size + 2 else { return .incomplete }
                body.append(contentsOf: bytes[index..<index + size])
                index += size + 2
            }
        }
        if let lengthText = response.header("content-length"), let length = Int(lengthText) {
            guard bytes.count >= bodyStart + length else { return .incomplete }
            response.body = Array(bytes[bodyStart..<bodyStart + length])
            return .complete(response, consumed: bodyStart + length)
        }
        guard closed else { return .incomplete }
        response.body = Array(bytes[bodyStart...])
        return .complete(response, consumed: bytes.count)
    }

    static func find(_ needle: [UInt8], in haystack: [UInt8], from start: Int) -> Int? {
        guard haystack.count >= needle.count, start <= haystack.count - needle.count else { return nil }
        var i = start
        while i <= haystack.count - needle.count {
            if haystack[i] == needle[0] && Array(haystack[i..<i + needle.count]) == needle { return i }
            i += 1
        }
        return nil
    }

    private final class Collector: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let state: NIOLockedValueBox<(buffer: [UInt8], closed: Bool)>

        init(state: NIOLockedValueBox<(buffer: [UInt8], closed: Bool)>) {
            self.state = state
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = Self.unwrapInboundIn(data)
            self.state.withLockedValue { $0.buffer.append(contentsOf: buffer.readableBytesView) }
        }

        func channelInactive(context: ChannelHandlerContext) {
            self.state.withLockedValue { $0.closed = true }
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            context.close(promise: nil)
        }
    }
}
