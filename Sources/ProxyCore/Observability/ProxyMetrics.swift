import Prometheus

/// The proxy's metrics, on a registry of its own (not the process-global `MetricsSystem`), so several proxies in
/// one process (tests, the demo) never share counters. Instruments are created once; the data path only increments.
public final class ProxyMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry
    private let requests: [String: [Counter]]
    private let upstreamErrors: [UpstreamErrorKind: Counter]
    private let connections: [String: Gauge]
    let tunnelsOpen: Gauge
    /// Of those, the ones the relay threads carry (`threads.tunnel_relay`).
    let tunnelsRelayed: Gauge
    /// Client connections the HTTP relay threads serve (`threads.http_relay`).
    let httpRelayed: Gauge
    let requestDuration: DurationHistogram
    /// Connections the fast path handed over to the full HTTP pipeline.
    let fastPathHandoffs: Counter
    let rejectedConnections: Counter
    let routingErrors: Counter
    let adoptedKeys: Counter
    let duplicateKeys: Gauge
    let reloads: [String: Counter]

    public enum UpstreamErrorKind: String, CaseIterable, Sendable {
        case connectFailed = "connect_failed"
        case connectTimeout = "connect_timeout"
        case responseTimeout = "response_timeout"
        case closedEarly = "closed_before_response"
        case resetMidResponse = "reset_mid_response"
    }

    public init(listeners: [String], registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        var requests: [String: [Counter]] = [:]
        var connections: [String: Gauge] = [:]
        for listener in listeners {
            requests[listener] = (1...5).map { klass in
                registry.makeCounter(
                    descriptor: Self.named("requests", unit: "total", help: "Requests answered, by listener and status class."),
                    labels: [("listener", listener), ("code", "\(klass)xx")]
                )
            }
            connections[listener] = registry.makeGauge(
                descriptor: Self.named("client_connections", unit: "", help: "Client connections open, by listener."),
                labels: [("listener", listener)]
            )
        }
        self.requests = requests
        self.connections = connections
        var errors: [UpstreamErrorKind: Counter] = [:]
        for kind in UpstreamErrorKind.allCases {
            errors[kind] = registry.makeCounter(
                descriptor: Self.named("upstream_errors", unit: "total", help: "Failures talking to backends, by kind."),
                labels: [("kind", kind.rawValue)]
            )
        }
        self.upstreamErrors = errors
        self.tunnelsOpen = registry.makeGauge(
            descriptor: Self.named("tunnels", unit: "", help: "Upgraded connections (WebSockets) open."))
        self.tunnelsRelayed = registry.makeGauge(
            descriptor: Self.named(
                "tunnels_relayed", unit: "",
                help: "Open upgraded connections carried by the relay threads (threads.tunnel_relay) rather than NIO channels."))
        self.httpRelayed = registry.makeGauge(
            descriptor: Self.named(
                "http_relayed_connections", unit: "",
                help: "Open keep-alive HTTP client connections served by the HTTP relay threads (threads.http_relay) rather than NIO channels."))
        self.requestDuration = registry.makeDurationHistogram(
            descriptor: Self.named("request_duration", unit: "seconds", help: "Time from the first byte of the request head to the response end."),
            buckets: [.milliseconds(1), .milliseconds(5), .milliseconds(25), .milliseconds(100), .milliseconds(500),
                      .seconds(2), .seconds(10), .seconds(60)]
        )
        self.fastPathHandoffs = registry.makeCounter(
            descriptor: Self.named("fast_path_handoffs", unit: "total", help: "Client connections the fast path handed to the full HTTP path (a request it does not handle)."))
        self.rejectedConnections = registry.makeCounter(
            descriptor: Self.named("rejected_connections", unit: "total", help: "Client connections closed at accept because max_connections was reached."))
        self.routingErrors = registry.makeCounter(
            descriptor: Self.named("routing_errors", unit: "total", help: "Requests the routing policy failed on (script error, budget exceeded, bad decision)."))
        self.adoptedKeys = registry.makeCounter(
            descriptor: Self.named("reconciliation_adopted_keys", unit: "total", help: "Keys nobody owned that a reconciliation probe found on a backend and adopted."))
        self.duplicateKeys = registry.makeGauge(
            descriptor: Self.named("duplicate_keys", unit: "", help: "Keys the last reconciliation probe found on more than one backend (or off their owner)."))
        var reloads: [String: Counter] = [:]
        for result in ["ok", "failed"] {
            reloads[result] = registry.makeCounter(
                descriptor: Self.named("reloads", unit: "total", help: "Configuration reloads, by result."),
                labels: [("result", result)])
        }
        self.reloads = reloads
    }

    func countRoutingError() {
        self.routingErrors.increment()
    }

    func recordReconciliation(adopted: Int, duplicates: Int) {
        self.adoptedKeys.increment(by: Int64(adopted))
        self.duplicateKeys.set(Double(duplicates))
    }

    func countReload(succeeded: Bool) {
        self.reloads[succeeded ? "ok" : "failed"]?.increment()
    }

    /// Every series is `ott_proxy_<name>[_<unit>]`.
    private static func named(_ name: String, unit: String, help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "ott_proxy", metricName: name, unitName: unit, helpText: help)
    }

    func countRequest(listener: String, status: Int) {
        self.requestCounters(listener: listener)?.count(status: status)
    }

    /// A listener's request counters, for a handler to keep (the metrics object outlives reloads): counting then
    /// costs no dictionary lookup per request.
    func requestCounters(listener: String) -> RequestCounters? {
        self.requests[listener].map(RequestCounters.init)
    }

    /// One listener's `requests_total` counters by status class.
    struct RequestCounters {
        fileprivate let byClass: [Counter]

        func count(status: Int) {
            self.byClass[min(max(status / 100, 1), 5) - 1].increment()
        }
    }

    func countUpstreamError(_ kind: UpstreamErrorKind) {
        self.upstreamErrors[kind]?.increment()
    }

    func connectionOpened(listener: String) {
        self.connections[listener]?.increment()
    }

    func connectionClosed(listener: String) {
        self.connections[listener]?.decrement()
    }

    public func prometheusText() -> String {
        self.registry.emitToString()
    }
}
