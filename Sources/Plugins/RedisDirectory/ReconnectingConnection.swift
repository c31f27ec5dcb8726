import Logging
import NIOCore
import Synchronization

/// Exponential back-off with jitter: `base * 2^(attempt-1)`, capped at `max`, then scaled by a random factor in
/// [0.5, 1] so clients that lost the same server do not reconnect in lockstep.
struct Backoff: Sendable {
    var base: TimeAmount
    var max: TimeAmount

    func delay(attempt: Int, random: Double = Double.random(in: 0.5...1)) -> TimeAmount {
        let exponent = Swift.min(Swift.max(attempt - 1, 0), 30)
        let (scaled, overflow) = self.base.nanoseconds.multipliedReportingOverflow(by: Int64(1) << exponent)
        let capped = overflow ? self.max.nanoseconds : Swift.min(scaled, self.max.nanoseconds)
        return .nanoseconds(Int64(Double(capped) * random))
    }
}

/// One connection slot that keeps itself connected: it connects, and when the connection drops or a connect fails,
/// tries again after a back-off. Used for each connection of a `RedisClient` and for a `RedisSubscriber`.
final class ReconnectingConnection: Sendable {
    enum Availability {
        case ready(RedisConnection)
        /// A connect is in progress; `first` when this slot was never connected (worth waiting for).
        case connecting(EventLoopFuture<RedisConnection>, first: Bool)
        case down(String)
    }

    private enum State {
        case idle
        case connecting(EventLoopFuture<RedisConnection>, everConnected: Bool)
        case connected(RedisConnection)
        case waiting(Scheduled<Void>, lastError: String)
        case closed
    }

    private struct Locked {
        var state: State = .idle
        var attempt = 0
    }

    let eventLoop: EventLoop
    private let configuration: RedisConfiguration
    private let logger: Logger
    private let backoff: Backoff
    private let onPush: (@Sendable (RESPValue) -> Void)?
    /// Runs on every new connection before it is used (the subscriber resubscribes here). `reconnect` is true after a drop.
    private let prepare: @Sendable (_ connection: RedisConnection, _ reconnect: Bool) -> EventLoopFuture<Void>
    private let locked = Mutex(Locked())

    init(
        configuration: RedisConfiguration,
        eventLoop: EventLoop,
        logger: Logger,
        onPush: (@Sendable (RESPValue) -> Void)? = nil,
        prepare: @escaping @Sendable (RedisConnection, Bool) -> EventLoopFuture<Void> = { connection, _ in
            connection.eventLoop.makeSucceededVoidFuture()
        }
    ) {
        self.configuration = configuration
        self.eventLoop = eventLoop
        self.logger = logger
        self.onPush = onPush
        self.prepare = prepare
        self.backoff = Backoff(base: configuration.reconnectBaseDelay, max: configuration.reconnectMaxDelay)
    }

    func start() {
        self.connect(everConnected: false)
    }

    var availability: Availability {
        self.locked.withLock { locked in
            switch locked.state {
            // A channel that closed is down already, before its close callbacks have run.
            case .connected(let connection) where connection.isActive: return .ready(connection)
            case .connected: return .down("connection to \(self.configuration.redactedURL) lost")
            case .connecting(let future, let everConnected): return .connecting(future, first: !everConnected)
            case .waiting(_, let lastError): return .down(lastError)
            case .idle: return .down("not started")
            case .closed: return .down("closed")
            }
        }
    }

    var isConnected: Bool {
        if case .ready = self.availability { return true }
        return false
    }

    private func connect(everConnected: Bool) {
        let promise = self.eventLoop.makePromise(of: RedisConnection.self)
        let proceed = self.locked.withLock { locked -> Bool in
            switch locked.state {
            case .closed: return false
            default:
                locked.state = .connecting(promise.futureResult, everConnected: everConnected)
                return true
            }
        }
        guard proceed else {
            promise.fail(RedisError.closed)
            return
        }
        let prepare = self.prepare
        RedisConnection.connect(configuration: self.configuration, on: self.eventLoop, onPush: self.onPush)
            .flatMap { connection in
                prepare(connection, everConnected).map { connection }.flatMapError { error in
                    connection.channel.close(promise: nil)
                    return connection.eventLoop.makeFailedFuture(error)
                }
            }
            .whenComplete { result in
                switch result {
                case .success(let connection):
                    self.connected(connection, everConnected: everConnected)
                case .failure(let error):
                    self.connectFailed(error, everConnected: everConnected)
                }
                promise.completeWith(result)
            }
    }

    private func connected(_ connection: RedisConnection, everConnected: Bool) {
        let keep = self.locked.withLock { locked -> Bool in
            guard case .connecting = locked.state else { return false }
            locked.state = .connected(connection)
            locked.attempt = 0
            return true
        }
        guard keep else {
            connection.channel.close(promise: nil)
            return
        }
        if everConnected {
            self.logger.info("redis reconnected", metadata: ["redis": "\(self.configuration.redactedURL)"])
        }
        connection.closeFuture.whenComplete { _ in
            self.dropped(connection)
        }
    }

    private func dropped(_ connection: RedisConnection) {
        let stillCurrent = self.locked.withLock { locked -> Bool in
            guard case .connected(let current) = locked.state, current === connection else { return false }
            return true
        }
        guard stillCurrent else { return }
        self.logger.warning("redis connection lost", metadata: ["redis": "\(self.configuration.redactedURL)"])
        self.scheduleReconnect(lastError: "connection to \(self.configuration.redactedURL) lost", everConnected: true)
    }

    private func connectFailed(_ error: Error, everConnected: Bool) {
        self.logger.debug(
            "redis connect failed", metadata: ["redis": "\(self.configuration.redactedURL)", "error": "\(error)"]
        )
        self.scheduleReconnect(
            lastError: "cannot connect to \(self.configuration.redactedURL): \(error)", everConnected: everConnected
        )
    }

    private func scheduleReconnect(lastError: String, everConnected: Bool) {
        self.locked.withLock { locked in
            if case .closed = locked.state { return }
            locked.attempt += 1
            let delay = self.backoff.delay(attempt: locked.attempt)
            let task = self.eventLoop.scheduleTask(in: delay) {
                self.connect(everConnected: everConnected)
            }
            locked.state = .waiting(task, lastError: lastError)
        }
    }

    func close() -> EventLoopFuture<Void> {
        let previous = self.locked.withLock { locked -> State in
            let previous = locked.state
            locked.state = .closed
            return previous
        }
        switch previous {
        case .connected(let connection):
            return connection.close()
        case .waiting(let task, _):
            task.cancel()
        case .connecting(let future, _):
            return future.flatMap { $0.close() }.recover { _ in }
        case .idle, .closed:
            break
        }
        return self.eventLoop.makeSucceededVoidFuture()
    }
}
