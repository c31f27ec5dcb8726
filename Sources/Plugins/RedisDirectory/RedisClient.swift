import Logging
import NIOCore
import Synchronization

/// A small pool of pipelined connections (`configuration.poolSize`), spread over the group's event loops.
///
/// Commands go round-robin to the connections that are up. A dropped connection reconnects on its own with
/// exponential back-off and jitter; while every connection is down, commands fail at once with
/// `RedisError.unavailable` (they do not queue). Commands sent before the first connect finishes wait for it.
public final class RedisClient: Sendable {
    public let configuration: RedisConfiguration
    private let slots: [ReconnectingConnection]
    private let next = Atomic<Int>(0)
    private let closed = Atomic<Bool>(false)
    private let eventLoop: EventLoop

    public init(
        configuration: RedisConfiguration,
        eventLoopGroup: EventLoopGroup,
        logger: Logger = Logger(label: "redis")
    ) {
        self.configuration = configuration
        self.eventLoop = eventLoopGroup.next()
        self.slots = (0..<max(1, configuration.poolSize)).map { _ in
            ReconnectingConnection(configuration: configuration, eventLoop: eventLoopGroup.next(), logger: logger)
        }
        for slot in self.slots { slot.start() }
    }

    /// Connections that are up now.
    public var connectedCount: Int { self.slots.filter(\.isConnected).count }

    /// Sends a command on one of the pool's connections (see `RedisConnection.send`).
    public func send(_ command: [any RESPArgument], timeout: TimeAmount? = nil) -> EventLoopFuture<RESPValue> {
        guard !self.closed.load(ordering: .relaxed) else { return self.eventLoop.makeFailedFuture(RedisError.closed) }
        let start = self.next.wrappingAdd(1, ordering: .relaxed).oldValue
        var firstConnect: EventLoopFuture<RedisConnection>?
        var lastError = "no connection"
        for offset in 0..<self.slots.count {
            let slot = self.slots[Int(UInt(bitPattern: start &+ offset) % UInt(self.slots.count))]
            switch slot.availability {
            case .ready(let connection):
                return connection.send(command, timeout: timeout)
            case .connecting(let future, first: true):
                firstConnect = firstConnect ?? future
            case .connecting(_, first: false):
                lastError = "reconnecting to \(self.configuration.redactedURL)"
            case .down(let why):
                lastError = why
            }
        }
        if let firstConnect {
            return firstConnect.flatMap { $0.send(command, timeout: timeout) }
                .flatMapErrorThrowing { error in
                    if error is RedisError { throw error }
                    throw RedisError.unavailable("\(error)")
                }
        }
        return self.eventLoop.makeFailedFuture(RedisError.unavailable(lastError))
    }

    /// `send`, for `async` callers.
    public func execute(_ command: [any RESPArgument], timeout: TimeAmount? = nil) async throws -> RESPValue {
        try await self.send(command, timeout: timeout).get()
    }

    /// Waits until at least one connection is up (or fails after `timeout`).
    public func waitUntilConnected(timeout: Duration = .seconds(5)) async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while self.connectedCount == 0 {
            guard clock.now < deadline else { throw RedisError.unavailable("no connection after \(timeout)") }
            try await Task.sleep(for: .milliseconds(10))
        }
    }

    /// Closes every connection and stops reconnecting; later commands fail with `RedisError.closed`.
    public func close() -> EventLoopFuture<Void> {
        self.closed.store(true, ordering: .relaxed)
        return EventLoopFuture.andAllComplete(self.slots.map { $0.close() }, on: self.eventLoop)
    }
}
