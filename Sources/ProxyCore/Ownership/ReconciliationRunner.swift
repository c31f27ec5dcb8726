import Logging
import NIOCore
import NIOHTTP1
import Synchronization

/// The latest reconciliation report per listener, for the admin API.
public final class ReconciliationReports: Sendable {
    private let reports = Mutex<[String: ReconciliationReport]>([:])

    public init() {}

    func set(_ report: ReconciliationReport, listener: String) {
        self.reports.withLock { $0[listener] = report }
    }

    public var all: [String: ReconciliationReport] { self.reports.withLock { $0 } }
}

/// Runs each listener's reconciliation probe on its interval, on one event loop (where that loop's policy lives).
///
/// Every pass fans the probe request out to the pool's backends, asks the policy which keys each answer names, adopts
/// keys nobody owns and reports duplicates. It never unloads anything itself.
final class ReconciliationRunner {
    private let loop: ProxyServer.LoopState
    private let reports: ReconciliationReports
    private var lastRun: [String: NIODeadline] = [:]
    /// The probe in flight per listener. Held here because nothing else keeps a probe's executor alive (its
    /// collectors reference it `unowned`).
    private var running: [String: FanoutExecutor] = [:]

    init(loop: ProxyServer.LoopState, reports: ReconciliationReports) {
        self.loop = loop
        self.reports = reports
    }

    func tick() {
        let generation = self.loop.generation
        let now = NIODeadline.now()
        for listener in generation.runtime.config.listeners {
            let policy = generation.policy(for: listener.name)
            guard let spec = policy.probe, self.running[listener.name] == nil else { continue }
            if let last = self.lastRun[listener.name], now < last + spec.interval { continue }
            self.lastRun[listener.name] = now
            self.run(listener: listener.name, spec: spec, policy: policy, runtime: generation.runtime)
        }
    }

    private func run(listener: String, spec: ProbeSpec, policy: RoutingPolicy, runtime: ProxyRuntime) {
        guard let pool = runtime.table.pools[spec.pool], let poolConfig = runtime.poolConfig(named: spec.pool) else {
            runtime.logger.error("reconciliation probe names an unknown pool", metadata: ["pool": "\(spec.pool)"])
            return
        }
        var headers = HTTPHeaders(spec.headers.map { ($0.name, $0.value) })
        if !headers.contains(name: "host") { headers.add(name: "host", value: "ott-proxy") }
        headers.add(name: "via", value: ForwardingHeaders.viaValue)
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: spec.path, headers: headers)
        let backends = pool.backends.filter { $0.canServeExistingKeys }
        let executor = FanoutExecutor(
            head: head, backends: backends, pool: self.loop.pool, timeout: spec.timeout,
            maxBody: max(runtime.config.limits.maxBufferedBody, 4 << 20), logger: runtime.logger)
        self.running[listener] = executor
        executor.run { [self] responses in
            self.running[listener] = nil
            var held: [String: [String]] = [:]
            for response in responses where (200..<300).contains(response.status) {
                do {
                    held[response.backend] = try policy.probeKeys(backend: response.backend, response: response)
                } catch {
                    runtime.metrics.countRoutingError()
                    runtime.logger.error(
                        "reconciliation: the policy could not read a probe answer",
                        metadata: ["backend": "\(response.backend)", "error": "\(error)"])
                }
            }
            var report = ReconciliationReport.compute(held: held) { runtime.directory.owner(of: $0)?.backend }
            report.backendsFailed = backends.map(\.id).filter { held[$0] == nil }.sorted()
            for (key, backend) in report.adopted {
                runtime.directory.claim(key: key, pool: spec.pool, backend: backend, idleTTL: poolConfig.idleTTL)
            }
            for duplicate in report.duplicates {
                runtime.logger.warning(
                    "key held by more than one backend",
                    metadata: ["key": "\(duplicate.key)", "holders": "\(duplicate.holders.joined(separator: ","))",
                               "owner": "\(duplicate.owner ?? "-")"])
            }
            runtime.metrics.recordReconciliation(adopted: report.adopted.count, duplicates: report.duplicates.count)
            if !report.adopted.isEmpty {
                runtime.logger.info("reconciliation adopted keys", metadata: ["count": "\(report.adopted.count)"])
            }
            self.reports.set(report, listener: listener)
        }
    }
}
