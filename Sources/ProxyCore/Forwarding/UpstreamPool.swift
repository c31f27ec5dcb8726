import NIOCore
import NIOHTTP1
import NIOPosix

/// Why a connection to a backend could not be had. Maps to the status the client sees.
enum UpstreamConnectError: Error {
    case timedOut
    case failed(Error)
}

/// Keep-alive connections to backends, one pool per event loop so a request and its upstream connection share a
/// thread and never hop (the way Envoy and Pingora keep per-worker pools).
///
/// Idle connections are kept most-recently-used first: the warmest connection is the least likely to have been
/// closed by the backend's own keep-alive timer.
final class UpstreamPool {
    struct Settings {
        var connectTimeout: TimeAmount
        var idleTimeout: TimeAmount
        var maxIdlePerBackend: Int
    }

    private struct IdleEntry {
        let connection: UpstreamConnection
        let expiry: Scheduled<Void>
    }

    let eventLoop: EventLoop
    /// Replaced on reload; applies to connections opened and released from then on.
    var settings: Settings
    private var idle: [String: [IdleEntry]] = [:]
    private(set) var connectsOpened = 0
    private var closed = false

    init(eventLoop: EventLoop, settings: Settings) {
        self.eventLoop = eventLoop
        self.settings = settings
    }

    /// A connection to `backend`: a pooled one when one is open, else a new one. `completion` runs on this loop.
    func lease(
        _ backend: Backend,
        allowPooled: Bool = true,
        completion: @escaping (Result<UpstreamConnection, UpstreamConnectError>) -> Void
    ) {
        self.eventLoop.preconditionInEventLoop()
        if allowPooled, let connection = self.popIdle(backend.id) {
            completion(.success(connection))
            return
        }
        self.connect(backend, completion: completion)
    }

    /// Returns a connection whose last exchange ended cleanly; closes it instead when the pool is full.
    func release(_ connection: UpstreamConnection) {
        self.eventLoop.preconditionInEventLoop()
        connection.sink = nil
        connection.holdReads(false)
        guard !self.closed, connection.channel.isActive,
            self.idle[connection.backend.id, default: []].count < self.settings.maxIdlePerBackend
        else {
            connection.channel.close(promise: nil)
            return
        }
        let id = connection.backend.id
        let channel = connection.channel
        let expiry = self.eventLoop.assumeIsolated().scheduleTask(in: self.settings.idleTimeout) {
            channel.close(promise: nil)
        }
        connection.onIdleClose = { [unowned self] in self.remove(connection) }
        self.idle[id, default: []].append(IdleEntry(connection: connection, expiry: expiry))
    }

    /// Closes every idle connection (shutdown or reload).
    func closeAll() {
        self.closed = true
        let all = self.idle.values.flatMap { $0 }
        self.idle.removeAll()
        for entry in all {
            entry.expiry.cancel()
            entry.connection.onIdleClose = nil
            entry.connection.channel.close(promise: nil)
        }
    }

    var idleCount: Int { self.idle.values.reduce(0) { $0 + $1.count } }

    private func popIdle(_ id: String) -> UpstreamConnection? {
        while let entry = self.idle[id]?.popLast() {
            entry.expiry.cancel()
            entry.connection.onIdleClose = nil
            if entry.connection.channel.isActive {
                return entry.connection
            }
        }
        return nil
    }

    private func remove(_ connection: UpstreamConnection) {
        guard var list = self.idle[connection.backend.id],
            let index = list.firstIndex(where: { $0.connection === connection })
        else { return }
        list[index].expiry.cancel()
        list.remove(at: index)
        self.idle[connection.backend.id] = list
    }

    private func connect(
        _ backend: Backend,
        completion: @escaping (Result<UpstreamConnection, UpstreamConnectError>) -> Void
    ) {
        self.connectsOpened += 1
        let bootstrap = ClientBootstrap(group: self.eventLoop)
            .connectTimeout(self.settings.connectTimeout)
            .channelOption(.socketOption(.so_reuseaddr), value: 1)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
        bootstrap.connect(to: backend.address).assumeIsolated().whenComplete { result in
            switch result {
            case .failure(ChannelError.connectTimeout):
                completion(.failure(.timedOut))
            case .failure(let error):
                completion(.failure(.failed(error)))
            case .success(let channel):
                do {
                    completion(.success(try Self.configure(channel, backend: backend)))
                } catch {
                    channel.close(promise: nil)
                    completion(.failure(.failed(error)))
                }
            }
        }
    }

    private static func configure(_ channel: Channel, backend: Backend) throws -> UpstreamConnection {
        var encoderConfiguration = HTTPRequestEncoder.Configuration()
        // Framing is decided by ForwardingHeaders, which knows how the client framed the body.
        encoderConfiguration.automaticallySetFramingHeaders = false
        let encoder = HTTPRequestEncoder(configuration: encoderConfiguration)
        let decoder = ByteToMessageHandler(
            HTTPResponseDecoder(leftOverBytesStrategy: .forwardBytes, informationalResponseStrategy: .forward)
        )
        let handler = UpstreamHandler()
        let sync = channel.pipeline.syncOperations
        try sync.addHandler(encoder)
        try sync.addHandler(decoder)
        try sync.addHandler(handler)
        return UpstreamConnection(channel: channel, backend: backend, handler: handler, encoder: encoder, decoder: decoder)
    }
}
