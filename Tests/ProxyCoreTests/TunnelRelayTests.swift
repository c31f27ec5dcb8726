import Foundation
import NIOCore
import Synchronization
import Testing

@testable import ProxyCore

#if canImport(Glibc)
import Glibc
#endif

/// The relay threads on their own, over socket pairs: the test holds the far end of each side (what would be the
/// client and the backend), the relay the near ends.
@Suite struct TunnelRelayTests {
    /// One relayed tunnel and the test's two ends of it.
    final class Rig: Sendable {
        let relay: TunnelRelay
        let tunnel: RelayedTunnel
        /// The client's and the backend's end.
        let client: Int32
        let backend: Int32
        /// Bytes from the client and from the backend, and why, as reported when the tunnel ended.
        let closed = Reported()

        final class Reported: Sendable {
            private let value = Mutex<(Int, Int)?>(nil)
            private let reason = Mutex<TunnelEnd?>(nil)
            private let time = Mutex<ContinuousClock.Instant?>(nil)
            func set(_ counts: (Int, Int), end: TunnelEnd) {
                self.time.withLock { $0 = .now }
                self.reason.withLock { $0 = end }
                self.value.withLock { $0 = counts }
            }
            func withLock<T>(_ body: ((Int, Int)?) -> T) -> T { self.value.withLock { body($0) } }
            /// Why the relay said the tunnel ended.
            var end: TunnelEnd? { self.reason.withLock { $0 } }
            /// When the relay reported the end (on its own thread, so a busy test task does not skew it).
            var at: ContinuousClock.Instant? { self.time.withLock { $0 } }
        }

        init(webSocket: Bool = true, idleTimeout: TimeAmount = .seconds(60), yieldAfterBatch: Bool = true) throws {
            let (client, clientNear) = try Self.pair()
            let (backend, backendNear) = try Self.pair()
            self.client = client
            self.backend = backend
            self.relay = try TunnelRelay(count: 1, yieldAfterBatch: yieldAfterBatch)
            let closed = self.closed
            self.tunnel = RelayedTunnel(
                clientFD: clientNear, backendFD: backendNear, tracker: webSocket ? WebSocketFrameTracker() : nil,
                idleTimeout: idleTimeout
            ) { fromClient, fromBackend, end in
                closed.set((fromClient, fromBackend), end: end)
            }
            self.relay.shards[0].adopt(self.tunnel)
        }

        func stop() async {
            await self.relay.stop()
            close(self.client)
            close(self.backend)
        }

        /// A connected stream socket pair; the relay's end is non-blocking, as NIO's sockets are.
        static func pair() throws -> (far: Int32, near: Int32) {
            var fds: [Int32] = [0, 0]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { throw IOError(errnoCode: errno, reason: "socketpair") }
            _ = fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK)
            return (fds[0], fds[1])
        }
    }

    @discardableResult
    static func write(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { return false }
            offset += n
        }
        return true
    }

    /// Runs blocking socket calls on a thread of their own, not on the concurrency pool (two threads here) that the
    /// other tests running in parallel need.
    static func offPool<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { continuation in
            Thread { continuation.resume(returning: body()) }.start()
        }
    }

    static func read(_ fd: Int32, count: Int, timeout: Duration = .seconds(5)) async -> (bytes: [UInt8], closed: Bool) {
        await Self.offPool { Self.blockingRead(fd, count: count, timeout: timeout) }
    }

    /// Reads until `count` bytes came, the peer closed, or `timeout` passed; `closed` tells whether it closed.
    static func blockingRead(_ fd: Int32, count: Int, timeout: Duration) -> (bytes: [UInt8], closed: Bool) {
        var result: [UInt8] = []
        let deadline = ContinuousClock.now + timeout
        var buffer = [UInt8](repeating: 0, count: 65536)
        while result.count < count, ContinuousClock.now < deadline {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&pfd, 1, 50) > 0 else { continue }
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, min($0.count, count - result.count)) }
            if n <= 0 { return (result, true) }
            result += buffer[0..<n]
        }
        return (result, false)
    }

    /// True when the peer closed (end of stream) within `timeout`, with no more bytes before it.
    static func seesEnd(_ fd: Int32, timeout: Duration = .seconds(5)) async -> Bool {
        let (bytes, closed) = await Self.read(fd, count: 1, timeout: timeout)
        return bytes.isEmpty && closed
    }

    static func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
        var state = seed
        return (0..<count).map { _ in
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return UInt8(truncatingIfNeeded: state >> 33)
        }
    }

    /// A shard that cannot be made (say, no descriptor left for its eventfd) fails the relay's start, and the
    /// shards made before it give their epoll instances and eventfds back instead of leaking them.
    @Test func aFailedStartReleasesTheShardsAlreadyMade() throws {
        struct NoDescriptors: Error {}
        let made = Mutex<[RelayShard]>([])
        #expect(throws: NoDescriptors.self) {
            _ = try TunnelRelay(count: 3) { index, cpu in
                guard index < 2 else { throw NoDescriptors() }
                let shard = try RelayShard(index: index, cpu: cpu)
                made.withLock { $0.append(shard) }
                return shard
            }
        }
        let shards = made.withLock { $0 }
        #expect(shards.count == 2)
        #expect(shards.map(\.isDiscarded) == [true, true])
    }

    @Test func relaysBothWaysAndReportsTheBytesWhenASideEnds() async throws {
        let rig = try Rig(webSocket: false)
        Self.write(rig.client, Array("hello backend".utf8))
        #expect(await Self.read(rig.backend, count: 13).bytes == Array("hello backend".utf8))
        Self.write(rig.backend, Array("hello client!!".utf8))
        #expect(await Self.read(rig.client, count: 14).bytes == Array("hello client!!".utf8))
        #expect(rig.relay.count == 1)

        shutdown(rig.client, Int32(SHUT_WR))
        #expect(await Self.seesEnd(rig.backend), "the backend side stayed open after the client ended")
        let reported = await waitFor { rig.closed.withLock { $0 } }
        #expect(reported?.0 == 13)
        #expect(reported?.1 == 14)
        #expect(rig.closed.end == .client)
        #expect(rig.relay.count == 0)
        await rig.stop()
    }

    /// Small and large writes from the backend, followed at once by its end, reach the client whole, in order, before
    /// the end.
    @Test(arguments: [UInt64(11), 12, 13, 14])
    func smallAndLargeWritesBeforeTheEndArriveInOrder(_ seed: UInt64) async throws {
        let rig = try Rig(webSocket: false)
        let small = Self.pattern(100, seed: seed)
        let large = Self.pattern(40 * 1024, seed: seed + 100)
        let tail = Self.pattern(300, seed: seed + 200)
        let expected = small + large + tail + small
        for part in [small, large, tail, small] { #expect(Self.write(rig.backend, part)) }
        shutdown(rig.backend, Int32(SHUT_WR))
        let received = await Self.read(rig.client, count: expected.count)
        #expect(received.bytes.count == expected.count)
        #expect(received.bytes == expected)
        #expect(await Self.seesEnd(rig.client))
        #expect(await waitFor { rig.closed.withLock { $0 } }?.1 == expected.count)
        #expect(rig.closed.end == .backend)
        await rig.stop()
    }

    @Test func aSlowReaderHoldsTheOtherSideBackAndLosesNothing() async throws {
        let rig = try Rig(webSocket: false)
        // Built (and compared below) off the concurrency pool: in a debug build that is a second of work, which would
        // hold up the timing-sensitive tests running beside this one.
        let payload = await Self.offPool { Self.pattern(4 << 20, seed: 7) }
        // The backend writes 4 MiB (several times what the two sockets hold) from its own thread while the client does
        // not read: the relay must stop reading the backend once the client's socket is full, so the backend blocks.
        let written = Atomic<Int>(0)
        let writer = Thread {
            var offset = 0
            while offset < payload.count {
                let n = payload[offset..<min(offset + 65536, payload.count)].withUnsafeBytes {
                    Glibc.write(rig.backend, $0.baseAddress, $0.count)
                }
                guard n > 0 else { return }
                offset += n
                written.store(offset, ordering: .relaxed)
            }
        }
        writer.start()
        try await Task.sleep(for: .milliseconds(500))
        let stalledAt = written.load(ordering: .relaxed)
        #expect(stalledAt < payload.count, "the backend wrote everything although nobody read")
        try await Task.sleep(for: .milliseconds(300))
        #expect(written.load(ordering: .relaxed) == stalledAt, "the relay kept reading the backend while the client was full")

        let received = await Self.read(rig.client, count: payload.count, timeout: .seconds(10)).bytes
        // Compared outside the expectation, which would print both arrays on a failure.
        let intact = await Self.offPool { received == payload }
        #expect(intact, "received \(received.count) of \(payload.count) bytes, not the bytes sent in order")
        await rig.stop()
    }

    /// Both directions at once, each writer and reader with its own random chunk sizes and pauses, so both sides'
    /// sockets fill and drain in every order: each stream must arrive whole and in order; with the relay thread
    /// yielding after its batches (`threads.yield_after_batch`, the default) and not.
    @Test(arguments: [UInt64(1), 2, 3], [true, false])
    func randomTrafficBothWaysArrivesIntact(seed: UInt64, yieldAfterBatch: Bool) async throws {
        let rig = try Rig(webSocket: false, yieldAfterBatch: yieldAfterBatch)
        // About twice what a socket pair holds per direction, so the relay has to keep bytes back both ways.
        let size = 512 << 10
        let (toBackend, toClient) = await Self.offPool { (Self.pattern(size, seed: seed), Self.pattern(size, seed: seed &+ 100)) }
        // Each direction: a writer thread and a reader thread with their own generators.
        func pump(from source: Int32, to sink: Int32, _ payload: [UInt8], seed: UInt64) async -> Bool {
            async let written: Void = Self.offPool {
                var random = SplitMix64(seed: seed)
                var offset = 0
                while offset < payload.count {
                    let end = min(payload.count, offset + 1 + Int(random.next() % 40_000))
                    guard Self.write(source, Array(payload[offset..<end])) else { return }
                    offset = end
                    if random.next() % 8 == 0 { usleep(UInt32(random.next() % 3_000)) }
                }
            }
            let received = await Self.offPool { () -> [UInt8] in
                var random = SplitMix64(seed: seed &+ 7)
                var result: [UInt8] = []
                result.reserveCapacity(payload.count)
                var buffer = [UInt8](repeating: 0, count: 50_000)
                let deadline = ContinuousClock.now + .seconds(20)
                while result.count < payload.count, ContinuousClock.now < deadline {
                    var pfd = pollfd(fd: sink, events: Int16(POLLIN), revents: 0)
                    guard poll(&pfd, 1, 50) > 0 else { continue }
                    let want = 1 + Int(random.next() % UInt64(buffer.count))
                    let n = buffer.withUnsafeMutableBytes { Glibc.read(sink, $0.baseAddress, want) }
                    if n <= 0 { break }
                    result += buffer[0..<n]
                    if random.next() % 4 == 0 { usleep(UInt32(random.next() % 5_000)) }
                }
                return result
            }
            await written
            return await Self.offPool { received == payload }
        }
        async let up = pump(from: rig.client, to: rig.backend, toBackend, seed: seed)
        async let down = pump(from: rig.backend, to: rig.client, toClient, seed: seed &+ 50)
        let (upIntact, downIntact) = await (up, down)
        #expect(upIntact, "client → backend stream damaged (seed \(seed), yield \(yieldAfterBatch))")
        #expect(downIntact, "backend → client stream damaged (seed \(seed), yield \(yieldAfterBatch))")
        await rig.stop()
    }

    @Test func closeAtAFrameBoundarySendsTheCloseFrame() async throws {
        let rig = try Rig()
        // One whole unmasked text frame from the backend.
        let frame: [UInt8] = [0x81, 0x05] + Array("hello".utf8)
        Self.write(rig.backend, frame)
        #expect(await Self.read(rig.client, count: frame.count).bytes == frame)
        rig.relay.shards[0].close(rig.tunnel, code: 4010)
        #expect(await Self.read(rig.client, count: 4).bytes == [0x88, 0x02, 0x0F, 0xAA])
        #expect(await Self.seesEnd(rig.client))
        #expect(await Self.seesEnd(rig.backend))
        #expect(await waitFor { rig.closed.withLock { $0 } } != nil)
        #expect(rig.closed.end == .proxy)
        await rig.stop()
    }

    @Test func closeInsideAFrameOnlyEndsTheConnection() async throws {
        let rig = try Rig()
        // A 10-byte frame of which only 5 payload bytes came: a close frame now would corrupt the stream.
        let partial: [UInt8] = [0x82, 0x0A, 1, 2, 3, 4, 5]
        Self.write(rig.backend, partial)
        #expect(await Self.read(rig.client, count: partial.count).bytes == partial)
        rig.relay.shards[0].close(rig.tunnel, code: 4010)
        #expect(await Self.seesEnd(rig.client), "the client got bytes after the partial frame")
        #expect(await Self.seesEnd(rig.backend))
        #expect(await waitFor { rig.closed.withLock { $0 } } != nil)
        #expect(rig.closed.end == .proxy)
        await rig.stop()
    }

    @Test func anIdleTunnelClosesAfterItsTimeoutAndTrafficKeepsOneOpen() async throws {
        // Before the idle tunnel is handed over: its idle time counts from when the relay registers it, which may come
        // before the busy one is made (making it took more than 10 ms on a loaded machine).
        let handedOver = ContinuousClock.now
        let idle = try Rig(idleTimeout: .seconds(1))
        let busy = try Rig(idleTimeout: .seconds(1))
        let started = ContinuousClock.now
        // A byte every 50 ms for 1.5 s, from a thread of its own: the concurrency pool may be held up by other tests.
        let (lastByte, bytes) = await Self.offPool { () -> (ContinuousClock.Instant, Int) in
            var last = started
            var count = 0
            while ContinuousClock.now - started < .milliseconds(1500) {
                last = ContinuousClock.now
                if Self.write(busy.client, [0]) { count += 1 }
                usleep(50_000)
            }
            return (last, count)
        }
        #expect(await Self.seesEnd(idle.client, timeout: .seconds(3)))
        #expect(await Self.seesEnd(idle.backend, timeout: .seconds(3)))
        #expect(await Self.seesEnd(busy.client, timeout: .seconds(3)))
        // Times as the relay thread saw them: the idle tunnel closed one timeout (plus at most two 250 ms sweeps)
        // after it opened; the busy one only a timeout after its last byte, every byte relayed.
        let idleEnd = try #require(idle.closed.at)
        let busyEnd = try #require(busy.closed.at)
        #expect(idleEnd - handedOver >= .milliseconds(990))
        #expect(idleEnd - handedOver < .milliseconds(2500))
        #expect(busyEnd - lastByte >= .milliseconds(990), "closed \(busyEnd - lastByte) after the last byte")
        #expect(busy.closed.withLock { $0 }?.0 == bytes)
        #expect(idle.closed.end == .idle)
        #expect(busy.closed.end == .idle)
        await idle.stop()
        await busy.stop()
    }

    @Test func stopEndsEveryTunnelAndReportsIt() async throws {
        let rig = try Rig()
        Self.write(rig.client, [1, 2, 3])
        _ = await Self.read(rig.backend, count: 3)
        await rig.relay.stop()
        #expect(rig.closed.withLock { $0 }?.0 == 3)
        #expect(rig.closed.end == .proxy)
        #expect(await Self.seesEnd(rig.client))
        #expect(await Self.seesEnd(rig.backend))
        close(rig.client)
        close(rig.backend)
    }

    private func waitFor<T>(_ value: () -> T?) async -> T? {
        for _ in 0..<200 {
            if let value = value() { return value }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return nil
    }
}
