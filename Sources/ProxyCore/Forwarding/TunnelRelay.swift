import CProxySys
import Foundation
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Relays established tunnels (WebSocket and other upgrades) on the proxy's own threads, owning the two sockets'
/// file descriptors instead of two NIO channels.
///
/// Why: an idle tunnel kept as two NIO channels costs about 4.8 KB of memory (channel objects, their pending-write
/// rings, read buffers, pipelines), more than HAProxy spends on everything for an idle WebSocket (docs/benchmarks.md,
/// "Sixth session"). A relayed tunnel is one small object: the relay reads into one scratch buffer per thread and
/// allocates only for bytes a slow peer has not taken yet.
///
/// How a tunnel gets here (`TunnelHandler.handOff`): the upgrade runs on NIO as before; once both channels have
/// written everything they were given and reads are held, each channel's descriptor is duplicated and the channels
/// are closed (NIO's close is a plain `close(2)`, so the connection lives on in the duplicate). NIO has no public
/// accessor for a channel's descriptor: it is read from the channel's description and used only after the kernel
/// confirms that it is a TCP socket with exactly the channel's local and peer addresses; when that fails (a future
/// NIO describing channels differently, TLS), the tunnel stays on NIO channels, which work as before.
///
/// One shard (thread, epoll instance, scratch buffer) per event loop; a tunnel goes to its loop's shard. Level-
/// triggered epoll: a side is read while the other side has nothing pending; bytes the other side did not take are
/// kept and that side is watched for writability, which is back-pressure without unbounded buffering.
final class TunnelRelay: Sendable {
    let shards: [RelayShard]

    /// Starts `count` relay threads; with `cpus`, thread `i` is bound to `cpus[i]` (as the event loops are).
    /// When a shard cannot be made (no descriptors left for its epoll instance or eventfd), the shards made before it
    /// close theirs and nothing is started. `yieldAfterBatch`: `threads.yield_after_batch`. `makeShard` is for tests.
    init(
        count: Int, cpus: [Int?] = [], yieldAfterBatch: Bool = true,
        makeShard: ((_ index: Int, _ cpu: Int?) throws -> RelayShard)? = nil
    ) throws {
        let makeShard = makeShard ?? { try RelayShard(index: $0, cpu: $1, yieldAfterBatch: yieldAfterBatch) }
        let shards = try makeRelayShards(
            count: count, make: { try makeShard($0, $0 < cpus.count ? cpus[$0] : nil) }, discard: { $0.discard() })
        self.shards = shards
        for shard in shards { shard.start() }
    }

    /// Tunnels currently relayed by every shard.
    var count: Int { self.shards.reduce(0) { $0 + $1.live.load(ordering: .relaxed) } }
    /// Tunnels handed to the relay since it started.
    var adoptedTotal: Int { self.shards.reduce(0) { $0 + $1.adopted.load(ordering: .relaxed) } }

    /// Closes every tunnel and ends the threads.
    func stop() async {
        for shard in self.shards { await shard.stop() }
    }
}

/// One relayed tunnel. Created on an event loop by `TunnelHandler`, then owned by its shard's thread: every mutable
/// field is touched only there.
final class RelayedTunnel: @unchecked Sendable {
    /// The tunnel ended (first side closed, idle timeout, proxy-side close): bytes relayed from the client and from
    /// the backend while relayed. Called once, on the relay thread.
    typealias Closed = @Sendable (_ fromClient: Int, _ fromBackend: Int, _ end: TunnelEnd) -> Void

    let clientFD: Int32
    let backendFD: Int32
    fileprivate var slot = -1
    fileprivate var tracker: WebSocketFrameTracker?
    fileprivate var fromClient = 0
    fileprivate var fromBackend = 0
    /// Bytes read from one side that the other has not taken yet (index 0: to the client, 1: to the backend).
    fileprivate var pending: (ByteBuffer?, ByteBuffer?) = (nil, nil)
    /// Interest registered with epoll per side (0: client, 1: backend).
    fileprivate var interest: (UInt32, UInt32) = (0, 0)
    fileprivate var open: (Bool, Bool) = (true, true)
    /// No more reads: the tunnel is closing once what is pending is written.
    fileprivate var draining = false
    fileprivate var active = false
    fileprivate var lastSeen: UInt64 = 0
    fileprivate let idleTimeout: UInt64
    fileprivate var onClosed: Closed?

    init(clientFD: Int32, backendFD: Int32, tracker: WebSocketFrameTracker?, idleTimeout: TimeAmount, onClosed: @escaping Closed) {
        self.clientFD = clientFD
        self.backendFD = backendFD
        self.tracker = tracker
        self.idleTimeout = UInt64(max(idleTimeout.nanoseconds, 1))
        self.onClosed = onClosed
    }
}

/// One relay thread: its epoll instance, a wake-up eventfd for commands from other threads, the tunnels it relays
/// and its scratch buffer.
final class RelayShard: @unchecked Sendable {
    private enum Command {
        case adopt(RelayedTunnel)
        case close(RelayedTunnel, code: UInt16)
        case stop(CheckedContinuation<Void, Never>)

        var isStop: Bool {
            if case .stop = self { return true }
            return false
        }
    }

    let index: Int
    private let cpu: Int?
    /// The epoll instance, the wake-up and the command queue.
    private let core: RelayThreadCore<Command>
    private var epoll: Int32 { self.core.epoll }
    /// Tunnels relayed now, and since the start (read by metrics and tests from any thread).
    let live = Atomic<Int>(0)
    let adopted = Atomic<Int>(0)

    // Relay thread only.
    private var tunnels = RelaySlots<RelayedTunnel>()
    private let scratch: UnsafeMutableRawBufferPointer
    private let allocator = ByteBufferAllocator()
    private var sweepInterval: UInt64 = 0
    private var nextSweep: UInt64 = .max
    /// `threads.yield_after_batch`: the thread yields its CPU after a batch in which it sent anything (`run()`).
    private let yieldAfterBatch: Bool
    /// Something was sent in the current batch.
    private var sentInBatch = false

    private static let scratchSize = 64 * 1024

    init(index: Int, cpu: Int?, yieldAfterBatch: Bool = true) throws {
        self.index = index
        self.cpu = cpu
        self.yieldAfterBatch = yieldAfterBatch
        self.core = try RelayThreadCore(isStop: \.isStop)
        self.scratch = .allocate(byteCount: Self.scratchSize, alignment: 16)
    }

    /// Whether `discard` released the shard's descriptors (for tests).
    private(set) var isDiscarded = false

    /// Releases a shard that was never started: its epoll instance, eventfd and scratch buffer.
    fileprivate func discard() {
        precondition(!self.isDiscarded)
        self.isDiscarded = true
        self.core.discard()
        self.scratch.deallocate()
    }

    fileprivate func start() {
        RelayThreadCore<Command>.startThread(name: "ott-tunnel-\(self.index)", cpu: self.cpu) { [self] in self.run() }
    }

    /// Takes over a tunnel; from here on the shard owns its descriptors.
    func adopt(_ tunnel: RelayedTunnel) {
        self.live.add(1, ordering: .relaxed)
        self.adopted.add(1, ordering: .relaxed)
        self.send(.adopt(tunnel))
    }

    /// Closes a tunnel from the proxy's side: a WebSocket client first gets a close frame with `code` when the
    /// stream is at a frame boundary (as `TunnelHandler.close(code:)` does on NIO).
    func close(_ tunnel: RelayedTunnel, code: UInt16) {
        self.send(.close(tunnel, code: code))
    }

    fileprivate func stop() async {
        await withCheckedContinuation { self.send(.stop($0)) }
    }

    private func send(_ command: Command) {
        if !self.core.send(command) { self.refuse(command) }
    }

    /// Answers a command the stopped shard will not run: a tunnel handed over now ends at once (the proxy is
    /// shutting down), and whoever waits is let go.
    private func refuse(_ command: Command) {
        switch command {
        case .adopt(let tunnel):
            cproxy_close(tunnel.clientFD)
            cproxy_close(tunnel.backendFD)
            self.live.subtract(1, ordering: .relaxed)
            let closed = tunnel.onClosed
            tunnel.onClosed = nil
            closed?(0, 0, .proxy)
        case .close:
            break
        case .stop(let done):
            done.resume()
        }
    }

    // MARK: The relay thread

    private func run() {
        self.core.run(
            nextSweep: { self.nextSweep },
            event: { token, events in
                let slot = Int(token >> 1)
                guard let tunnel = self.tunnels[slot] else { return }
                self.handle(tunnel, side: Int(token & 1), events: events)
            },
            commands: self.runCommands,
            refuse: self.refuse,
            sweep: self.sweep,
            batchEnded: {
                // As the HTTP relay does (`HTTPRelayShard.batchEnded()`): the peers this batch's sends woke may be
                // waiting for this CPU. Measured: 4–17 % more WebSocket messages per second, with less CPU per message
                // (docs/benchmarks.md, "Seventeenth session").
                if self.sentInBatch, self.yieldAfterBatch { sched_yield() }
                self.sentInBatch = false
            })
        self.scratch.deallocate()
    }

    /// False once told to stop.
    private func runCommands(_ commands: [Command]) -> Bool {
        for command in commands {
            switch command {
            case .adopt(let tunnel):
                self.register(tunnel)
            case .close(let tunnel, let code):
                self.closeFromProxy(tunnel, code: code)
            case .stop(let done):
                for tunnel in self.tunnels.all { self.finish(tunnel, .proxy) }
                done.resume()
                return false
            }
        }
        return true
    }

    private func register(_ tunnel: RelayedTunnel) {
        let slot = self.tunnels.insert(tunnel)
        tunnel.slot = slot
        tunnel.lastSeen = Self.now()
        let interest = CPROXY_EV_IN | CPROXY_EV_RDHUP
        guard cproxy_epoll_ctl(self.epoll, 1, tunnel.clientFD, interest, UInt64(slot) << 1) == 0,
            cproxy_epoll_ctl(self.epoll, 1, tunnel.backendFD, interest, UInt64(slot) << 1 | 1) == 0
        else {
            self.finish(tunnel, .error)
            return
        }
        tunnel.interest = (interest, interest)
        let interval = max(tunnel.idleTimeout / 4, 10_000_000)
        if self.sweepInterval == 0 || interval < self.sweepInterval {
            self.sweepInterval = interval
            self.nextSweep = min(self.nextSweep, tunnel.lastSeen + interval)
        }
    }

    private func handle(_ tunnel: RelayedTunnel, side: Int, events: UInt32) {
        if events & CPROXY_EV_ERR != 0 {
            self.finish(tunnel, .error)
            return
        }
        if events & CPROXY_EV_OUT != 0 {
            guard self.flush(tunnel, to: side) else { return }
        }
        if self.interest(tunnel, side) & CPROXY_EV_IN != 0 {
            if events & (CPROXY_EV_IN | CPROXY_EV_HUP | CPROXY_EV_RDHUP) != 0 { self.relay(tunnel, from: side) }
        } else if events & CPROXY_EV_HUP != 0 {
            // A side only written to (a drain) hung up: what is pending for it cannot be delivered.
            self.finish(tunnel, side == 0 ? .client : .backend)
        }
    }

    /// Reads what `side` sent and writes it to the other side; keeps what the other side does not take.
    private func relay(_ tunnel: RelayedTunnel, from side: Int) {
        let source = side == 0 ? tunnel.clientFD : tunnel.backendFD
        let target = side == 0 ? tunnel.backendFD : tunnel.clientFD
        let scratch = self.scratch
        for _ in 0..<4 {
            // recv(2), not read(2): no VFS layer on the way (see HTTPRelayShard.clientReadable).
            let count = recv(source, scratch.baseAddress, scratch.count, 0)
            if count > 0 {
                tunnel.active = true
                let bytes = UnsafeRawBufferPointer(rebasing: scratch[0..<count])
                if side == 0 {
                    tunnel.fromClient &+= count
                } else {
                    tunnel.fromBackend &+= count
                    tunnel.tracker?.consume(bytes)
                }
                var written = cproxy_send(target, bytes.baseAddress, UInt(count))
                self.sentInBatch = true
                if written < 0 {
                    guard errno == EAGAIN || errno == EWOULDBLOCK else {
                        self.finish(tunnel, .error)
                        return
                    }
                    written = 0
                }
                if written < count {
                    // The other side is full: keep the rest, stop reading this side until it is written.
                    var rest = self.allocator.buffer(capacity: count - written)
                    rest.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[written...]))
                    self.setPending(tunnel, to: 1 - side, rest)
                    self.refresh(tunnel)
                    return
                }
                if count < scratch.count { return }
            } else if count == 0 {
                self.sideEnded(tunnel, side: side)
                return
            } else {
                if errno == EINTR { continue }
                if errno != EAGAIN && errno != EWOULDBLOCK { self.finish(tunnel, .error) }
                return
            }
        }
    }

    /// Writes what is pending for `side`; true when nothing is left (or nothing was pending).
    @discardableResult
    private func flush(_ tunnel: RelayedTunnel, to side: Int) -> Bool {
        guard var buffer = self.pending(tunnel, to: side) else { return true }
        let fd = side == 0 ? tunnel.clientFD : tunnel.backendFD
        while buffer.readableBytes > 0 {
            let written = buffer.withUnsafeReadableBytes { cproxy_send(fd, $0.baseAddress, UInt($0.count)) }
            if written < 0 {
                if errno == EINTR { continue }
                guard errno == EAGAIN || errno == EWOULDBLOCK else {
                    self.finish(tunnel, .error)
                    return false
                }
                self.setPending(tunnel, to: side, buffer)
                self.refresh(tunnel)
                return false
            }
            buffer.moveReaderIndex(forwardBy: written)
            self.sentInBatch = true
        }
        self.setPending(tunnel, to: side, nil)
        if tunnel.draining {
            self.finish(tunnel, .proxy)  // (already reported: the side that ended, or the proxy's close)
            return false
        }
        // Written out: the side that was held behind it is read again.
        self.refresh(tunnel)
        return true
    }

    /// `side` ended its stream: the tunnel ends (reported now); the other side gets what is pending for it first.
    private func sideEnded(_ tunnel: RelayedTunnel, side: Int) {
        self.report(tunnel, side == 0 ? .client : .backend)
        self.closeSide(tunnel, side)
        guard self.pending(tunnel, to: 1 - side) != nil else {
            self.finish(tunnel, .proxy)  // (already reported)
            return
        }
        tunnel.draining = true
        self.refresh(tunnel)
    }

    private func closeFromProxy(_ tunnel: RelayedTunnel, code: UInt16) {
        guard tunnel.slot >= 0, tunnel.open.0, !tunnel.draining else { return }
        guard let tracker = tunnel.tracker, tracker.atFrameBoundary else {
            self.finish(tunnel, .proxy)
            return
        }
        // The backend side closes now; the client gets what is pending, then the close frame, then the end.
        self.report(tunnel, .proxy)
        self.closeSide(tunnel, 1)
        var frame = self.pending(tunnel, to: 0) ?? self.allocator.buffer(capacity: 4)
        frame.writeBytes([0x88, 0x02, UInt8(code >> 8), UInt8(code & 0xFF)])
        self.setPending(tunnel, to: 0, frame)
        tunnel.draining = true
        self.flush(tunnel, to: 0)
    }

    /// Closes both sides (those still open) and frees the slot; reports the end (as `end`) if not yet done.
    private func finish(_ tunnel: RelayedTunnel, _ end: TunnelEnd) {
        guard tunnel.slot >= 0 else { return }
        self.report(tunnel, end)
        self.closeSide(tunnel, 0)
        self.closeSide(tunnel, 1)
        tunnel.pending = (nil, nil)
        self.tunnels.remove(tunnel.slot)
        tunnel.slot = -1
        self.live.subtract(1, ordering: .relaxed)
    }

    /// Reports the tunnel's end once; the first reason given is the one reported.
    private func report(_ tunnel: RelayedTunnel, _ end: TunnelEnd) {
        guard let closed = tunnel.onClosed else { return }
        tunnel.onClosed = nil
        closed(tunnel.fromClient, tunnel.fromBackend, end)
    }

    private func closeSide(_ tunnel: RelayedTunnel, _ side: Int) {
        if side == 0, tunnel.open.0 {
            tunnel.open.0 = false
            cproxy_close(tunnel.clientFD)  // also leaves the epoll set
        } else if side == 1, tunnel.open.1 {
            tunnel.open.1 = false
            cproxy_close(tunnel.backendFD)
        }
    }

    /// Closes tunnels that passed no bytes for their idle timeout (as `TunnelIdleSweeper` does on the loops: between
    /// one timeout and one timeout plus two sweep intervals after the last byte).
    private func sweep() {
        let now = Self.now()
        for tunnel in self.tunnels.all {
            if tunnel.active {
                tunnel.active = false
                tunnel.lastSeen = now
            } else if now &- tunnel.lastSeen >= tunnel.idleTimeout {
                self.finish(tunnel, .idle)
            }
        }
        if self.tunnels.releaseIfEmpty() {
            // Nothing relayed: the slots are given back; sleep until the next adoption.
            self.sweepInterval = 0
            self.nextSweep = .max
        } else {
            self.nextSweep = now + self.sweepInterval
        }
    }

    // MARK: Small helpers

    private func interest(_ tunnel: RelayedTunnel, _ side: Int) -> UInt32 {
        side == 0 ? tunnel.interest.0 : tunnel.interest.1
    }

    /// Brings each open side's epoll interest in line with the tunnel's state: a side is read while the other side
    /// has nothing pending and the tunnel is not draining; it is watched for writability while something is pending
    /// for it. A side with no interest leaves the epoll set (the kernel reports a hang-up even without interest, which
    /// would wake the thread in a loop).
    private func refresh(_ tunnel: RelayedTunnel) {
        for side in 0...1 {
            guard tunnel.slot >= 0, side == 0 ? tunnel.open.0 : tunnel.open.1 else { continue }
            var events: UInt32 = 0
            if !tunnel.draining, self.pending(tunnel, to: 1 - side) == nil { events |= CPROXY_EV_IN | CPROXY_EV_RDHUP }
            if self.pending(tunnel, to: side) != nil { events |= CPROXY_EV_OUT }
            let old = self.interest(tunnel, side)
            guard old != events else { continue }
            let fd = side == 0 ? tunnel.clientFD : tunnel.backendFD
            let op: Int32 = old == 0 ? 1 : events == 0 ? 2 : 3
            _ = cproxy_epoll_ctl(self.epoll, op, fd, events, UInt64(tunnel.slot) << 1 | UInt64(side))
            if side == 0 { tunnel.interest.0 = events } else { tunnel.interest.1 = events }
        }
    }

    private func pending(_ tunnel: RelayedTunnel, to side: Int) -> ByteBuffer? {
        side == 0 ? tunnel.pending.0 : tunnel.pending.1
    }

    private func setPending(_ tunnel: RelayedTunnel, to side: Int, _ buffer: ByteBuffer?) {
        if side == 0 { tunnel.pending.0 = buffer } else { tunnel.pending.1 = buffer }
    }

    private static func now() -> UInt64 { RelayThreadCore<Command>.now() }
}
