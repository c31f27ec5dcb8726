// swift-tools-version: 6.1
import PackageDescription

// The data path's code is compiled without the run-time exclusivity checks in release builds: under HTTP load they
// were about 2.5 % of the proxy's profile (docs/benchmarks.md). A package can set this for its own targets only; the
// scripts' release build (`RELEASE_BUILD` in scripts/lib.sh) passes it on the command line so NIO's checks go too.
// Debug builds, and so the tests, keep them.
let hotPathSettings: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]

let package = Package(
    name: "ott-proxy",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "ott-proxy", targets: ["ott-proxy"]),
        .library(name: "ProxyCore", targets: ["ProxyCore"]),
        .library(name: "LuaRouting", targets: ["LuaRouting"]),
        .library(name: "RedisDirectory", targets: ["RedisDirectory"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
    ],
    targets: [
        .target(
            name: "ProxyCore",
            dependencies: [
                .product(name: "HeapModule", package: "swift-collections"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                "CProxySys",
            ],
            swiftSettings: hotPathSettings
        ),
        // Linux calls Swift's Glibc module leaves out (CPU affinity for `threads.cpu_affinity`).
        .target(
            name: "CProxySys",
            path: "Sources/CProxySys"
        ),
        // Lua 5.4 from the system (`liblua5.4-dev`), and the C shims Swift needs around it.
        .systemLibrary(
            name: "CLua",
            path: "Sources/CLua",
            pkgConfig: "lua5.4",
            providers: [.apt(["liblua5.4-dev"])]
        ),
        .target(
            name: "CLuaShim",
            dependencies: ["CLua"],
            path: "Sources/CLuaShim"
        ),
        // The Lua routing plugin: a `RoutingPolicy` driven by a sandboxed Lua script.
        .target(
            name: "LuaRouting",
            dependencies: [
                "ProxyCore",
                "CLuaShim",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Sources/Plugins/LuaRouting"
        ),
        // A small RESP client on SwiftNIO (pipelining, pool, reconnect, pub/sub, TLS) for the Redis ownership directory.
        .target(
            name: "RedisDirectory",
            dependencies: [
                "ProxyCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Sources/Plugins/RedisDirectory"
        ),
        // Test helper shared by test targets: runs a throwaway `redis-server` on a free loopback port.
        .target(
            name: "RedisTestSupport",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            path: "Tests/RedisTestSupport"
        ),
        // Small stateful servers that behave like a room server: used by `ott-proxy demo` and by the tests.
        .target(
            name: "DemoBackends",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
            ]
        ),
        .executableTarget(
            name: "ott-proxy",
            dependencies: [
                "ProxyCore",
                "LuaRouting",
                "RedisDirectory",
                "DemoBackends",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ]
        ),
        .testTarget(
            name: "ProxyCoreTests",
            dependencies: [
                "ProxyCore", .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "LuaRoutingTests",
            dependencies: [
                "LuaRouting",
                "ProxyCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "RedisDirectoryTests",
            dependencies: [
                "RedisDirectory",
                "RedisTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "PlacementTests",
            dependencies: ["ProxyCore"]
        ),
        .testTarget(
            name: "DemoBackendsTests",
            dependencies: [
                "DemoBackends",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "IntegrationTests",
            dependencies: [
                "ProxyCore",
                "RedisDirectory",
                "RedisTestSupport",
                "LuaRouting",
                "DemoBackends",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
