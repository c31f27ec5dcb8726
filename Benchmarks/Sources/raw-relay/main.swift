// raw-relay: a measurement, not a proxy. It answers one question for docs/benchmarks.md: what would ott-proxy's
// keep-alive HTTP path cost if it ran outside SwiftNIO's channels, on its own epoll threads (as the tunnel relay
// already does for WebSockets), with the same per-request work?
//
// Per request it does what ott-proxy's fast path does, with ott-proxy's own code: find the head's end and parse it
// (`HTTP1Scan`), build the `RouteRequest` and run the Lua routing script (`LuaRoutingPolicy`, one Lua state per
// thread), resolve the key's owner (`ProxyRuntime.resolve`, the in-memory ownership directory), rewrite the request
// head for the backend and the response head for the client (`HTTP1Scan`), with one recv and one send per side.
// It also reads the clock at the head's start and the response's end, holds the key's lease for the exchange, and
// records `requests_total` and the duration histogram, as the fast path does. It leaves out what a real proxy must
// also do: the access log (off in the benchmarks anyway), response deadlines and idle timers, pooling across client
// connections (each client connection keeps its own backend connection, and a backend closing it closes the
// client's too), retries, partial-write back-pressure (a send that would block waits in poll), bodies on requests,
// chunked responses and every error answer (a bad or unexpected input closes the connection). So its numbers are a
// lower bound on the cost of that design, not a result of ott-proxy.
//
//   raw-relay --port 18140 --origin 127.0.0.1:18081 --origin 127.0.0.1:18082 [--threads 2] [--pin]
//             [--script routing-scripts/path-key.lua --option prefix=rooms --option pool=http]
import CRawRelay
import Foundation
import Logging
import LuaRouting
import NIOCore
import NIOHTTP1
@_spi(Benchmarks) import ProxyCore

struct Options {
    var port = 18140
    var origins: [(host: String, port: Int)] = []
    var threads = 2
    var pin = false
    var script: String?
    var options: [String: LuaValue] = [:]

    init(_ arguments: [String]) {
        var iterator = arguments.dropFirst().makeIterator()
        while let argument = iterator.next() {
            switch argument {
            case "--port": self.port = Int(iterator.next()!)!
            case "--threads": self.threads = Int(iterator.next()!)!
            case "--pin": self.pin = true
            case "--script": self.script = iterator.next()!
            case "--origin":
                let parts = iterator.next()!.split(separator: ":")
                self.origins.append((String(parts[0]), Int(parts[1])!))
            case "--option":
                let parts = iterator.next()!.split(separator: "=", maxSplits: 1)
                self.options[String(parts[0])] = .string(String(parts[1]))
            default:
                fatalError("unknown argument \(argument)")
            }
        }
        precondition(!self.origins.isEmpty, "at least one --origin")
    }
}

let options = Options(CommandLine.arguments)
let backends = options.origins.enumerated().map {
    BackendConfig(id: "http-\($0.offset + 1)", host: $0.element.host, port: $0.element.port)
}
let config = ProxyConfig(pools: [PoolConfig(name: "http", backends: backends)])
let runtime = ProxyRuntime(
    config: config, table: try RoutingTable(config: config), logger: Logger(label: "raw-relay"),
    accessLogger: Logger(label: "raw-relay"), metrics: ProxyMetrics(listeners: ["http"]))
let environment = StaticRoutingEnvironment(pools: ["http": backends.map { BackendSnapshot(id: $0.id, pool: "http") }])

/// One client connection and its own backend connection.
final class Connection {
    enum State {
        case awaitingHead
        case awaitingResponseHead(HTTPMethod)
        case body(remaining: Int, status: Int)
    }

    let client: Int32
    let slot: Int
    var upstream: Int32 = -1
    var upstreamID = ""
    /// The exchange in flight: its key (leased) and the clock at its head's first byte.
    var key: String?
    var started = NIODeadline.uptimeNanoseconds(0)
    var state = State.awaitingHead
    let inbound = UnsafeMutableRawBufferPointer.allocate(byteCount: 16384, alignment: 16)
    var inboundCount = 0
    let response = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
    var responseCount = 0

    init(client: Int32, slot: Int) {
        self.client = client
        self.slot = slot
    }

    deinit {
        self.inbound.deallocate()
        self.response.deallocate()
    }
}

final class Worker: @unchecked Sendable {  // each worker is used by its one thread only
    let index: Int
    let options: Options
    let runtime: ProxyRuntime
    let epoll: Int32
    let listener: Int32
    let policy: LuaRoutingPolicy?
    let record: (Int, Int64) -> Void
    var connections: [Connection?] = []
    var free: [Int] = []
    var out = ByteBufferAllocator().buffer(capacity: 65536)
    static let listenerToken = UInt64.max

    init(index: Int, options: Options, runtime: ProxyRuntime, environment: StaticRoutingEnvironment) throws {
        self.index = index
        self.options = options
        self.runtime = runtime
        self.record = runtime.metrics.requestRecorder(listener: "http")!
        self.epoll = rr_epoll_create()
        self.listener = rr_listen("127.0.0.1", Int32(options.port))
        precondition(self.listener >= 0, "listen: \(-self.listener)")
        precondition(rr_epoll_ctl(self.epoll, 1, self.listener, RR_IN, Self.listenerToken) == 0)
        self.policy = try options.script.map {
            try LuaRoutingPolicy(
                scriptPath: $0, options: .table(options.options), environment: environment,
                logger: Logger(label: "raw-relay"))
        }
    }

    func run() {
        if self.options.pin { _ = rr_bind_cpu(Int32(self.index)) }
        var data = [UInt64](repeating: 0, count: 256)
        var events = [UInt32](repeating: 0, count: 256)
        while true {
            let count = rr_epoll_wait(self.epoll, &data, &events, 256, -1)
            guard count > 0 else { continue }
            for i in 0..<Int(count) {
                if data[i] == Self.listenerToken {
                    self.acceptAll()
                    continue
                }
                let slot = Int(data[i] >> 1)
                guard slot < self.connections.count, let connection = self.connections[slot] else { continue }
                if data[i] & 1 == 0 {
                    self.clientReadable(connection)
                } else {
                    self.upstreamReadable(connection)
                }
            }
        }
    }

    private func acceptAll() {
        while true {
            let fd = rr_accept(self.listener)
            guard fd >= 0 else { return }
            let slot = self.free.popLast() ?? { self.connections.append(nil); return self.connections.count - 1 }()
            let connection = Connection(client: fd, slot: slot)
            self.connections[slot] = connection
            _ = rr_epoll_ctl(self.epoll, 1, fd, RR_IN, UInt64(slot) << 1)
        }
    }

    private func close(_ connection: Connection) {
        if let key = connection.key { self.runtime.directory.releaseLease(key: key) }
        rr_close(connection.client)
        if connection.upstream >= 0 { rr_close(connection.upstream) }
        self.connections[connection.slot] = nil
        self.free.append(connection.slot)
    }

    private func clientReadable(_ connection: Connection) {
        let space = connection.inbound.count - connection.inboundCount
        let n = rr_recv(connection.client, connection.inbound.baseAddress! + connection.inboundCount, space)
        if n == -Int(EAGAIN) { return }
        guard n > 0 else { return self.close(connection) }
        if connection.inboundCount == 0 { connection.started = .now() }
        connection.inboundCount += n
        if case .awaitingHead = connection.state { self.processRequest(connection) }
    }

    private func processRequest(_ connection: Connection) {
        let bytes = UnsafeRawBufferPointer(rebasing: connection.inbound[0..<connection.inboundCount])
        guard let end = HTTP1ScanBenchmarks.headEnd(bytes) else { return }
        let headBytes = UnsafeRawBufferPointer(rebasing: bytes[0..<end])
        guard let head = HTTP1ScanBenchmarks.requestHead(headBytes) else { return self.close(connection) }
        let target: RouteTarget
        if let policy = self.policy {
            let request = RouteRequest(head: head, isUpgrade: false, scheme: "http", clientIP: "127.0.0.1", listener: "http")
            guard let decision = try? policy.route(request), case .forward(let decided) = decision.action else {
                return self.close(connection)
            }
            target = decided
        } else {
            // Without a script: the key is the path's second segment, as path-key.lua takes it.
            let segments = head.uri.utf8.split(separator: UInt8(ascii: "/"))
            target = segments.count >= 2
                ? .keyed(key: "room:" + String(Substring(segments[1])), pool: "http", placement: "rendezvous")
                : .pool("http")
        }
        let backend: Backend
        switch self.runtime.resolve(target, on: nil, acquiringLease: true) {
        case .backend(let resolved):
            backend = resolved
        case .owned(let resolved, let ownership):
            backend = resolved
            connection.key = ownership.key  // (its lease came with the answer)
        default:
            return self.close(connection)
        }
        if connection.upstreamID != backend.id {
            if connection.upstream >= 0 { rr_close(connection.upstream) }
            let fd = rr_connect(backend.config.host, Int32(backend.config.port))
            guard fd >= 0 else { return self.close(connection) }
            connection.upstream = fd
            connection.upstreamID = backend.id
            _ = rr_epoll_ctl(self.epoll, 1, fd, RR_IN, UInt64(connection.slot) << 1 | 1)
        }
        self.out.clear()
        guard HTTP1ScanBenchmarks.rewriteRequestHead(
            headBytes, method: head.method, added: [], clientIP: "127.0.0.1", into: &self.out)
        else { return self.close(connection) }
        guard self.sendAll(connection.upstream) else { return self.close(connection) }
        let rest = connection.inboundCount - end
        if rest > 0 { (connection.inbound.baseAddress! + 0).copyMemory(from: connection.inbound.baseAddress! + end, byteCount: rest) }
        connection.inboundCount = rest
        if rest > 0 { connection.started = .now() }
        connection.state = .awaitingResponseHead(head.method)
    }

    private func upstreamReadable(_ connection: Connection) {
        let space = connection.response.count - connection.responseCount
        let n = rr_recv(connection.upstream, connection.response.baseAddress! + connection.responseCount, space)
        if n == -Int(EAGAIN) { return }
        guard n > 0 else { return self.close(connection) }
        connection.responseCount += n
        switch connection.state {
        case .awaitingResponseHead(let method):
            let bytes = UnsafeRawBufferPointer(rebasing: connection.response[0..<connection.responseCount])
            guard let end = HTTP1ScanBenchmarks.headEnd(bytes) else { return }
            self.out.clear()
            guard let summary = HTTP1ScanBenchmarks.rewriteResponseHead(
                UnsafeRawBufferPointer(rebasing: bytes[0..<end]), requestMethod: method, into: &self.out),
                let length = summary.bodyLength
            else { return self.close(connection) }
            let status = summary.status
            let available = min(connection.responseCount - end, length)
            self.out.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[end..<(end + available)]))
            connection.responseCount = 0
            guard self.sendAll(connection.client) else { return self.close(connection) }
            self.finish(connection, remaining: length - available, status: status)
        case .body(let remaining, let status):
            let taken = min(connection.responseCount, remaining)
            self.out.clear()
            self.out.writeBytes(UnsafeRawBufferPointer(rebasing: connection.response[0..<taken]))
            connection.responseCount = 0
            guard self.sendAll(connection.client) else { return self.close(connection) }
            self.finish(connection, remaining: remaining - taken, status: status)
        case .awaitingHead:
            self.close(connection)
        }
    }

    private func finish(_ connection: Connection, remaining: Int, status: Int) {
        if remaining > 0 {
            connection.state = .body(remaining: remaining, status: status)
            return
        }
        connection.state = .awaitingHead
        let now = NIODeadline.now()
        if let key = connection.key {
            self.runtime.directory.releaseLease(key: key)
            connection.key = nil
        }
        self.record(status, (now - connection.started).nanoseconds)
        if connection.inboundCount > 0 { self.processRequest(connection) }
    }

    /// Sends `out` whole; a send that would block waits in poll (a simplification a real proxy cannot make).
    private func sendAll(_ fd: Int32) -> Bool {
        self.out.withUnsafeReadableBytes { bytes in
            var sent = 0
            while sent < bytes.count {
                let n = rr_send(fd, bytes.baseAddress! + sent, bytes.count - sent)
                if n == -Int(EAGAIN) {
                    _ = rr_wait_writable(fd)
                    continue
                }
                guard n > 0 else { return false }
                sent += n
            }
            return true
        }
    }
}

let workers = try (0..<options.threads).map {
    try Worker(index: $0, options: options, runtime: runtime, environment: environment)
}
for worker in workers.dropFirst() {
    let thread = Thread { worker.run() }
    thread.start()
}
FileHandle.standardError.write(Data(
    "raw-relay listening on 127.0.0.1:\(options.port) with \(options.threads) threads, script \(options.script ?? "none")\n".utf8))
workers[0].run()
