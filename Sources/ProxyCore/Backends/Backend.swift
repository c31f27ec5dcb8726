import NIOCore
import Synchronization

/// A backend as the data path sees it: its configuration, its resolved address, and live counters shared by every
/// event loop.
public final class Backend: Sendable {
    public let config: BackendConfig
    /// Resolved once when the configuration is applied, so no connection attempt ever waits on DNS.
    public let address: SocketAddress
    /// Requests in flight plus open tunnels, across all event loops (what least-connections balances on).
    let activeConnections = Atomic<Int>(0)
    let totalRequests = Atomic<Int>(0)
    /// Health state; shared with the previous generation's `Backend` of the same id and address (`BackendRegistry`).
    public let health: BackendHealth

    public var id: String { self.config.id }
    public var active: Int { self.activeConnections.load(ordering: .relaxed) }
    public var total: Int { self.totalRequests.load(ordering: .relaxed) }

    public init(config: BackendConfig, address: SocketAddress, health: BackendHealth? = nil) {
        self.config = config
        self.address = address
        self.health = health ?? BackendHealth(id: config.id)
    }

    public convenience init(config: BackendConfig, health: BackendHealth? = nil) throws {
        let address = try SocketAddress.makeAddressResolvingHost(config.host, port: config.port)
        self.init(config: config, address: address, health: health)
    }

    /// Health as far as this backend knows it (active checks and passive ejection feed it).
    public var isHealthy: Bool { self.isUsable }
    /// May take keys that nobody owns yet.
    public var acceptsNewKeys: Bool { self.isUsable }
    /// May keep serving the keys it already owns (a draining backend does; a down one does not).
    public var canServeExistingKeys: Bool {
        if self.isUsable { return true }
        let status = self.health.status
        return status.state == .draining && status.ejectedUntil == nil && status.passingChecks
    }

    func acquire() {
        self.activeConnections.add(1, ordering: .relaxed)
        self.totalRequests.add(1, ordering: .relaxed)
    }

    func release() {
        self.activeConnections.subtract(1, ordering: .relaxed)
    }
}

/// A named set of backends with a stateless balancer.
public final class Pool: Sendable {
    public let name: String
    public let balance: BalanceAlgorithm
    public let backends: [Backend]
    private let cursor = Atomic<Int>(0)
    /// Expanded by weight so a plain rotating cursor gives each backend its weighted share.
    private let weightedOrder: [Int]
    /// Ketama rings and Maglev tables for this generation's backends, built on first use, not per placement.
    let placementCache = Mutex(PlacementCache())

    public init(name: String, balance: BalanceAlgorithm, backends: [Backend]) {
        self.name = name
        self.balance = balance
        self.backends = backends
        self.weightedOrder = Balancer.interleavedWeightedOrder(weights: backends.map { $0.config.weight })
    }

    /// Picks a usable backend for a request that belongs to no key, or nil when the pool has none.
    public func pick() -> Backend? {
        guard !self.backends.isEmpty else { return nil }
        let turn = self.cursor.add(1, ordering: .relaxed).oldValue & Int.max
        switch self.balance {
        case .roundRobin:
            // The next usable backend in weighted order: an unusable one's turns go to the backends after it.
            let count = self.weightedOrder.count
            for step in 0..<count {
                let backend = self.backends[self.weightedOrder[(turn % count + step) % count]]
                if backend.isUsable { return backend }
            }
            return nil
        case .leastConnections:
            let usable = self.backends.filter(\.isUsable)
            guard !usable.isEmpty else { return nil }
            let index = Balancer.leastConnections(
                active: usable.map { $0.active },
                weights: usable.map { $0.config.weight },
                tieBreak: turn
            )
            return usable[index]
        }
    }
}

/// Pure balancing arithmetic, kept apart from the atomics so it can be tested exhaustively.
public enum Balancer {
    /// Smooth weighted round-robin order (nginx's algorithm): for weights [5,1,1] it yields a a b a c a a rather
    /// than a a a a a b c, so a heavy backend does not receive bursts.
    public static func interleavedWeightedOrder(weights: [Int]) -> [Int] {
        guard !weights.isEmpty else { return [] }
        let total = weights.reduce(0, +)
        var current = [Int](repeating: 0, count: weights.count)
        var order: [Int] = []
        order.reserveCapacity(total)
        for _ in 0..<total {
            var best = 0
            for i in weights.indices {
                current[i] += weights[i]
                if current[i] > current[best] { best = i }
            }
            current[best] -= total
            order.append(best)
        }
        return order
    }

    /// The index with the fewest active connections per unit of weight; ties rotate with `tieBreak` so equal
    /// backends share the load instead of the first one taking every request.
    public static func leastConnections(active: [Int], weights: [Int], tieBreak: Int) -> Int {
        precondition(!active.isEmpty && active.count == weights.count)
        let count = active.count
        let start = tieBreak % count
        var best = start
        for step in 1..<max(count, 1) {
            let i = (start + step) % count
            // Compare active[i]/weights[i] < active[best]/weights[best] without division.
            if active[i] * weights[best] < active[best] * weights[i] { best = i }
        }
        return best
    }
}
