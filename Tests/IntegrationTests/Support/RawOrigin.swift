#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A scripted TCP backend: reads until the end of a request head (`\r\n\r\n`), writes exact bytes, and optionally
/// closes. For responses no real server would produce: truncated bodies, close-delimited bodies, garbage.
final class RawOrigin: Sendable {
    let port: Int
    private let serverChannel: Channel
    private let accepted: NIOLockedValueBox<Int>

    private init(port: Int, serverChannel: Channel, accepted: NIOLockedValueBox<Int>) {
        self.port = port
        self.serverChannel = serverChannel
        self.accepted = accepted
    }

    /// - Parameter closeOnNextRequest: keep the connection after answering, and close it without an answer when the
    ///   next request arrives on it (a backend closing an idle keep-alive connection just as the proxy reuses it).
    static func start(
        response: String, closeAfterResponse: Bool = true, closeOnNextRequest: Bool = false,
        group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) async throws -> RawOrigin {
        let accepted = NIOLockedValueBox(0)
        let bytes = Array(response.utf8)
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                accepted.withLockedValue { $0 += 1 }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ScriptedHandler(response: bytes, close: closeAfterResponse, closeOnNextRequest: closeOnNextRequest))
                }
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        return RawOrigin(port: channel.localAddress!.port!, serverChannel: channel, accepted: accepted)
    }

    var acceptedConnections: Int { self.accepted.withLockedValue { $0 } }

    func stop() async {
        try? await self.serverChannel.close()
    }

    private final class ScriptedHandler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer

        let response: [UInt8]
        let close: Bool
        let closeOnNextRequest: Bool
        var received: [UInt8] = []
        var answered = false

        init(response: [UInt8], close: Bool, closeOnNextRequest: Bool) {
            self.response = response
            self.close = close
            self.closeOnNextRequest = closeOnNextRequest
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard !self.answered else {
                if self.closeOnNextRequest { context.close(promise: nil) }
                return
            }
            self.received.append(contentsOf: Self.unwrapInboundIn(data).readableBytesView)
            guard RawHTTPConnection.find([13, 10, 13, 10], in: self.received, from: 0) != nil else { return }
            self.answered = true
            let written = context.writeAndFlush(Self.wrapOutboundOut(ByteBuffer(bytes: self.response)))
            if self.close {
                written.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            }
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            context.close(promise: nil)
        }
    }
}

/// A loopback port that refuses connections for as long as this value lives: the socket is bound (so no one else
/// can take the port) but never listens, so a connection attempt is answered with a reset.
final class RefusingPort {
    let port: Int
    private let fd: Int32

    init() throws {
        #if canImport(Glibc)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        #else
        let fd = socket(AF_INET, SOCK_STREAM, 0)
        #endif
        guard fd >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sockaddrPointer in
                bind(fd, sockaddrPointer, length) == 0 && getsockname(fd, sockaddrPointer, &length) == 0
            }
        }
        guard bound else {
            close(fd)
            throw IOError(errnoCode: errno, reason: "bind")
        }
        self.fd = fd
        self.port = Int(UInt16(bigEndian: address.sin_port))
    }

    deinit {
        close(self.fd)
    }
}

/// A listening socket that never accepts, with its accept queue filled: further connection attempts get no answer
/// at all (Linux drops the SYN while the queue is full), which makes a connect timeout deterministic on loopback.
final class BlackholeListener: Sendable {
    let port: Int
    private let serverChannel: Channel
    private let fillers: [Channel]

    private init(port: Int, serverChannel: Channel, fillers: [Channel]) {
        self.port = port
        self.serverChannel = serverChannel
        self.fillers = fillers
    }

    enum Failure: Error { case queueNeverFilled }

    static func start(group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> BlackholeListener {
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1)
            // No reads on the server channel means no accept() calls: connections stay in the kernel's queue.
            .serverChannelOption(.autoRead, value: false)
            .bind(host: "127.0.0.1", port: 0)
            .get()
        let port = server.localAddress!.port!
        var fillers: [Channel] = []
        // Connect until an attempt times out: from then on the queue is full and every SYN is dropped.
        for _ in 0..<16 {
            do {
                let filler = try await ClientBootstrap(group: group)
                    .connectTimeout(.milliseconds(200))
                    .connect(host: "127.0.0.1", port: port)
                    .get()
                fillers.append(filler)
            } catch ChannelError.connectTimeout {
                return BlackholeListener(port: port, serverChannel: server, fillers: fillers)
            }
        }
        for filler in fillers { try? await filler.close() }
        try? await server.close()
        throw Failure.queueNeverFilled
    }

    func stop() async {
        for filler in self.fillers { try? await filler.close() }
        try? await self.serverChannel.close()
    }
}

/// A scripted TCP backend that keeps its connections: the n-th request head on a connection gets `responses[n]`
/// (the last one again past the end), written exactly; with `closeAfterLast` the connection closes after the last.
/// For keep-alive connections whose later responses are unusual.
final class SequenceOrigin: Sendable {
    let port: Int
    private let serverChannel: Channel
    private let accepted: NIOLockedValueBox<Int>
    private let received: NIOLockedValueBox<[String]>

    private init(port: Int, serverChannel: Channel, accepted: NIOLockedValueBox<Int>, received: NIOLockedValueBox<[String]>) {
        self.port = port
        self.serverChannel = serverChannel
        self.accepted = accepted
        self.received = received
    }

    static func start(
        responses: [String], closeAfterLast: Bool = false, group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) async throws -> SequenceOrigin {
        let accepted = NIOLockedValueBox(0)
        let received = NIOLockedValueBox<[String]>([])
        let scripted = responses.map { Array($0.utf8) }
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                accepted.withLockedValue { $0 += 1 }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        Handler(responses: scripted, closeAfterLast: closeAfterLast, received: received))
                }
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        return SequenceOrigin(port: channel.localAddress!.port!, serverChannel: channel, accepted: accepted, received: received)
    }

    var acceptedConnections: Int { self.accepted.withLockedValue { $0 } }
    /// Every request head received, in order (over all connections).
    var requestHeads: [String] { self.received.withLockedValue { $0 } }

    func stop() async {
        try? await self.serverChannel.close()
    }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer

        let responses: [[UInt8]]
        let closeAfterLast: Bool
        let received: NIOLockedValueBox<[String]>
        var buffer: [UInt8] = []
        var answered = 0

        init(responses: [[UInt8]], closeAfterLast: Bool, received: NIOLockedValueBox<[String]>) {
            self.responses = responses
            self.closeAfterLast = closeAfterLast
            self.received = received
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            self.buffer.append(contentsOf: Self.unwrapInboundIn(data).readableBytesView)
            while let end = RawHTTPConnection.find([13, 10, 13, 10], in: self.buffer, from: 0) {
                let head = String(decoding: self.buffer[..<(end + 4)], as: UTF8.self)
                self.buffer.removeFirst(end + 4)
                self.received.withLockedValue { $0.append(head) }
                let response = self.responses[min(self.answered, self.responses.count - 1)]
                self.answered += 1
                let written = context.writeAndFlush(Self.wrapOutboundOut(ByteBuffer(bytes: response)))
                if self.closeAfterLast, self.answered >= self.responses.count {
                    written.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
                    return
                }
            }
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            context.close(promise: nil)
        }
    }
}
