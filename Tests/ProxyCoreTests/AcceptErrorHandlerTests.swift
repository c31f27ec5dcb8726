import Logging
import NIOCore
import NIOEmbedded
import NIOPosix
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

@testable import ProxyCore

/// The handler at the end of each listening socket's pipeline: what NIO reports there (a failed accept, a connection
/// that could not be set up) is logged, at most once per interval, with the count of the ones not logged; an accept
/// that failed for want of descriptors closes the connections waiting on the listener (`ListenerShedding`).
@Suite struct AcceptErrorHandlerTests {
    final class Lines: Sendable {
        let lines = Mutex<[(message: String, metadata: Logger.Metadata)]>([])
    }

    struct Capture: LogHandler {
        let lines: Lines
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { self.metadata[key] }
            set { self.metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            let entry = (message: "\(event.message)", metadata: self.metadata.merging(event.metadata ?? [:]) { $1 })
            self.lines.lines.withLock { $0.append(entry) }
        }
    }

    struct Refused: Error, CustomStringConvertible {
        var description: String { "setsockopt(SO_DEBUG) failed: permission denied" }
    }

    @Test func logsTheFirstErrorThenAtMostOnePerIntervalWithTheCountInBetween() throws {
        let lines = Lines()
        let logger = Logger(label: "test") { _ in Capture(lines: lines) }
        let clock = Mutex(NIODeadline.uptimeNanoseconds(1_000_000_000))
        let handler = AcceptErrorHandler(
            listener: "public", listeningFD: nil, logger: logger, interval: .seconds(10), now: { clock.withLock { $0 } })
        let channel = EmbeddedChannel(handler: handler)
        let advance = { (seconds: Int64) in clock.withLock { $0 = $0 + .seconds(seconds) } }

        channel.pipeline.fireErrorCaught(Refused())
        #expect(lines.lines.withLock { $0.count } == 1)
        advance(1)
        channel.pipeline.fireErrorCaught(Refused())
        advance(1)
        channel.pipeline.fireErrorCaught(Refused())
        #expect(lines.lines.withLock { $0.count } == 1, "within the interval nothing more is logged")
        advance(9)
        channel.pipeline.fireErrorCaught(Refused())

        let logged = lines.lines.withLock { $0 }
        try #require(logged.count == 2)
        #expect(logged[0].message == "could not accept or set up a connection")
        #expect(logged[0].metadata["listener"] == "public")
        #expect(logged[0].metadata["error"] == "setsockopt(SO_DEBUG) failed: permission denied")
        #expect(logged[0].metadata["not_logged_since"] == nil)
        #expect(logged[1].metadata["not_logged_since"] == "2")
        _ = try? channel.finish()
    }

    /// How many of the clients' connections ended.
    final class Ended: Sendable {
        let count = Mutex(0)
    }

    /// A listener that never accepts (reads off), with `count` connections waiting in its queue, and those clients.
    static func listenerWithWaiting(
        _ count: Int
    ) async throws -> (server: Channel, clients: [Channel], ended: Ended) {
        let group = MultiThreadedEventLoopGroup.singleton
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.autoRead, value: false)
            .bind(host: "127.0.0.1", port: 0).get()
        let ended = Ended()
        var clients: [Channel] = []
        for _ in 0..<count {
            clients.append(
                try await ClientBootstrap(group: group)
                    .channelInitializer { channel in
                        channel.closeFuture.whenComplete { _ in ended.count.withLock { $0 += 1 } }
                        return channel.eventLoop.makeSucceededVoidFuture()
                    }
                    .connect(to: server.localAddress!).get())
        }
        return (server, clients, ended)
    }

    /// An `AcceptErrorHandler` for `server`'s listening socket in an embedded channel, and what it logs.
    static func handlerChannel(listening server: Channel) -> (EmbeddedChannel, Lines) {
        let lines = Lines()
        let logger = Logger(label: "test") { _ in Capture(lines: lines) }
        let handler = AcceptErrorHandler(
            listener: "public", listeningFD: ListenerShedding.descriptor(ofListening: server), logger: logger)
        return (EmbeddedChannel(handler: handler), lines)
    }

    @Test func shedWaitingClosesEveryConnectionInTheQueue() async throws {
        let (server, clients, ended) = try await Self.listenerWithWaiting(3)
        let fd = try #require(ListenerShedding.descriptor(ofListening: server))
        ListenerShedding.prepare()
        let first = ListenerShedding.shedWaiting(on: fd)
        #expect(first.closed == 3 && first.emptied)
        #expect(ListenerShedding.isPrepared, "the reserve is open again")
        let second = ListenerShedding.shedWaiting(on: fd)
        #expect(second.closed == 0 && second.emptied, "nothing is left waiting")
        // Each client sees its connection end.
        let deadline = ContinuousClock.now + .seconds(5)
        while ended.count.withLock({ $0 }) < 3, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        #expect(ended.count.withLock { $0 } == 3)
        #expect(clients.allSatisfy { !$0.isActive })
        try await server.close()
    }

    @Test func onlyAListeningSocketHasAListeningDescriptor() async throws {
        let (server, clients, _) = try await Self.listenerWithWaiting(1)
        #expect(ListenerShedding.descriptor(ofListening: server) != nil)
        #expect(ListenerShedding.descriptor(ofListening: clients[0]) == nil)
        try await clients[0].close()
        try await server.close()
    }

    @Test func outOfDescriptorsClosesTheWaitingConnectionsAndOtherErrorsDoNot() async throws {
        let (server, _, ended) = try await Self.listenerWithWaiting(2)
        let (channel, lines) = Self.handlerChannel(listening: server)
        // Another error closes nothing.
        channel.pipeline.fireErrorCaught(Refused())
        #expect(ended.count.withLock { $0 } == 0)
        channel.pipeline.fireErrorCaught(IOError(errnoCode: EMFILE, reason: "accept(descriptor:addr:size:)"))
        let deadline = ContinuousClock.now + .seconds(5)
        while ended.count.withLock({ $0 }) < 2, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        #expect(ended.count.withLock { $0 } == 2)
        // Within the interval the second error is counted, not logged; the next line carries the count of closed ones.
        let logged = lines.lines.withLock { $0 }
        #expect(logged.count == 1)
        #expect(logged.first?.metadata["waiting_connections_closed"] == nil)
        _ = try? channel.finish()
        try await server.close()
    }

    /// NIO's accept loop tries once more after the last connection that fit; with nothing waiting, nobody was turned
    /// away and nothing is logged.
    @Test func outOfDescriptorsWithNothingWaitingIsNotLogged() async throws {
        let (server, _, _) = try await Self.listenerWithWaiting(0)
        let (channel, lines) = Self.handlerChannel(listening: server)
        channel.pipeline.fireErrorCaught(IOError(errnoCode: EMFILE, reason: "accept(descriptor:addr:size:)"))
        #expect(lines.lines.withLock { $0.count } == 0)
        _ = try? channel.finish()
        try await server.close()
    }

    /// When the queue cannot be emptied (out of descriptors with no reserve; here a socket that does not listen, so
    /// `accept` fails with `EINVAL`), the failure is logged: nothing was shed, and NIO keeps retrying.
    @Test func outOfDescriptorsThatCannotBeShedIsLogged() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        try #require(fd >= 0)
        defer { close(fd) }
        let lines = Lines()
        let logger = Logger(label: "test") { _ in Capture(lines: lines) }
        let channel = EmbeddedChannel(handler: AcceptErrorHandler(listener: "public", listeningFD: fd, logger: logger))
        channel.pipeline.fireErrorCaught(IOError(errnoCode: EMFILE, reason: "accept(descriptor:addr:size:)"))
        let logged = lines.lines.withLock { $0 }
        try #require(logged.count == 1)
        #expect(logged[0].metadata["waiting_connections_closed"] == nil)
        _ = try? channel.finish()
    }

    @Test func theLineSaysHowManyWaitingConnectionsWereClosed() async throws {
        let (server, _, _) = try await Self.listenerWithWaiting(2)
        let (channel, lines) = Self.handlerChannel(listening: server)
        channel.pipeline.fireErrorCaught(IOError(errnoCode: EMFILE, reason: "accept(descriptor:addr:size:)"))
        let logged = lines.lines.withLock { $0 }
        try #require(logged.count == 1)
        #expect(logged[0].metadata["waiting_connections_closed"] == "2")
        _ = try? channel.finish()
        try await server.close()
    }
}
