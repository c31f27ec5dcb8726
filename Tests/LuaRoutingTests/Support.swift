import Foundation
import Logging
import LuaRouting
import NIOCore
import NIOHTTP1
import ProxyCore

/// Writes `source` to a fresh temporary `.lua` file and returns its path.
func scriptFile(_ source: String, name: String = "script.lua") -> String {
    let directory = FileManager.default.temporaryDirectory
        .appendingPathComponent("lua-routing-tests-\(UUID().uuidString)")
    try! FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    let url = directory.appendingPathComponent(name)
    try! source.write(to: url, atomically: true, encoding: .utf8)
    return url.path
}

let testEnvironment = StaticRoutingEnvironment(
    pools: [
        "rooms": [
            BackendSnapshot(id: "r1", pool: "rooms", region: "eu", tags: ["blue"], weight: 1, keys: 3, connections: 7),
            BackendSnapshot(id: "r2", pool: "rooms", healthy: false, weight: 2),
            BackendSnapshot(id: "r3", pool: "rooms", draining: true, weight: 1),
        ],
        "empty": [],
    ],
    owners: ["room:lobby": "r2"]
)

/// A log handler keeping what it receives.
final class CapturedLog: @unchecked Sendable {
    private let lock = NSLock()
    private var entries: [(Logger.Level, String)] = []

    func append(_ level: Logger.Level, _ message: String) {
        self.lock.withLock { self.entries.append((level, message)) }
    }

    var messages: [(Logger.Level, String)] {
        self.lock.withLock { self.entries }
    }

    var logger: Logger {
        Logger(label: "lua-test") { _ in CapturingHandler(log: self) }
    }
}

struct CapturingHandler: LogHandler {
    let log: CapturedLog
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        self.log.append(event.level, "\(event.message)")
    }
}

func policy(
    _ source: String,
    options: LuaValue = [:],
    limits: LuaLimits = LuaLimits(),
    log: CapturedLog = CapturedLog()
) throws -> LuaRoutingPolicy {
    try LuaRoutingPolicy(
        scriptPath: scriptFile(source),
        options: options,
        environment: testEnvironment,
        limits: limits,
        logger: log.logger
    )
}

func request(
    _ method: HTTPMethod = .GET,
    _ target: String = "/",
    headers: [(String, String)] = [],
    body: String? = nil,
    upgrade: Bool = false
) -> RouteRequest {
    let parts = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
    var request = RouteRequest(
        method: method,
        path: String(parts[0]),
        query: parts.count > 1 ? parts[1] : "",
        headers: HTTPHeaders(headers),
        host: "example.test",
        scheme: "https",
        clientIP: "203.0.113.9",
        isUpgrade: upgrade,
        listener: "public"
    )
    if let body {
        request.body = ByteBuffer(string: body)
    }
    return request
}

/// The `respond` body of a decision, for scripts that answer with what they saw.
func respondedBody(_ decision: RouteDecision) -> String? {
    if case .respond(let response) = decision.action { return response.body }
    return nil
}

extension LuaRoutingPolicy {
    /// Runs `route` with a script whose `route` returns `{respond = {status = 200, body = <expr>}}`.
    func body(_ request: RouteRequest) throws -> String? {
        respondedBody(try self.route(request))
    }
}
