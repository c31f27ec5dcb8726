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
    /// A tunnel's place in the sweep, kept in the tunnel itself: an array slot and two numbers rather than a
    /// dictionary entry per tunnel.
    struct Slot {
        fileprivate var index = -1
        fileprivate var timeout = TimeAmount.zero
        fileprivate var lastSeen = NIODeadline.uptimeNanoseconds(0)
    }

    private let eventLoop: EventLoop
    private var tunnels: [TunnelHandler] = []
    private var sweep: Scheduled<Void>?
    private var sweepAt: NIODeadline = .distantFuture
    /// The sweep interval for the timeouts registered: a quarter of the shortest, at least 10 ms.
    private var interval: TimeAmount = .hours(24)

    init(eventLoop: EventLoop) {
        self.eventLoop = eventLoop
    }

    var count: Int { self.tunnels.count }

    /// Watches `tunnel` until `remove(_:)`.
    func add(_ tunnel: TunnelHandler, timeout: TimeAmount) {
        self.eventLoop.preconditionInEventLoop()
        guard tunnel.idleSweep.index < 0 else { return }
        let now = NIODeadline.now()
        tunnel.idleSweep = Slot(index: self.tunnels.count, timeout: timeout, lastSeen: now)
        self.tunnels.append(tunnel)
        let interval = TimeAmount.nanoseconds(max(timeout.nanoseconds / 4, 10_000_000))
        if interval < self.interval || self.sweep == nil {
            self.interval = min(interval, self.interval)
            self.schedule(at: now + self.interval)
        }
    }

    func remove(_ tunnel: TunnelHandler) {
        let index = tunnel.idleSweep.index
        guard index >= 0, index < self.tunnels.count, self.tunnels[index] === tunnel else { return }
        tunnel.idleSweep.index = -1
        let last = self.tunnels.removeLast()
        if index < self.tunnels.count {
            self.tunnels[index] = last
            last.idleSweep.index = index
        }
        if self.tunnels.isEmpty {
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
        for tunnel in self.tunnels {
            shortest = min(shortest, tunnel.idleSweep.timeout)
            if tunnel.takeActivity() {
                tunnel.idleSweep.lastSeen = now
            } else if now - tunnel.idleSweep.lastSeen >= tunnel.idleSweep.timeout {
                idle.append(tunnel)
            }
        }
        for tunnel in idle {
            tunnel.closeIdle()
        }
        guard !self.tunnels.isEmpty else { return }
        self.interval = .nanoseconds(max(shortest.nanoseconds / 4, 10_000_000))
        self.schedule(at: now + self.interval)
    }
}
