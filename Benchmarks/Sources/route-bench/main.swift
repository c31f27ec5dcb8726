// A plain loop over route() for profiling (`perf record`): cd Benchmarks && swift run -c release route-bench [calls]
import Foundation
import Logging
import LuaRouting
import NIOHTTP1
import ProxyCore

let scripts = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("routing-scripts")
let environment = StaticRoutingEnvironment(pools: ["rooms": ["a", "b", "c"].map { BackendSnapshot(id: $0, pool: "rooms") }])
let headers = HTTPHeaders([
    ("Host", "watch.example.com"), ("User-Agent", "Mozilla/5.0"), ("Accept", "*/*"), ("Cookie", "session=abc123"),
])
let request = RouteRequest(
    method: .GET, path: "/rooms/lobby/ws", query: "", headers: headers, host: "watch.example.com",
    scheme: "http", clientIP: "10.1.2.3", isUpgrade: false, listener: "public")
let policy = try LuaRoutingPolicy(
    scriptPath: scripts.appendingPathComponent("path-key.lua").path, environment: environment, logger: Logger(label: "bench"))
let calls = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1]) ?? 2_000_000 : 2_000_000
let start = DispatchTime.now().uptimeNanoseconds
for _ in 0..<calls { _ = try policy.route(request) }
let elapsed = DispatchTime.now().uptimeNanoseconds - start
print("route() path-key.lua: \(Double(elapsed) / Double(calls)) ns per call over \(calls) calls")
