// ws-load: WebSocket load generator for the side-by-side benchmarks (scripts/bench-compare.sh).
//
//   ws-load echo --port P [--connections 1000] [--size 64] [--warmup 2] [--duration 10] [--threads 1]
//       Opens N WebSockets to ws://host:P/rooms/<i mod keys>/ws; each keeps exactly one 64-byte binary message in
//       flight (send, wait for the echo, send again). Counts echoes received inside the measuring window (after the
//       warm-up) and the round trip of each; prints messages/s, p50 and p99 (sorted-array percentiles).
//   ws-load idle --port P --connections N [--rss-pids PID,PID,...] [--settle 3]
//       Reads the summed VmRSS of the given processes, opens N WebSockets and leaves them idle, waits `settle`
//       seconds, reads VmRSS again and prints (after − before) / N. Then exits, which closes every connection.
//
// Output: one line `result key=value ...` that the script parses. The client is a minimal RFC 6455 client on raw
// NIO bytes (no frame decoder pipeline): client frames are masked with a zero key, which is valid and keeps the
// generator cheap.
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

// MARK: options

struct Options {
    var mode = "echo"
    var host = "127.0.0.1"
    var port = 18080
    var connections = 1000
    var size = 64
    var warmup = 2.0
    var duration = 10.0
    var threads = 1
    var concurrency = 64
    var keys = 1_000_000
    var rssPids: [Int32] = []
    var settle = 3.0
}

func usage() -> Never {
    print("usage: ws-load echo|idle --port P [--host H] [--connections N] [--size B] [--warmup S] [--duration S]")
    print("                          [--threads N] [--concurrency N] [--keys N] [--rss-pids P,P] [--settle S]")
    exit(2)
}

func parseOptions() -> Options {
    var o = Options()
    var args = CommandLine.arguments.dropFirst().makeIterator()
    guard let mode = args.next(), mode == "echo" || mode == "idle" else { usage() }
    o.mode = mode
    while let arg = args.next() {
        guard let value = args.next() else { usage() }
        switch arg {
        case "--host": o.host = value
        case "--port": o.port = Int(value) ?? o.port
        case "--connections": o.connections = Int(value) ?? o.connections
        case "--size": o.size = Int(value) ?? o.size
        case "--warmup": o.warmup = Double(value) ?? o.warmup
        case "--duration": o.duration = Double(value) ?? o.duration
        case "--threads": o.threads = Int(value) ?? o.threads
        case "--concurrency": o.concurrency = Int(value) ?? o.concurrency
        case "--keys": o.keys = Int(value) ?? o.keys
        case "--rss-pids": o.rssPids = value.split(separator: ",").compactMap { Int32($0) }
        case "--settle": o.settle = Double(value) ?? o.settle
        default: usage()
        }
    }
    return o
}

// MARK: the client handler

/// Sent down the pipeline (thread-safe) to start the echo loop with a fixed measuring window.
struct StartEcho: Sendable {
    var frame: ByteBuffer
    var measureFrom: UInt64
    var measureUntil: UInt64
}

/// Asks the handler for its samples at the end.
struct Collect: Sendable {
    var promise: EventLoopPromise<ConnectionResult>
}

struct ConnectionResult: Sendable {
    var samplesMicros: [UInt32]
    var messages: Int
    var open: Bool
}

enum LoadError: Error { case badHandshake(String), closedBeforeUpgrade, handshakeTimeout }

final class WSClientHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum State { case handshaking, open, closed }

    private var state = State.handshaking
    private var cumulation: ByteBuffer?
    private let upgraded: EventLoopPromise<Void>
    private let request: String
    private var timeout: Scheduled<Void>?

    private var frame: ByteBuffer?
    private var sentAt: UInt64 = 0
    private var measureFrom: UInt64 = 0
    private var measureUntil: UInt64 = 0
    private var samples: [UInt32] = []
    private var messages = 0

    init(path: String, host: String, upgraded: EventLoopPromise<Void>) {
        self.upgraded = upgraded
        self.request = "GET \(path) HTTP/1.1\r\nHost: \(host)\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(Self.wrapOutboundOut(context.channel.allocator.buffer(string: self.request)), promise: nil)
        let promise = self.upgraded
        self.timeout = context.eventLoop.scheduleTask(in: .seconds(20)) { promise.fail(LoadError.handshakeTimeout) }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if self.state == .handshaking { self.upgraded.fail(LoadError.closedBeforeUpgrade) }
        self.state = .closed
        self.timeout?.cancel()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if self.state == .handshaking { self.upgraded.fail(error) }
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let start = event as? StartEcho {
            self.frame = start.frame
            self.measureFrom = start.measureFrom
            self.measureUntil = start.measureUntil
            self.samples.reserveCapacity(4096)
            self.send(context: context)
        } else if let collect = event as? Collect {
            collect.promise.succeed(
                ConnectionResult(samplesMicros: self.samples, messages: self.messages, open: self.state == .open))
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    private func send(context: ChannelHandlerContext) {
        guard let frame = self.frame, self.state == .open else { return }
        self.sentAt = NIODeadline.now().uptimeNanoseconds
        context.writeAndFlush(Self.wrapOutboundOut(frame), promise: nil)
    }

    private func received(context: ChannelHandlerContext) {
        guard self.frame != nil else { return }
        let now = NIODeadline.now().uptimeNanoseconds
        if now >= self.measureFrom && now < self.measureUntil {
            self.messages += 1
            let micros = (now &- self.sentAt) / 1000
            self.samples.append(UInt32(clamping: micros))
        }
        if now < self.measureUntil { self.send(context: context) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = Self.unwrapInboundIn(data)
        if var buffer = self.cumulation, buffer.readableBytes > 0 {
            self.cumulation = nil  // keep the buffer uniquely referenced while appending
            buffer.writeBuffer(&incoming)
            self.cumulation = buffer
        } else {
            self.cumulation = incoming
        }
        if self.state == .handshaking {
            guard self.parseHandshake(context: context) else { return }
        }
        guard self.state == .open else { return }
        self.parseFrames(context: context)
    }

    /// True once the 101 head has been consumed.
    private func parseHandshake(context: ChannelHandlerContext) -> Bool {
        guard var buffer = self.cumulation else { return false }
        let view = buffer.readableBytesView
        var end: Int? = nil
        var i = view.startIndex
        while i + 3 < view.endIndex {
            if view[i] == 13 && view[i + 1] == 10 && view[i + 2] == 13 && view[i + 3] == 10 { end = i + 4; break }
            i += 1
        }
        guard let end else { return false }
        let headLength = end - view.startIndex
        let head = buffer.readString(length: headLength) ?? ""
        self.cumulation = buffer
        self.timeout?.cancel()
        guard head.hasPrefix("HTTP/1.1 101") else {
            self.upgraded.fail(LoadError.badHandshake(String(head.prefix(40))))
            context.close(promise: nil)
            return false
        }
        self.state = .open
        self.upgraded.succeed()
        return true
    }

    private func parseFrames(context: ChannelHandlerContext) {
        guard var buffer = self.cumulation else { return }
        self.cumulation = nil
        var echoes = 0
        while buffer.readableBytes >= 2 {
            let start = buffer.readerIndex
            let b0: UInt8 = buffer.getInteger(at: start)!
            let b1: UInt8 = buffer.getInteger(at: start + 1)!
            var length = Int(b1 & 0x7f)
            var header = 2
            if length == 126 {
                guard let l: UInt16 = buffer.getInteger(at: start + 2) else { break }
                length = Int(l)
                header = 4
            } else if length == 127 {
                guard let l: UInt64 = buffer.getInteger(at: start + 2) else { break }
                length = Int(l)
                header = 10
            }
            if b1 & 0x80 != 0 { header += 4 }
            guard buffer.readableBytes >= header + length else { break }
            buffer.moveReaderIndex(forwardBy: header + length)
            switch b0 & 0x0f {
            case 1, 2: echoes += 1
            case 8:
                self.state = .closed
                context.close(promise: nil)
                return
            default: break
            }
        }
        if buffer.readableBytes == 0 { buffer.clear() }
        self.cumulation = buffer
        for _ in 0..<echoes { self.received(context: context) }
    }
}

// MARK: helpers

func rssKiB(_ pids: [Int32]) -> Int {
    var total = 0
    for pid in pids {
        guard let file = fopen("/proc/\(pid)/status", "r") else { continue }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 512)
        while fgets(&line, Int32(line.count), file) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if text.hasPrefix("VmRSS:") {
                total += Int(text.dropFirst(6).filter { $0.isNumber }) ?? 0
                break
            }
        }
    }
    return total
}

func makeFrame(size: Int, allocator: ByteBufferAllocator) -> ByteBuffer {
    var frame = allocator.buffer(capacity: size + 14)
    frame.writeInteger(UInt8(0x82))  // FIN + binary
    if size < 126 {
        frame.writeInteger(UInt8(0x80 | size))
    } else if size <= 0xffff {
        frame.writeInteger(UInt8(0x80 | 126))
        frame.writeInteger(UInt16(size))
    } else {
        frame.writeInteger(UInt8(0x80 | 127))
        frame.writeInteger(UInt64(size))
    }
    frame.writeInteger(UInt32(0))  // zero masking key: payload goes out as is
    frame.writeRepeatingByte(UInt8(ascii: "x"), count: size)
    return frame
}

func percentile(_ sorted: [UInt32], _ p: Double) -> Double {
    guard !sorted.isEmpty else { return 0 }
    let index = min(sorted.count - 1, max(0, Int((p / 100 * Double(sorted.count)).rounded(.up)) - 1))
    return Double(sorted[index]) / 1000.0  // milliseconds
}

func fmt(_ value: Double) -> String {
    let scaled = (value * 1000).rounded() / 1000
    return "\(scaled)"
}

// MARK: main

let options = parseOptions()
let group = MultiThreadedEventLoopGroup(numberOfThreads: options.threads)

func connectOne(_ index: Int) async throws -> any Channel {
    let loop = group.next()
    let upgraded = loop.makePromise(of: Void.self)
    let path = "/rooms/r\(index % options.keys)/ws"
    let host = "\(options.host):\(options.port)"
    let channel: any Channel
    do {
        channel = try await ClientBootstrap(group: loop)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(10))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        WSClientHandler(path: path, host: host, upgraded: upgraded))
                }
            }
            .connect(host: options.host, port: options.port)
            .get()
    } catch {
        upgraded.fail(error)
        throw error
    }
    do {
        try await upgraded.futureResult.get()
    } catch {
        channel.close(promise: nil)
        throw error
    }
    return channel
}

/// Opens `count` connections, at most `concurrency` handshakes at a time.
func openAll(count: Int, concurrency: Int) async -> (channels: [any Channel], failed: Int, firstError: String?) {
    await withTaskGroup(of: Result<any Channel, any Error>.self) { tasks in
        var channels: [any Channel] = []
        channels.reserveCapacity(count)
        var failed = 0
        var firstError: String? = nil
        var next = 0
        while next < min(concurrency, count) {
            let i = next
            tasks.addTask { do { return .success(try await connectOne(i)) } catch { return .failure(error) } }
            next += 1
        }
        while let result = await tasks.next() {
            switch result {
            case .success(let channel): channels.append(channel)
            case .failure(let error):
                failed += 1
                if firstError == nil { firstError = "\(error)" }
            }
            if next < count {
                let i = next
                tasks.addTask { do { return .success(try await connectOne(i)) } catch { return .failure(error) } }
                next += 1
            }
        }
        return (channels, failed, firstError)
    }
}

func sleepSeconds(_ seconds: Double) async {
    try? await Task.sleep(nanoseconds: UInt64(seconds * 1e9))
}

let rssBefore = options.mode == "idle" ? rssKiB(options.rssPids) : 0
let connectStart = NIODeadline.now()
let (channels, failed, firstError) = await openAll(count: options.connections, concurrency: options.concurrency)
let connectSeconds = Double((NIODeadline.now() - connectStart).nanoseconds) / 1e9
if let firstError {
    print("ws-load: \(failed) connection(s) failed; first error: \(firstError)")
}

switch options.mode {
case "idle":
    await sleepSeconds(options.settle)
    let rssAfter = rssKiB(options.rssPids)
    let stillOpen = channels.filter { $0.isActive }.count
    let perConnection = channels.isEmpty ? 0 : Double(rssAfter - rssBefore) * 1024 / Double(channels.count)
    print(
        "result mode=idle connections=\(options.connections) opened=\(channels.count) failed=\(failed) "
            + "still_open=\(stillOpen) connect_seconds=\(fmt(connectSeconds)) rss_before_kib=\(rssBefore) "
            + "rss_after_kib=\(rssAfter) bytes_per_conn=\(Int(perConnection.rounded()))")
default:
    let frame = makeFrame(size: options.size, allocator: ByteBufferAllocator())
    let now = NIODeadline.now().uptimeNanoseconds
    let from = now + UInt64(options.warmup * 1e9)
    let until = from + UInt64(options.duration * 1e9)
    for channel in channels {
        channel.pipeline.fireUserInboundEventTriggered(StartEcho(frame: frame, measureFrom: from, measureUntil: until))
    }
    await sleepSeconds(options.warmup + options.duration + 0.3)
    var samples: [UInt32] = []
    var messages = 0
    var stillOpen = 0
    for channel in channels {
        let promise = channel.eventLoop.makePromise(of: ConnectionResult.self)
        // A closed channel has no handler left to answer: give up on it after a moment.
        channel.eventLoop.scheduleTask(in: .seconds(1)) { promise.fail(LoadError.closedBeforeUpgrade) }
        channel.pipeline.fireUserInboundEventTriggered(Collect(promise: promise))
        if let result = try? await promise.futureResult.get() {
            samples.append(contentsOf: result.samplesMicros)
            messages += result.messages
            if result.open { stillOpen += 1 }
        }
    }
    samples.sort()
    print(
        "result mode=echo connections=\(options.connections) opened=\(channels.count) failed=\(failed) "
            + "still_open=\(stillOpen) size=\(options.size) seconds=\(options.duration) messages=\(messages) "
            + "msgs_per_s=\(Int((Double(messages) / options.duration).rounded())) "
            + "p50_ms=\(fmt(percentile(samples, 50))) p99_ms=\(fmt(percentile(samples, 99))) "
            + "max_ms=\(fmt(percentile(samples, 100)))")
}
for channel in channels { channel.close(promise: nil) }
exit(0)
