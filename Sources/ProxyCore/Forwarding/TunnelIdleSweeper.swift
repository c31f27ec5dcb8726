import NIOCore

/// Closes the tunnels of one event loop that passed no bytes, in either direction, for their idle timeout
/// (`timeouts.tunnel_idle`).
///
/// One timer per event loop rather than an `IdleStateHandler` per tunnel: that handler's context and scheduled task
/// cost about 600 bytes per idle WebSocket, a tenth of what the proxy holds for one (docs/benchmarks.md). A tunnel
/// marks itself active on every read, which is a store, not a clock read; the sweep runs every quarter of the
/// shortest timeout and notes when it last saw each tunnel active. So a tunnel closes between one timeout and one
/// timeout plus two sweep intervals after its last byte, never before a full timeout.
///
/// Confined to its event loop.
final class TunnelIdleSweeper {
    private struct Entry {
        let client: TunnelHandler
        let backend: TunnelHandler
        let timeout: TimeAmount
        var lastSeen: NIODeadline
    }

    private let eventLoop: EventLoop
    private var entries: [ObjectIdentifier: Entry] = [:]
    private var sweep: Scheduled<Void>?
    private var sweepAt: NIODeadline = .distantFuture
    /// The sweep interval for the timeouts registered: a quarter of the shortest, at least 10 ms.
    private var interval: TimeAmount = .hours(24)

    init(eventLoop: EventLoop) {
        self.eventLoop = eventLoop
    }

    var count: Int { self.entries.count }

    /// Watches the tunnel made of `client` (the client side) and `backend`; `remove(_:)` with the client side ends it.
    func add(client: TunnelHandler, backend: TunnelHandler, timeout: TimeAmount) {
        self.eventLoop.preconditionInEventLoop()
        let now = NIODeadline.now()
        self.entries[ObjectIdentifier(client)] = Entry(client: client, backend: backend, timeout: timeout, lastSeen: now)
        let interval = TimeAmount.nanoseconds(max(timeout.nanoseconds / 4, 10_000_000))
        if interval < self.interval || self.sweep == nil {
            self.interval = min(interval, self.interval)
            self.schedule(at: now + self.interval)
        }
    }

    func remove(_ client: TunnelHandler) {
        self.entries.removeValue(forKey: ObjectIdentifier(client))
        if self.entries.isEmpty {
            self.sweep?.cancel()
            self.sweep = nil
            self.sweepAt = .distantFuture
            self.interval = .hours(24)
        }
    }

    private func schedule(at deadline: NIODeadline) {
        guard deadline < self.sweepAt else { return }
        self.sweep?.cancel()
        self.sweepAt = deadline
        self.sweep = self.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [weak self] in
            self?.run()
        }
    }

    private func run() {
        self.sweep = nil
        self.sweepAt = .distantFuture
        let now = NIODeadline.now()
        var idle: [TunnelHandler] = []
        var shortest = TimeAmount.hours(24)
        for (id, var entry) in self.entries {
            shortest = min(shortest, entry.timeout)
            if entry.client.takeActivity() || entry.backend.takeActivity() {
                entry.lastSeen = now
                self.entries[id] = entry
            } else if now - entry.lastSeen >= entry.timeout {
                idle.append(entry.client)
            }
        }
        for client in idle {
            client.closeIdle()
        }
        guard !self.entries.isEmpty else { return }
        self.interval = .nanoseconds(max(shortest.nanoseconds / 4, 10_000_000))
        self.schedule(at: now + self.interval)
    }
}
