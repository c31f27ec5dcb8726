import CProxySys

#if canImport(Glibc)
import Glibc
#endif

/// Sends to many sockets with one system call: the answers a relay thread holds until the end of its batch
/// (`HTTPRelayShard.writeHeld()`) go out together through an io_uring (`cproxy_send_batch_run`, SendBatch.c), each as
/// `send(2)` with `MSG_DONTWAIT` would go.
///
/// Why one call: a `send` that wakes the client on this CPU lets the client take the CPU when the call returns (the
/// kernel preempts at the return to user space), before the next answer is written; the client then finds one answer
/// ready instead of all of them. Inside one call every answer is written before the thread can be preempted. Measured
/// in docs/benchmarks.md, "Sixteenth session".
///
/// Where the kernel has no io_uring or refuses it (a seccomp filter such as Docker's default, or
/// `kernel.io_uring_disabled`), each send is its own `send(2)`: the same results, one call each.
///
/// One thread at a time: an HTTP relay shard's batch is run by whichever relay thread runs the shard (the ring is not
/// set up for a single submitting thread). The ring is created by `prepare()` or the first `run()`.
final class SendBatch {
    /// Sends one `run()` takes at most (`append` beyond it is a programming error: run and clear the batch first).
    let capacity: Int
    private var ring: OpaquePointer?
    private var ringTried = false
    private let fds: UnsafeMutablePointer<Int32>
    private let bytes: UnsafeMutablePointer<UnsafeRawPointer?>
    private let lengths: UnsafeMutablePointer<UInt32>
    private let results: UnsafeMutablePointer<Int>
    /// Sends appended since the last `clear()`.
    private var count = 0
    /// Whether sends go through the ring (false before the first `run()`, and where the kernel refuses it).
    var usesRing: Bool { self.ring != nil }

    /// `useRing: false` sends each with its own `send(2)` (for tests of that path, and a switch if a kernel's ring
    /// misbehaves).
    init(capacity: Int = 256, useRing: Bool = true) {
        self.capacity = capacity
        self.ringTried = !useRing
        self.fds = .allocate(capacity: capacity)
        self.bytes = .allocate(capacity: capacity)
        self.lengths = .allocate(capacity: capacity)
        self.results = .allocate(capacity: capacity)
    }

    deinit {
        if let ring = self.ring { cproxy_send_batch_destroy(ring) }
        self.fds.deallocate()
        self.bytes.deallocate()
        self.lengths.deallocate()
        self.results.deallocate()
    }

    /// Queues a send of `count` bytes at `bytes` (which must stay valid until `run()` returns) to `fd`; its result is
    /// `result(index)` after `run()`, `index` being the number returned here.
    func append(fd: Int32, bytes: UnsafeRawPointer, count: Int) -> Int {
        precondition(self.count < self.capacity && count <= Int(UInt32.max))
        let index = self.count
        self.fds[index] = fd
        self.bytes[index] = bytes
        self.lengths[index] = UInt32(count)
        self.count += 1
        return index
    }

    /// Sets up the ring (the first `run()` does otherwise): nil when sends go through it or were told not to, else
    /// the errno with which the kernel refused it.
    @discardableResult
    func prepare() -> Int32? {
        guard !self.ringTried else { return nil }
        self.ringTried = true
        self.ring = cproxy_send_batch_create(UInt32(self.capacity))
        return self.ring == nil ? errno : nil
    }

    /// Makes every queued send: afterwards `result(i)` is the bytes written or `-errno` (`-EAGAIN`: the socket's buffer
    /// is full), as `cproxy_send_nowait` returns.
    func run() {
        guard self.count > 0 else { return }
        self.prepare()
        if let ring = self.ring {
            if cproxy_send_batch_run(ring, UInt32(self.count), self.fds, self.bytes, self.lengths, self.results) == 0 {
                return
            }
            // The ring failed (it should not): sends it never made are made one by one below, and the ring is not
            // used again.
            cproxy_send_batch_destroy(ring)
            self.ring = nil
        } else {
            for index in 0..<self.count { self.results[index] = -Int(ECANCELED) }
        }
        for index in 0..<self.count where self.results[index] == -Int(ECANCELED) {
            self.results[index] = cproxy_send_nowait(self.fds[index], self.bytes[index], UInt(self.lengths[index]))
        }
    }

    /// The result of send `index` of the last `run()`. `-EINPROGRESS` means the ring failed with the send under way:
    /// what it wrote is unknown, so the stream cannot go on.
    func result(_ index: Int) -> Int {
        precondition(index < self.count)
        return self.results[index]
    }

    /// Forgets the sends of the last `run()`.
    func clear() {
        self.count = 0
    }
}
