import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// Active HTTP health checks: one task per checked backend sends `GET <path>` on a fresh connection every interval
/// (±10 % jitter, the first check at a random point of the first interval so a pool's checks do not come in bursts)
/// and feeds the result to the backend's `BackendHealth`.
///
/// `update(_:)` is called with every generation: checks of backends that keep their id, address, health state and
/// check settings carry on undisturbed; others are started or stopped.
final class HealthChecker: Sendable {
    private struct Check: Equatable {
        var address: SocketAddress
        var host: String
        var port: Int
        var config: HealthCheckConfig
        var health: ObjectIdentifier
    }

    private let group: EventLoopGroup
    private let checks = Mutex<[String: (check: Check, task: Task<Void, Never>)]>([:])
    private let stopped = Mutex(false)

    init(group: EventLoopGroup) {
        self.group = group
    }

    /// Starts and stops checks so that exactly the backends of pools with `health_check` in `runtime` are checked.
    func update(_ runtime: ProxyRuntime) {
        var wanted: [String: (Check, Backend)] = [:]
        for pool in runtime.config.pools {
            guard let config = pool.healthCheck, let backends = runtime.table.pools[pool.name]?.backends else { continue }
            for backend in backends {
                let check = Check(
                    address: backend.address, host: backend.config.host, port: backend.config.port, config: config,
                    health: ObjectIdentifier(backend.health))
                wanted[backend.id] = (check, backend)
            }
        }
        let group = self.group
        let cancelled = self.checks.withLock { checks -> [Task<Void, Never>] in
            guard !self.stopped.withLock({ $0 }) else { return [] }
            var cancelled: [Task<Void, Never>] = []
            for (id, running) in checks where wanted[id]?.0 != running.check {
                cancelled.append(running.task)
                checks[id] = nil
            }
            for (id, (check, backend)) in wanted where checks[id] == nil {
                let health = backend.health
                let task = Task {
                    await Self.run(check, health: health, group: group)
                }
                checks[id] = (check, task)
            }
            return cancelled
        }
        for task in cancelled { task.cancel() }
    }

    /// Stops every check and waits for them to end.
    func stop() async {
        let tasks = self.checks.withLock { checks in
            self.stopped.withLock { $0 = true }
            let tasks = checks.values.map(\.task)
            checks.removeAll()
            return tasks
        }
        for task in tasks { task.cancel() }
        for task in tasks { await task.value }
    }

    private static func run(_ check: Check, health: BackendHealth, group: EventLoopGroup) async {
        let interval = check.config.interval.nanoseconds
        var delay = Int64.random(in: 0..<max(interval, 1))
        while !Task.isCancelled {
            do {
                try await Task.sleep(for: .nanoseconds(delay))
            } catch {
                return
            }
            let status = try? await Self.probe(
                address: check.address, host: check.host, port: check.port, path: check.config.path,
                timeout: check.config.timeout, group: group)
            guard !Task.isCancelled else { return }
            health.recordActiveCheck(passed: status.map { check.config.expectStatus.contains($0) } ?? false)
            delay = interval + Int64.random(in: -(interval / 10)...(interval / 10))
        }
    }

    struct ProbeTimeout: Error {}

    /// One check: the response status, or an error when connecting, sending or receiving the head failed or took
    /// longer than `timeout` altogether.
    static func probe(
        address: SocketAddress, host: String, port: Int, path: String, timeout: TimeAmount, group: EventLoopGroup
    ) async throws -> Int {
        let loop = group.next()
        let promise = loop.makePromise(of: Int.self)
        let timer = loop.scheduleTask(in: timeout) { promise.fail(ProbeTimeout()) }
        let hostHeader: String
        if host.contains(":") {
            hostHeader = "[\(host)]:\(port)"
        } else {
            hostHeader = "\(host):\(port)"
        }
        let connected = ClientBootstrap(group: loop)
            .connectTimeout(timeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(ProbeHandler(promise: promise))
                }
            }
            .connect(to: address)
        connected.whenComplete { result in
            switch result {
            case .success(let channel):
                let head = HTTPRequestHead(
                    version: .http1_1, method: .GET, uri: path,
                    headers: ["host": hostHeader, "user-agent": "ott-proxy-health-check", "connection": "close"])
                channel.write(HTTPClientRequestPart.head(head), promise: nil)
                channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
            case .failure(let error):
                promise.fail(error)
            }
        }
        promise.futureResult.whenComplete { _ in
            timer.cancel()
            connected.whenSuccess { $0.close(promise: nil) }
        }
        return try await promise.futureResult.get()
    }

    /// Completes the probe with the first final response head's status, or fails it when the connection ends first.
    private final class ProbeHandler: ChannelInboundHandler {
        typealias InboundIn = HTTPClientResponsePart
        private let promise: EventLoopPromise<Int>

        init(promise: EventLoopPromise<Int>) {
            self.promise = promise
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            if case .head(let head) = Self.unwrapInboundIn(data), head.status.code >= 200 {
                self.promise.succeed(Int(head.status.code))
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            self.promise.fail(ChannelError.eof)
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            self.promise.fail(error)
            context.close(promise: nil)
        }
    }
}
