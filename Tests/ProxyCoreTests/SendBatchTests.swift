import CProxySys
import Foundation
import NIOCore
import Testing

@testable import ProxyCore

#if canImport(Glibc)
import Glibc
#endif

/// `SendBatch` (and the io_uring under it, SendBatch.c) over real socket pairs: what each send returns, and what the
/// far end receives.
@Suite struct SendBatchTests {
    /// Whether this process may use io_uring: the kernel allows it and no seccomp filter is in the way (a filter, as in
    /// Docker's default profile, may refuse it).
    static var kernelAllowsIOUring: Bool {
        let disabled = (try? String(contentsOfFile: "/proc/sys/kernel/io_uring_disabled", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        let seccomp = status.split(separator: "\n").first { $0.hasPrefix("Seccomp:") }?
            .split(separator: "\t").last.map(String.init)
        return (disabled == nil || disabled == "0") && seccomp == "0"
    }

    /// A connected stream socket pair with a small send buffer, so sends are short or refused once the far end has
    /// not read 16 KiB or so; both ends non-blocking, as the relay's are. (Unix, not TCP, sockets: on loopback TCP a
    /// window that filled reopens only at the sender's next zero-window probe, seconds later; the ring does not care
    /// which kind of stream socket it writes to.)
    static func pair() throws -> (far: Int32, near: Int32) {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else {
            throw IOError(errnoCode: errno, reason: "socketpair")
        }
        var size: Int32 = 8 * 1024
        _ = setsockopt(fds[1], SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        _ = fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK)
        _ = fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK)
        return (fds[0], fds[1])
    }

    /// Everything the far end can read now.
    static func drain(_ fd: Int32) -> [UInt8] {
        var got: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard n > 0 else { return got }
            got.append(contentsOf: chunk[0..<n])
        }
    }

    @Test("where the kernel allows io_uring the sends go through it, and a batch told not to never does")
    func ringIsUsedWhereAllowed() throws {
        let batch = SendBatch()
        let refused = batch.prepare()
        #expect(batch.usesRing == Self.kernelAllowsIOUring, "prepare() refused with errno \(refused.map(String.init) ?? "none")")
        #expect((refused == nil) == batch.usesRing)
        let plain = SendBatch(useRing: false)
        #expect(plain.prepare() == nil)
        #expect(!plain.usesRing)
    }

    @Test("each send of a batch writes what its socket takes, in order, and reports it", arguments: [true, false])
    func randomBatches(useRing: Bool) throws {
        let pairs = try (0..<24).map { _ in try Self.pair() }
        defer {
            for pair in pairs {
                close(pair.far)
                close(pair.near)
            }
        }
        var sent = [[UInt8]](repeating: [], count: pairs.count)
        var received = [[UInt8]](repeating: [], count: pairs.count)
        var random = SplitMix64(seed: useRing ? 0x5eed : 0xfeed)
        let pattern = (0..<24_300).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 8) }
        let batch = SendBatch(capacity: 16, useRing: useRing)
        var short = 0
        var refusedFull = 0
        for round in 0..<200 {
            // Up to 16 distinct sockets per batch (the relay never sends twice to one socket in a batch).
            let chosen = Array((0..<pairs.count).shuffled(using: &random).prefix(Int.random(in: 1...16, using: &random)))
            let payloads = chosen.map { _ in
                let offset = Int.random(in: 0..<256, using: &random)
                return Array(pattern[offset..<(offset + Int.random(in: 0...24_000, using: &random))])
            }
            batch.clear()
            let storage = payloads.map { bytes -> UnsafeMutableRawBufferPointer in
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 1)
                buffer.copyBytes(from: bytes)
                return buffer
            }
            defer { storage.forEach { $0.deallocate() } }
            for (slot, index) in chosen.enumerated() {
                let at = batch.append(fd: pairs[index].near, bytes: UnsafeRawPointer(storage[slot].baseAddress!), count: payloads[slot].count)
                #expect(at == slot)
            }
            batch.run()
            for (slot, index) in chosen.enumerated() {
                let result = batch.result(slot)
                if payloads[slot].isEmpty {
                    #expect(result == 0)
                } else if result == -Int(EAGAIN) {
                    refusedFull += 1
                } else {
                    #expect(result > 0 && result <= payloads[slot].count, "round \(round): send \(slot) returned \(result)")
                    if result < payloads[slot].count { short += 1 }
                    sent[index].append(contentsOf: payloads[slot][0..<max(0, min(result, payloads[slot].count))])
                }
            }
            // Now and then the far ends read, so the sockets fill and empty again.
            if Int.random(in: 0..<4, using: &random) == 0 {
                for index in pairs.indices { received[index].append(contentsOf: Self.drain(pairs[index].far)) }
            }
        }
        for index in pairs.indices {
            received[index].append(contentsOf: Self.drain(pairs[index].far))
            if received[index] == sent[index] { continue }
            let differ = zip(received[index], sent[index]).enumerated().first { $0.element.0 != $0.element.1 }?.offset
            Issue.record(
                "socket \(index): \(received[index].count) bytes received, \(sent[index].count) sent, first difference at \(differ.map(String.init) ?? "none")")
        }
        // The small buffers made some sends short and some refused: those paths ran.
        #expect(short > 0)
        #expect(refusedFull > 0)
    }

    @Test("a bad descriptor and a peer that went away fail their own sends only", arguments: [true, false])
    func failuresStayWithTheirSend(useRing: Bool) throws {
        let good = try Self.pair()
        let gone = try Self.pair()
        defer {
            close(good.far)
            close(good.near)
            close(gone.near)
        }
        close(gone.far)
        // The peer's reset comes back for the first bytes sent after its close; once it has, sends fail.
        let deadline = Date().addingTimeInterval(5)
        while cproxy_send_nowait(gone.near, "x", 1) >= 0, Date() < deadline { usleep(1_000) }
        // (Not a descriptor this test closed: another test running alongside could be given its number again.)
        let notADescriptor: Int32 = -1
        let batch = SendBatch(useRing: useRing)
        let message = Array("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".utf8)
        try message.withUnsafeBytes { bytes in
            let base = try #require(bytes.baseAddress)
            #expect(batch.append(fd: gone.near, bytes: base, count: bytes.count) == 0)
            #expect(batch.append(fd: notADescriptor, bytes: base, count: bytes.count) == 1)
            #expect(batch.append(fd: good.near, bytes: base, count: bytes.count) == 2)
            batch.run()  // (no SIGPIPE: MSG_NOSIGNAL)
        }
        #expect(batch.result(0) == -Int(EPIPE) || batch.result(0) == -Int(ECONNRESET))
        #expect(batch.result(1) == -Int(EBADF))
        #expect(batch.result(2) == message.count)
        #expect(Self.drain(good.far) == message)
        #expect(batch.usesRing == (useRing && Self.kernelAllowsIOUring))
    }
}
