import NIOCore

/// Active HTTP health checks of every backend of a pool (`pools.<name>.health_check`).
public struct HealthCheckConfig: Sendable, Equatable {
    /// Request target of the check (`GET <path>`, with the backend's `host:port` as `Host`).
    public var path: String
    /// Time between the end of one check and the start of the next (jittered by ±10 %).
    public var interval: TimeAmount
    /// Connecting, sending and receiving the response head must all happen within this.
    public var timeout: TimeAmount
    /// Consecutive passing checks that bring an unhealthy backend back.
    public var rise: Int
    /// Consecutive failing checks that take a healthy backend out.
    public var fall: Int
    /// Response statuses that count as passing.
    public var expectStatus: StatusSet

    public init(
        path: String = "/healthz",
        interval: TimeAmount = .seconds(5),
        timeout: TimeAmount = .seconds(2),
        rise: Int = 2,
        fall: Int = 3,
        expectStatus: StatusSet = StatusSet([200...200])
    ) {
        self.path = path
        self.interval = interval
        self.timeout = timeout
        self.rise = rise
        self.fall = fall
        self.expectStatus = expectStatus
    }
}

/// A set of HTTP status codes, written as codes (`200`) and classes (`2xx`).
public struct StatusSet: Sendable, Equatable {
    public var ranges: [ClosedRange<Int>]

    public init(_ ranges: [ClosedRange<Int>]) {
        self.ranges = ranges
    }

    public func contains(_ status: Int) -> Bool {
        self.ranges.contains { $0.contains(status) }
    }

    /// `200` → 200...200, `2xx` → 200...299; nil for anything else.
    static func parseItem(_ text: String) -> ClosedRange<Int>? {
        let lower = text.lowercased()
        if lower.count == 3, lower.hasSuffix("xx"), let digit = Int(lower.prefix(1)), (1...5).contains(digit) {
            return (digit * 100)...(digit * 100 + 99)
        }
        if let code = Int(text), (100...599).contains(code), String(code) == text {
            return code...code
        }
        return nil
    }
}

/// Passive ejection from the outcome of real requests (`pools.<name>.passive`).
public struct PassiveConfig: Sendable, Equatable {
    /// Consecutive failures that eject a backend; 0 turns passive ejection off.
    public var consecutiveFailures: Int
    /// Whether a 5xx response counts as a failure (connect failures and timeouts always do).
    public var count5xx: Bool
    /// How long the first ejection lasts; each further consecutive ejection doubles it.
    public var ejectionTime: TimeAmount
    /// The doubling stops here.
    public var maxEjectionTime: TimeAmount

    public init(
        consecutiveFailures: Int = 5,
        count5xx: Bool = false,
        ejectionTime: TimeAmount = .seconds(10),
        maxEjectionTime: TimeAmount = .minutes(5)
    ) {
        self.consecutiveFailures = consecutiveFailures
        self.count5xx = count5xx
        self.ejectionTime = ejectionTime
        self.maxEjectionTime = maxEjectionTime
    }
}

/// Where a pool's backends come from besides its static list (`pools.<name>.discovery`).
public struct DiscoveryConfig: Sendable, Equatable {
    public var dns: DNSDiscoveryConfig

    public init(dns: DNSDiscoveryConfig) {
        self.dns = dns
    }
}

/// Backends from the A/AAAA records of one DNS name, re-resolved on an interval.
public struct DNSDiscoveryConfig: Sendable, Equatable {
    public var name: String
    /// The port every discovered address is reached on.
    public var port: Int
    public var interval: TimeAmount

    public init(name: String, port: Int, interval: TimeAmount = .seconds(5)) {
        self.name = name
        self.port = port
        self.interval = interval
    }
}
