// swift-tools-version: 6.1
// Micro benchmarks of the hot paths (package-benchmark). A separate package so the main build and CI stay lean:
//   cd Benchmarks && swift package --allow-writing-to-package-directory benchmark
import PackageDescription

let package = Package(
    name: "ott-proxy-benchmarks",
    platforms: [.macOS(.v14)],
    dependencies: [
        .package(name: "ott-proxy", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark.git", from: "1.38.1", traits: ["MallocInterposer"]),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
    ],
    targets: [
        .executableTarget(
            name: "RoutingBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "ProxyCore", package: "ott-proxy"),
                .product(name: "LuaRouting", package: "ott-proxy"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Benchmarks/RoutingBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        // Load tools for scripts/bench-compare.sh (ott-proxy side by side with HAProxy and nginx).
        .executableTarget(
            name: "ws-echo-origin",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
            ],
            path: "Sources/ws-echo-origin"
        ),
        .executableTarget(
            name: "ws-load",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            path: "Sources/ws-load"
        ),
        .executableTarget(
            name: "nio-relay",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            path: "Sources/nio-relay"
        ),
        // raw-relay (docs/benchmarks.md, eighth session): ott-proxy's per-request HTTP work on plain epoll threads.
        .target(name: "CRawRelay", path: "Sources/CRawRelay"),
        .executableTarget(
            name: "raw-relay",
            dependencies: [
                "CRawRelay",
                .product(name: "ProxyCore", package: "ott-proxy"),
                .product(name: "LuaRouting", package: "ott-proxy"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Sources/raw-relay"
        ),
        .executableTarget(
            name: "route-bench",
            dependencies: [
                .product(name: "ProxyCore", package: "ott-proxy"),
                .product(name: "LuaRouting", package: "ott-proxy"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Sources/route-bench"
        ),
        .executableTarget(
            name: "redis-resolve-bench",
            dependencies: [
                .product(name: "ProxyCore", package: "ott-proxy"),
                .product(name: "RedisDirectory", package: "ott-proxy"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            path: "Sources/redis-resolve-bench"
        ),
    ],
    swiftLanguageModes: [.v6]
)
