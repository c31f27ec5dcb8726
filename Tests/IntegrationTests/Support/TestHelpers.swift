import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ProxyCore
import Testing

/// Sends a request carrying `x-test-backend: <id>` to that backend, and everything else to the listener's pool: lets
/// a test whose main pool is broken on purpose check that the same proxy still serves a healthy backend.
final class HeaderRoutingPolicy: RoutingPolicy {
    let pool: String

    init(pool: String) {
        self.pool = pool
    }

    func route(_ request: RouteRequest) throws -> RouteDecision {
        if let id = request.headers.first(name: "x-test-backend") { return .backend(id) }
        return .pool(self.pool)
    }

    static let factory: RoutingPolicyFactory = { listener, _, _ in HeaderRoutingPolicy(pool: listener.pool) }
}

extension ProxyConfig {
    /// Adds a pool `spare` holding one backend `healthy`, reachable with `x-test-backend: healthy`.
    mutating func addHealthyBackend(port: Int) {
        self.pools.append(PoolConfig(name: "spare", backends: [BackendConfig(id: "healthy", host: "127.0.0.1", port: port)]))
    }
}

/// Starts a proxy whose main pool is `backends` and which can also reach `healthy` (see `HeaderRoutingPolicy`).
func withProxyAndHealthyBackend<T>(
    backends: [(id: String, port: Int)],
    configure: @escaping (inout ProxyConfig) -> Void = { _ in },
    _ body: (ProxyHarness, TestOrigin) async throws -> T
) async throws -> T {
    try await withOrigin { healthy in
        try await withProxy(
            backends: backends,
            policyFactory: HeaderRoutingPolicy.factory,
            configure: { config in
                config.addHealthyBackend(port: healthy.port)
                configure(&config)
            }
        ) { proxy in
            try await body(proxy, healthy)
        }
    }
}

/// Checks that a fresh client connection still gets a normal answer from the healthy backend.
///
/// `timeoutRetries`: for a proxy configured with a response timeout short enough that the healthy backend (an
/// in-process server, starved now and then in the parallel test run) may miss it, how many further tries a `504`
/// gets. Any other answer counts at once.
func expectProxyStillServes(
    _ proxy: ProxyHarness, timeoutRetries: Int = 0, sourceLocation: SourceLocation = #_sourceLocation
) async throws {
    for attempt in 0...timeoutRetries {
        let connection = try await RawHTTPConnection.connect(port: proxy.port)
        defer { Task { await connection.close() } }
        try await connection.send("POST /echo HTTP/1.1\r\nHost: test\r\nx-test-backend: healthy\r\nContent-Length: 5\r\n\r\nstill")
        let response = try await connection.readResponse()
        if response.status == 504, attempt < timeoutRetries { continue }
        #expect(response.status == 200, sourceLocation: sourceLocation)
        #expect(response.bodyText == "still", sourceLocation: sourceLocation)
        return
    }
}

/// Checks a local error answer: its status, that it closes (when asked), that the body says why, and that it gives
/// nothing away about the backend's address.
func expectErrorResponse(
    _ response: RawHTTPConnection.Response,
    status: Int,
    reasonContains reason: String,
    backendPort: Int?,
    sourceLocation: SourceLocation = #_sourceLocation
) {
    #expect(response.status == status, sourceLocation: sourceLocation)
    #expect(response.bodyText.lowercased().contains(reason.lowercased()), "body: \(response.bodyText)", sourceLocation: sourceLocation)
    #expect(!response.bodyText.contains("127.0.0.1"), sourceLocation: sourceLocation)
    if let backendPort {
        #expect(!response.bodyText.contains(String(backendPort)), sourceLocation: sourceLocation)
        let headerText = response.headers.map { "\($0.0): \($0.1)" }.joined(separator: "\n")
        #expect(!headerText.contains(String(backendPort)), sourceLocation: sourceLocation)
    }
}

/// Resident set size of this process (Linux `/proc/self/status`), in bytes; nil where that file does not exist.
func residentMemory() -> Int? {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return nil }
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        let fields = line.split(separator: " ", omittingEmptySubsequences: true)
        guard fields.count >= 2, let kilobytes = Int(fields[1]) else { return nil }
        return kilobytes * 1024
    }
    return nil
}

/// A client for huge bodies: streams a request body of any size with back-pressure (a chunk is written once the
/// previous one was), and counts response body bytes instead of keeping them.
final class StreamingClient: Sendable {
    struct State {
        var head: [UInt8] = []
        var headComplete = false
        var bodyBytes = 0
        var closed = false
        var firstBodyBytes: [UInt8] = []
    }

    let channel: Channel
    private let state: NIOLockedValueBox<State>

    private init(channel: Channel, state: NIOLockedValueBox<State>) {
        self.channel = channel
        self.state = state
    }

    static func connect(port: Int, group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> StreamingClient {
        let state = NIOLockedValueBox(State())
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(Counter(state: state))
                }
            }
            .connect(host: "127.0.0.1", port: port)
            .get()
        return StreamingClient(channel: channel, state: state)
    }

    func send(_ text: String) async throws {
        try await self.channel.writeAndFlush(ByteBuffer(string: text))
    }

    /// Writes `count` bytes of filler in 64 KiB chunks, each after the previous write completed.
    func sendBody(count: Int) async throws {
        var chunk = self.channel.allocator.buffer(capacity: 64 * 1024)
        chunk.writeRepeatingByte(UInt8(ascii: "u"), count: 64 * 1024)
        var remaining = count
        while remaining > 0 {
            let size = min(remaining, chunk.readableBytes)
            try await self.channel.writeAndFlush(chunk.getSlice(at: 0, length: size)!)
            remaining -= size
        }
    }

    /// Stops reading for `duration` (a slow client), then resumes.
    func pauseReading(for duration: Duration) async throws {
        try await self.channel.setOption(.autoRead, value: false).get()
        try await Task.sleep(for: duration)
        try await self.channel.setOption(.autoRead, value: true).get()
        self.channel.read()
    }

    var snapshot: State { self.state.withLockedValue { $0 } }

    /// The response head's status and headers, once complete.
    var responseHead: RawHTTPConnection.Response? {
        let state = self.snapshot
        guard state.headComplete else { return nil }
        guard case .complete(let response, _) = RawHTTPConnection.parse(state.head + [13, 10, 13, 10], method: "HEAD", closed: false)
        else { return nil }
        return response
    }

    /// Waits until `condition` holds for the state or the timeout passes; returns the last state seen.
    func wait(timeout: Duration, until condition: (State) -> Bool) async throws -> State {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let state = self.snapshot
            if condition(state) { return state }
            try await Task.sleep(for: .milliseconds(5))
        }
        return self.snapshot
    }

    func close() async {
        try? await self.channel.close()
    }

    private final class Counter: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let state: NIOLockedValueBox<State>

        init(state: NIOLockedValueBox<State>) {
            self.state = state
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = Self.unwrapInboundIn(data)
            self.state.withLockedValue { state in
                if state.headComplete {
                    if state.firstBodyBytes.count < 16 {
                        state.firstBodyBytes.append(contentsOf: buffer.readableBytesView.prefix(16 - state.firstBodyBytes.count))
                    }
                    state.bodyBytes += buffer.readableBytes
                    return
                }
                state.head.append(contentsOf: buffer.readableBytesView)
                if let end = RawHTTPConnection.find([13, 10, 13, 10], in: state.head, from: 0) {
                    let rest = Array(state.head[(end + 4)...])
                    state.head.removeSubrange(end...)
                    state.headComplete = true
                    state.bodyBytes = rest.count
                    state.firstBodyBytes = Array(rest.prefix(16))
                }
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            self.state.withLockedValue { $0.closed = true }
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            context.close(promise: nil)
        }
    }
}
