import Logging
import NIOCore
import Synchronization

/// A message received on a subscribed channel.
public struct RedisMessage: Sendable, Hashable {
    public var channel: String
    public var payload: ByteBuffer
}

public enum RedisSubscriberEvent: Sendable, Hashable {
    case message(RedisMessage)
    /// A connection is up and every channel subscribed so far is subscribed on it. After a reconnect
    /// (`afterReconnect`), messages published while disconnected were lost: drop whatever they would have invalidated.
    case connected(afterReconnect: Bool)
}

/// A dedicated pub/sub connection: SUBSCRIBE to channels, receive their messages on `events`. After the connection
/// drops it reconnects (with back-off) and subscribes to every channel again.
public final class RedisSubscriber: Sendable {
    public let events: AsyncStream<RedisSubscriberEvent>
    private let continuation: AsyncStream<RedisSubscriberEvent>.Continuation
    private let channels: ChannelSet
    private let slot: ReconnectingConnection

    private final class ChannelSet: Sendable {
        let names = Mutex<Set<String>>([])
    }

    public init(
        configuration: RedisConfiguration,
        eventLoopGroup: EventLoopGroup,
        logger: Logger = Logger(label: "redis-subscriber"),
        bufferingPolicy: AsyncStream<RedisSubscriberEvent>.Continuation.BufferingPolicy = .unbounded
    ) {
        let (events, continuation) = AsyncStream.makeStream(of: RedisSubscriberEvent.self, bufferingPolicy: bufferingPolicy)
        let channels = ChannelSet()
        self.events = events
        self.continuation = continuation
        self.channels = channels
        self.slot = ReconnectingConnection(
            configuration: configuration,
            eventLoop: eventLoopGroup.next(),
            logger: logger,
            onPush: { value in
                if let message = Self.message(from: value) { continuation.yield(.message(message)) }
            },
            prepare: { connection, reconnect in
                let names = channels.names.withLock { Array($0) }
                let subscribed =
                    names.isEmpty
                    ? connection.eventLoop.makeSucceededVoidFuture()
                    : connection.send(["SUBSCRIBE"] + names, replies: names.count, timeout: nil).map { _ in }
                return subscribed.map { continuation.yield(.connected(afterReconnect: reconnect)) }
            }
        )
        self.slot.start()
    }

    /// Subscribes to the channels (kept across reconnects). Waits for a connect in progress; when the server is down
    /// it throws `RedisError.unavailable`, and the channels are subscribed when the connection comes back.
    public func subscribe(_ names: [String]) async throws {
        guard !names.isEmpty else { return }
        self.channels.names.withLock { $0.formUnion(names) }
        let connection: RedisConnection
        switch self.slot.availability {
        case .ready(let ready): connection = ready
        case .connecting(let future, _): connection = try await future.get()
        case .down(let why): throw RedisError.unavailable(why)
        }
        _ = try await connection.send(["SUBSCRIBE"] + names, replies: names.count, timeout: nil).get()
    }

    /// Unsubscribes from the channels.
    public func unsubscribe(_ names: [String]) async throws {
        guard !names.isEmpty else { return }
        self.channels.names.withLock { $0.subtract(names) }
        if case .ready(let connection) = self.slot.availability {
            _ = try await connection.send(["UNSUBSCRIBE"] + names, replies: names.count, timeout: nil).get()
        }
    }

    public var subscribedChannels: Set<String> { self.channels.names.withLock { $0 } }

    public var isConnected: Bool { self.slot.isConnected }

    /// Closes the connection and finishes `events`.
    public func close() -> EventLoopFuture<Void> {
        let continuation = self.continuation
        return self.slot.close().always { _ in continuation.finish() }
    }

    static func message(from value: RESPValue) -> RedisMessage? {
        guard let parts = value.array else { return nil }
        switch parts.first?.string {
        case "message" where parts.count == 3, "smessage" where parts.count == 3:
            guard let channel = parts[1].string, let payload = parts[2].bytes else { return nil }
            return RedisMessage(channel: channel, payload: payload)
        case "pmessage" where parts.count == 4:
            guard let channel = parts[2].string, let payload = parts[3].bytes else { return nil }
            return RedisMessage(channel: channel, payload: payload)
        default:
            return nil
        }
    }
}
