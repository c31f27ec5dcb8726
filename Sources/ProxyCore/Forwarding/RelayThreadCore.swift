import CProxySys
import Foundation
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// What the relay threads (`TunnelRelay`, `HTTPRelay`) share: an epoll instance (level-triggered), an eventfd that
/// wakes the thread for commands sent from other threads, the command queue, and the loop. The owner gives each
/// descriptor it registers a token of its own (any value but `UInt64.max`, the wake-up's).
final class RelayThreadCore<Command: Sendable>: @unchecked Sendable {  // the queue is behind its mutex; the rest is the thread's
    let epoll: Int32
    private let wakeFD: Int32
    /// Commands for the thread, and whether it stopped (its descriptors are closed then, and their numbers may belong
    /// to someone else: nothing may signal them any more).
    private let commands = Mutex<(queue: [Command], stopped: Bool)>(([], false))
    private let isStop: @Sendable (Command) -> Bool

    private static var wakeToken: UInt64 { .max }

    /// - Parameter isStop: which command ends the loop (commands queued behind it are refused, as after it).
    init(isStop: @escaping @Sendable (Command) -> Bool) throws {
        self.isStop = isStop
        let epoll = cproxy_epoll_create()
        guard epoll >= 0 else { throw IOError(errnoCode: errno, reason: "epoll_create1") }
        let wake = cproxy_eventfd()
        guard wake >= 0 else {
            cproxy_close(epoll)
            throw IOError(errnoCode: errno, reason: "eventfd")
        }
        guard cproxy_epoll_ctl(epoll, 1, wake, CPROXY_EV_IN, Self.wakeToken) == 0 else {
            cproxy_close(epoll)
            cproxy_close(wake)
            throw IOError(errnoCode: errno, reason: "epoll_ctl")
        }
        self.epoll = epoll
        self.wakeFD = wake
    }

    /// Closes the descriptors of a core whose loop never ran.
    func discard() {
        cproxy_close(self.epoll)
        cproxy_close(self.wakeFD)
    }

    /// Queues a command and wakes the thread; false once the thread stopped (the caller answers the command then).
    func send(_ command: Command) -> Bool {
        self.commands.withLock { commands in
            guard !commands.stopped else { return false }
            commands.queue.append(command)
            // Under the lock, so the thread cannot close the eventfd between the append and the signal.
            if commands.queue.count == 1 { cproxy_eventfd_signal(self.wakeFD) }
            return true
        }
    }

    /// Runs the loop on the calling thread, taking up to `batch` ready descriptors per `epoll_wait`: `event` for each
    /// ready descriptor (its token and events), `commands` with
    /// what was queued up to and including a stop (which must end the loop: the handler returns false), `refuse` with
    /// what was queued behind a stop (answered as `send` answers it once stopped), `sweep` whenever `nextSweep`
    /// (uptime nanoseconds, `.max` for never) has passed. Closes the descriptors when it ends.
    func run(
        batch: Int = 256, nextSweep: () -> UInt64, event: (_ token: UInt64, _ events: UInt32) -> Void, commands: ([Command]) -> Bool,
        refuse: (Command) -> Void, sweep: () -> Void, batchEnded: () -> Void = {}
    ) {
        let buffers = PassBuffers(capacity: batch)
        while true {
            let now = Self.now()
            let next = nextSweep()
            let timeout = next == .max ? -1 : Int32(clamping: (next &- min(now, next)) / 1_000_000 + 1)
            let running = self.pass(
                timeout: timeout, buffers, nextSweep: nextSweep, event: event, commands: commands, refuse: refuse,
                sweep: sweep, batchEnded: batchEnded)
            if !running { break }
        }
    }

    /// Where `pass` puts what one `epoll_wait` returns (allocated once per loop, not per pass).
    final class PassBuffers {
        let capacity: Int
        let events: UnsafeMutablePointer<UInt32>
        let data: UnsafeMutablePointer<UInt64>

        init(capacity: Int) {
            self.capacity = capacity
            self.events = .allocate(capacity: capacity)
            self.data = .allocate(capacity: capacity)
        }

        deinit {
            self.events.deallocate()
            self.data.deallocate()
        }
    }

    /// One pass of the loop (`run`): one `epoll_wait` with `timeout` (milliseconds, -1 for none), the ready
    /// descriptors, the commands, a due sweep, `batchEnded`. False once stopped: the descriptors are closed then.
    /// Threads that share several of them through a queue of their own (`HTTPRelay`) call this with a zero timeout.
    func pass(
        timeout: Int32, _ buffers: PassBuffers, nextSweep: () -> UInt64,
        event: (_ token: UInt64, _ events: UInt32) -> Void, commands: ([Command]) -> Bool, refuse: (Command) -> Void,
        sweep: () -> Void, batchEnded: () -> Void
    ) -> Bool {
        let count = cproxy_epoll_wait(self.epoll, buffers.events, buffers.data, Int32(buffers.capacity), timeout)
        var woken = false
        if count > 0 {
            for i in 0..<Int(count) {
                if buffers.data[i] == Self.wakeToken {
                    woken = true
                } else {
                    event(buffers.data[i], buffers.events[i])
                }
            }
        }
        if woken {
            cproxy_eventfd_drain(self.wakeFD)
            let queued = self.commands.withLock { state in
                defer { state.queue.removeAll(keepingCapacity: true) }
                if state.queue.contains(where: self.isStop) { state.stopped = true }
                return state.queue
            }
            var running = true
            if let stop = queued.firstIndex(where: self.isStop) {
                _ = commands(Array(queued[...stop]))
                for command in queued[(stop + 1)...] { refuse(command) }
                running = false
            } else if !commands(queued) {
                running = false
            }
            if !running {
                cproxy_close(self.epoll)
                cproxy_close(self.wakeFD)
                return false
            }
        }
        if Self.now() >= nextSweep() { sweep() }
        batchEnded()
        return true
    }

    /// Uptime nanoseconds, the clock `NIODeadline` reads.
    static func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }

    /// Starts a relay thread named `name` (the name `top -H`, `perf` and `/proc/PID/task/*/comm` show, cut to 15
    /// bytes; Foundation's `Thread.name`, set before the start, did not reach the kernel on Linux: the threads showed
    /// as "oot.default-qos"), bound to `cpu` when given, running `body`.
    static func startThread(name: String, cpu: Int?, _ body: @escaping @Sendable () -> Void) {
        let thread = Thread {
            cproxy_name_current_thread(name)
            if let cpu { _ = CPUPinning.bindCurrentThread(to: cpu) }
            body()
        }
        thread.name = name
        thread.start()
    }
}

/// Makes a relay's shards, one per index; when one cannot be made (no descriptors left for its epoll instance or
/// eventfd), those made before it are discarded (their descriptors closed) and the error is thrown.
func makeRelayShards<Shard>(
    count: Int, make: (_ index: Int) throws -> Shard, discard: (Shard) -> Void
) throws -> [Shard] {
    var shards: [Shard] = []
    do {
        for index in 0..<max(count, 1) { shards.append(try make(index)) }
    } catch {
        for shard in shards { discard(shard) }
        throw error
    }
    return shards
}

/// A relay thread's entries by slot (a slot is half of an epoll token): slots are reused, and the table gives its
/// memory back once empty.
struct RelaySlots<Entry: AnyObject> {
    private var entries: [Entry?] = []
    private var free: [Int] = []

    /// Stores `entry` in a free slot and returns the slot.
    mutating func insert(_ entry: Entry) -> Int {
        let slot = self.free.popLast() ?? self.entries.count
        if slot == self.entries.count { self.entries.append(nil) }
        self.entries[slot] = entry
        return slot
    }

    mutating func remove(_ slot: Int) {
        self.entries[slot] = nil
        self.free.append(slot)
    }

    subscript(slot: Int) -> Entry? { slot < self.entries.count ? self.entries[slot] : nil }

    /// The entries there are (a copy: the caller may remove while going through it).
    var all: [Entry] { self.entries.compactMap { $0 } }

    /// Nothing stored: the storage is released (a burst of connections does not keep its table).
    mutating func releaseIfEmpty() -> Bool {
        guard self.free.count == self.entries.count else { return false }
        self.entries = []
        self.free = []
        return true
    }
}
