import Benchmark
import Foundation
import Logging
import LuaRouting
import NIOCore
import NIOHTTP1
@_spi(Benchmarks) import ProxyCore

/// The per-request work outside the socket calls: the routing decision (Lua), forwarding-header rewriting, framing
/// validation and backend selection.
let benchmarks: @Sendable () -> Void = {
    // Each sample runs the operation 1,000 times (scalingFactor .kilo); times are reported per operation.
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal],
        timeUnits: .nanoseconds,
        scalingFactor: .kilo,
        maxDuration: .seconds(3),
        maxIterations: 100_000
    )

    let scripts = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("routing-scripts")
    let environment = StaticRoutingEnvironment(pools: [
        "rooms": ["a", "b", "c"].map { BackendSnapshot(id: $0, pool: "rooms") }
    ])
    let headers = HTTPHeaders([
        ("Host", "watch.example.com"), ("User-Agent", "Mozilla/5.0"), ("Accept", "*/*"),
        ("Cookie", "session=abc123"),
    ])
    let request = RouteRequest(
        method: .GET, path: "/rooms/lobby/ws", query: "", headers: headers, host: "watch.example.com",
        scheme: "http", clientIP: "10.1.2.3", isUpgrade: false, listener: "public")

    // One complete route() decision: request table built, path-key script run, decision read back.
    Benchmark("route() path-key.lua") { benchmark in
        let policy = try LuaRoutingPolicy(
            scriptPath: scripts.appendingPathComponent("path-key.lua").path, environment: environment,
            logger: Logger(label: "bench"))
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            blackHole(try policy.route(request))
        }
    }

    Benchmark("route() stateless.lua") { benchmark in
        let policy = try LuaRoutingPolicy(
            scriptPath: scripts.appendingPathComponent("stateless.lua").path, environment: environment,
            logger: Logger(label: "bench"))
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            blackHole(try policy.route(request))
        }
    }

    let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/rooms/lobby", headers: headers)
    Benchmark("ForwardingHeaders.upstreamRequestHead") { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(
                ForwardingHeaders.upstreamRequestHead(
                    from: head, framing: .none, upgrade: nil, clientIP: "10.1.2.3", scheme: "http"))
        }
    }

    Benchmark("RequestValidator.framing + validateHost") { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(try RequestValidator.framing(of: head))
            try RequestValidator.validateHost(of: head)
        }
    }

    // The fast path's byte scanners on what the load benchmark sends and gets back (wrk's request head, the head
    // nginx answers a 1 KiB static file with): per keep-alive request, one of each.
    let requestHead = Array("GET /rooms/bench/1k HTTP/1.1\r\nHost: 127.0.0.1:18130\r\n\r\n".utf8)
    let responseHead = Array(
        ("HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 22:30:00 GMT\r\n"
            + "Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
            + "Last-Modified: Thu, 26 Nov 2026 20:00:00 GMT\r\nConnection: keep-alive\r\n"
            + "ETag: \"6767a0c0-400\"\r\nAccept-Ranges: bytes\r\n\r\n").utf8)
    Benchmark("HTTP1Scan.parseRequestHead (wrk head)") { benchmark in
        requestHead.withUnsafeBytes { bytes in
            for _ in benchmark.scaledIterations {
                blackHole(HTTP1ScanBenchmarks.requestHead(bytes))
            }
        }
    }

    Benchmark("HTTP1Scan.headEnd + rewriteResponseHead (nginx head)") { benchmark in
        var out = ByteBufferAllocator().buffer(capacity: 512)
        responseHead.withUnsafeBytes { bytes in
            for _ in benchmark.scaledIterations {
                out.clear()
                blackHole(HTTP1ScanBenchmarks.headEnd(bytes))
                blackHole(HTTP1ScanBenchmarks.rewriteResponseHead(bytes, requestMethod: .GET, into: &out))
            }
        }
    }

    let backends = (1...8).map { (id: "backend-\($0)", weight: 1) }
    Benchmark("ConsistentHashing.rendezvous (8 backends)") { benchmark in
        for index in benchmark.scaledIterations {
            blackHole(ConsistentHashing.rendezvous(key: "room:\(index & 1023)", backends: backends))
        }
    }

    // A resolve of a key the directory already holds: what every request of a known room costs.
    Benchmark("OwnershipDirectory.resolve (cached key)") { benchmark in
        let directory = InMemoryOwnershipDirectory()
        let query = OwnershipQuery(
            key: "room:lobby", pool: "rooms", idleTTL: .seconds(330), stillValid: { _ in true },
            place: { _, _ in "a" })
        _ = directory.resolve(query, on: nil)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            blackHole(directory.resolve(query, on: nil))
        }
    }

    // One pass of the background sweep (every 2 s) over 100,000 live keys, none expired: the time it holds the
    // directory's lock, during which every keyed request on every loop waits.
    Benchmark(
        "OwnershipDirectory.sweep (100,000 keys, none expired)",
        configuration: .init(metrics: [.wallClock, .mallocCountTotal], timeUnits: .microseconds, scalingFactor: .one)
    ) { benchmark in
        let directory = InMemoryOwnershipDirectory()
        for index in 0..<100_000 {
            let query = OwnershipQuery(
                key: "room:\(index)", pool: "rooms", idleTTL: .seconds(330), stillValid: { _ in true },
                place: { _, _ in "a" })
            _ = directory.resolve(query, on: nil)
        }
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            blackHole(directory.sweep())
        }
        // Before the directory is freed at the end of the closure (100,000 entries): that is not the sweep's time.
        benchmark.stopMeasurement()
        withExtendedLifetime(directory) {}
    }

    // The whole keyed resolve a request of a known room makes (`ProxyRuntime.resolve`): pool lookups, the owner
    // check, and the backend. mallocCountTotal shows whether a placement query is being built for it.
    Benchmark("ProxyRuntime.resolve keyed (cached key)") { benchmark in
        let config = ProxyConfig(pools: [
            PoolConfig(name: "rooms", backends: ["a", "b", "c"].enumerated().map {
                BackendConfig(id: $0.element, host: "127.0.0.1", port: 9001 + $0.offset)
            })
        ])
        let runtime = ProxyRuntime(
            config: config, table: try RoutingTable(config: config), logger: Logger(label: "bench"),
            accessLogger: Logger(label: "bench"), metrics: ProxyMetrics(listeners: []))
        let target = RouteTarget.keyed(key: "room:lobby", pool: "rooms", placement: "rendezvous")
        _ = runtime.resolve(target, on: nil)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            blackHole(runtime.resolve(target, on: nil))
        }
    }

    // One placement per strategy over 100 backends (what a key's first request costs on top of the resolve).
    let candidates = (0..<100).map {
        PlacementCandidate(id: "backend-\($0)", weight: 1 + $0 % 3, keys: $0 * 7 % 50, connections: $0 * 3 % 20)
    }
    for strategy in PlacementStrategyKind.allCases {
        Benchmark("Placement.place \(strategy.rawValue) (100 backends)") { benchmark in
            var cache = PlacementCache()
            for index in benchmark.scaledIterations {
                let request = PlacementRequest(key: "room:\(index & 4095)", strategy: strategy, seed: UInt64(index), turn: index)
                blackHole(Placement.place(request, candidates: candidates, cache: &cache))
            }
        }
    }
}
