import Foundation
import Logging
import LuaRouting
import NIOCore
import NIOPosix
import ProxyCore

/// Helpers for the Lua routing end-to-end tests: a policy factory built like the executable's `PolicyRegistry`
/// (which this target cannot import), per-test script directories, and backends that can be told apart.
enum LuaSupport {
    /// What `ott-proxy` uses: the listener's `routing` script when it has one, its pool otherwise.
    static func factory(logger: Logger = LuaSupport.quietLogger) -> RoutingPolicyFactory {
        { listener, _, environment in
            guard let routing = listener.routing else { return StaticPoolPolicy(pool: listener.pool) }
            return try LuaRoutingPolicy(
                scriptPath: routing.script,
                options: LuaValue(config: routing.options),
                environment: environment,
                limits: LuaLimits(instructionLimit: routing.instructionLimit, memoryLimit: routing.memoryLimit),
                logger: logger
            )
        }
    }

    /// Script errors are logged at `error` on purpose in these tests; keep the test output readable.
    static let quietLogger: Logger = {
        var logger = Logger(label: "test-script")
        logger.logLevel = .critical
        return logger
    }()

    static func withTimeout<T: Sendable>(
        _ what: String, _ timeout: Duration = .seconds(10), _ operation: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        try await WSSupport.withTimeout(timeout, what, operation)
    }
}

extension LuaValue {
    init(config value: ConfigValue) {
        switch value {
        case .null: self = .null
        case .bool(let bool): self = .bool(bool)
        case .int(let int): self = .int(int)
        case .double(let double): self = .double(double)
        case .string(let string): self = .string(string)
        case .list(let list): self = .array(list.map { LuaValue(config: $0) })
        case .map(let map): self = .table(map.mapValues { LuaValue(config: $0) })
        }
    }
}

/// A temporary directory for one test's scripts and configuration files.
final class ScriptDirectory: Sendable {
    let url: URL

    init() throws {
        self.url = FileManager.default.temporaryDirectory.appendingPathComponent("ott-proxy-lua-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: self.url, withIntermediateDirectories: true)
    }

    /// Writes (atomically: a reload never reads half a file) and returns the absolute path.
    @discardableResult
    func write(_ name: String, _ contents: String) throws -> String {
        let file = self.url.appendingPathComponent(name)
        try contents.write(to: file, atomically: true, encoding: .utf8)
        return file.path
    }

    func path(_ name: String) -> String {
        self.url.appendingPathComponent(name).path
    }

    func remove() {
        try? FileManager.default.removeItem(at: self.url)
    }
}

/// Three `TestOrigin`s with ids. Which one served a request is found by a marker header the request carried.
struct NamedOrigins: Sendable {
    static let markerHeader = "x-test-marker"

    let origins: [(id: String, origin: TestOrigin)]

    static func start(ids: [String] = ["a", "b", "c"]) async throws -> NamedOrigins {
        var origins: [(id: String, origin: TestOrigin)] = []
        for id in ids {
            origins.append((id, try await TestOrigin.start()))
        }
        return NamedOrigins(origins: origins)
    }

    var backends: [(id: String, port: Int)] { self.origins.map { ($0.id, $0.origin.port) } }

    func origin(_ id: String) -> TestOrigin { self.origins.first { $0.id == id }!.origin }

    /// The ids of the backends that received a request carrying `marker` (exactly one, when all went well).
    func receivers(of marker: String) -> [String] {
        self.origins.filter { $0.origin.requests.contains { $0.head.headers.first(name: Self.markerHeader) == marker } }.map(\.id)
    }

    /// Requests received, over all backends.
    var totalRequests: Int { self.origins.reduce(0) { $0 + $1.origin.requests.count } }

    /// The backend rendezvous hashing picks for `key` among `ids` (all weight 1), as the core places keys.
    static func rendezvous(_ key: String, among ids: [String]) -> String {
        ConsistentHashing.rendezvous(key: key, backends: ids.map { ($0, 1) })!
    }

    func stop() async {
        for (_, origin) in self.origins { await origin.stop() }
    }
}

/// Starts three named origins and a proxy whose listener runs `script` (pool `main` holds all three backends; more
/// pools can be added with `configure`), runs `body`, and tears everything down.
func withLuaProxy<T>(
    script: String,
    routing: (inout RoutingScriptConfig) -> Void = { _ in },
    group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
    configure: (inout ProxyConfig, NamedOrigins) -> Void = { _, _ in },
    _ body: (ProxyHarness, NamedOrigins) async throws -> T
) async throws -> T {
    let directory = try ScriptDirectory()
    defer { directory.remove() }
    let origins = try await NamedOrigins.start()
    do {
        let proxy = try await startLuaProxy(
            script: script, directory: directory, backends: origins.backends, group: group, routing: routing,
            configure: { configure(&$0, origins) })
        do {
            let result = try await body(proxy, origins)
            await proxy.stop()
            await origins.stop()
            return result
        } catch {
            await proxy.stop()
            throw error
        }
    } catch {
        await origins.stop()
        throw error
    }
}

/// A proxy whose only listener runs `script` (written into `directory`), with `backends` in pool `main`.
func startLuaProxy(
    script: String,
    directory: ScriptDirectory,
    backends: [(id: String, port: Int)],
    group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
    policyFactory: @escaping RoutingPolicyFactory = LuaSupport.factory(),
    routing: (inout RoutingScriptConfig) -> Void = { _ in },
    configure: (inout ProxyConfig) -> Void = { _ in }
) async throws -> ProxyHarness {
    let path = try directory.write("route.lua", script)
    return try await ProxyHarness.start(
        backends: backends, group: group, policyFactory: policyFactory,
        configure: { config in
            var settings = RoutingScriptConfig(script: path)
            routing(&settings)
            config.listeners[0].routing = settings
            configure(&config)
        })
}

extension RawHTTPConnection {
    /// Sends a request with a marker header (and `Content-Length` for a body) and reads its response.
    func request(
        _ method: String, _ target: String, marker: String? = nil, headers: [(String, String)] = [], body: String? = nil
    ) async throws -> Response {
        var text = "\(method) \(target) HTTP/1.1\r\nHost: test\r\n"
        if let marker { text += "\(NamedOrigins.markerHeader): \(marker)\r\n" }
        for (name, value) in headers { text += "\(name): \(value)\r\n" }
        if let body { text += "Content-Length: \(body.utf8.count)\r\n" }
        text += "\r\n" + (body ?? "")
        try await self.send(text)
        return try await self.readResponse(forMethod: method)
    }
}
