import NIOCore

/// What `TunnelIdleSweeper` watches: something that notes its own activity and can be closed.
protocol IdleSweepable: AnyObject {
    /// The sweeper's bookkeeping, kept in the swept object itself.
    var idleSweep: IdleSweepSlot { get set }
    /// True when there was activity since the last call.
    func takeActivity() -> Bool
    /// Idle for its whole timeout: close.
    func closeIdle()
}

/// A tunnel's place in the sweep, kept in the tunnel itself: an array slot and two numbers rather than a dictionary
/// entry per tunnel.
struct IdleSweepSlot {
    fileprivate var index = -1
    fileprivate var timeout = TimeAmount.zero
    fileprivate var lastSeen = NIODeadline.uptimeNanoseconds(0)

    /// True while the owner is registered with a sweeper.
    var isWatched: Bool { self.index >= 0 }
}

/// Closes the tunnels of one event loop that passed no bytes, in either direction, for their idle timeout
/// (`timeouts.tunnel_idle`).
///
/// One timer per event loop rather than an `IdleStateHandler` per tunnel: that handler's context and scheduled task
/// cost about 600 bytes per idle WebSocket, a tenth of what the proxy holds for one (docs/benchmarks.md). A tunnel
/// marks itself active on every read, which is a store, not a clock read; the sweep runs every quarter of the
/// shortest timeout and notes when it last saw each tunnel active. So a tunnel closes between one timeout and one
/// timeout plus two sweep intervals after its last byte, never before a full timeout.
///
/// Confined to its event loop. Generic over what it sweeps so the bookkeeping can be tested without sockets.
final class TunnelIdleSweeper<Tunnel: IdleSweepable> {
    private let eventLoop: EventLoop
    private var tunnels: [Tunnel] = []
    private var sweep: Scheduled<Void>?
    private var sweepAt: NIODeadline = .distantFuture
    /// The sweep interval for the timeouts registered: a quarter of the shortest, at least 10 ms.
    private var interval: TimeAmount = .hours(24)

    init(eventLoop: EventLoop) {
        self.eventLoop = eventLoop
    }

    var count: Int { self.tunnels.count }

    /// Watches `tunnel` until `remove(_:)`.
    func add(_ tunnel: Tunnel, timeout: TimeAmount) {
        self.eventLoop.preconditionInEventLoop()
        guard tunnel.idleSweep.index < 0 else { return }
        let now = self.eventLoop.now
        tunnel.idleSweep = IdleSweepSlot(index: self.tunnels.count, timeout: timeout, lastSeen: now)
        self.tunnels.append(tunnel)
        let interval = TimeAmount.nanoseconds(max(timeout.nanoseconds / 4, 10_000_000))
        if interval < self.interval || self.sweep == nil {
            self.interval = min(interval, self.interval)
            self.schedule(at: now + self.interval)
        }
    }

    func remove(_ tunnel: Tunnel) {
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
        let now = self.eventLoop.now
        var idle: [Tunnel] = []
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
