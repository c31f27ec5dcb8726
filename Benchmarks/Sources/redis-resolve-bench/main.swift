// Cached resolve on the Redis ownership directory vs the in-memory one, release build, same loop, same query:
//   cd Benchmarks && swift run -c release redis-resolve-bench
// Starts redis-server (Debian's package) on a free loopback port and stops it.
import Foundation
import NIOPosix
import ProxyCore
import RedisDirectory

let port = 30_000 + Int.random(in: 0..<20_000)
let server = Process()
server.executableURL = URL(fileURLWithPath: "/usr/bin/redis-server")
server.arguments = ["--port", "\(port)", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
server.standardOutput = FileHandle.nullDevice
try server.run()
defer { server.terminate(); server.waitUntilExit() }

let redis = RedisOwnershipDirectory(
    configuration: try RedisConfiguration(url: "redis://127.0.0.1:\(port)"), prefix: "bench:",
    eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
var started = false
for _ in 0..<50 where !started {
    do {
        try await redis.start(timeout: .milliseconds(200))
        started = true
    } catch {
        try await Task.sleep(for: .milliseconds(100))
    }
}
let memory = InMemoryOwnershipDirectory()
let query = OwnershipQuery(
    key: "room:lobby", pool: "rooms", idleTTL: .seconds(330), stillValid: { _ in true }, place: { _, _ in "a" })
if case .pending(let future) = redis.resolve(query, on: nil) { _ = try await future.get() }
_ = memory.resolve(query, on: nil)

func measure(_ name: String, _ directory: OwnershipDirectory) {
    var samples: [Double] = []
    for _ in 0..<200 {
        let start = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<1_000 {
            guard case .owned = directory.resolve(query, on: nil) else { fatalError("\(name): not cached") }
        }
        samples.append(Double(DispatchTime.now().uptimeNanoseconds - start) / 1_000)
    }
    samples.sort()
    print("\(name): cached resolve p50 \(Int(samples[100])) ns, p99 \(Int(samples[198])) ns (200 × 1,000 calls)")
}
measure("in-memory", memory)
measure("redis", redis)
await redis.close()
