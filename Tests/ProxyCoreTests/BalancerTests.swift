import NIOCore
import Testing

@testable import ProxyCore

@Suite("Balancer")
struct BalancerTests {
    @Test(
        "smooth weighted round-robin order",
        arguments: [
            ([5, 1, 1], [0, 0, 1, 0, 2, 0, 0]),
            ([1, 1, 1], [0, 1, 2]),
            ([1], [0]),
            ([3, 2], [0, 1, 0, 1, 0]),
            ([2, 1], [0, 1, 0]),
            ([1, 2], [1, 0, 1]),
            ([4, 3, 2, 1], [0, 1, 2, 0, 1, 3, 0, 2, 1, 0]),
            ([10, 1], [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]),
        ]
    )
    func exactOrder(weights: [Int], expected: [Int]) {
        #expect(Balancer.interleavedWeightedOrder(weights: weights) == expected)
    }

    @Test("no weights → empty order")
    func emptyOrder() {
        #expect(Balancer.interleavedWeightedOrder(weights: []) == [])
    }

    @Test(
        "each index appears exactly its weight, and every prefix stays within one pick of the ideal share",
        arguments: [[5, 1, 1], [1, 1, 1], [3, 2], [4, 3, 2, 1], [10, 1], [2, 2, 1], [7, 5, 3, 1], [1, 1, 1, 1, 1, 1]]
    )
    func smoothness(weights: [Int]) {
        let order = Balancer.interleavedWeightedOrder(weights: weights)
        let total = weights.reduce(0, +)
        #expect(order.count == total)
        var counts = [Int](repeating: 0, count: weights.count)
        for (k, index) in order.enumerated() {
            counts[index] += 1
            let picks = k + 1
            for i in weights.indices {
                // After `picks` picks, index i ideally has picks·w/total; smooth WRR never strays a whole pick away.
                #expect(abs(picks * weights[i] - total * counts[i]) < total, "weights \(weights), pick \(picks)")
            }
        }
        #expect(counts == weights)
    }

    @Test("[5,1,1]: the heavy backend never gets more than two in a row within a cycle, four across the wrap")
    func heavyBackendRuns() {
        let order = Balancer.interleavedWeightedOrder(weights: [5, 1, 1])
        #expect(longestRun(of: 0, in: order) == 2)
        // The order repeats (the pool's cursor wraps), and nginx's algorithm ends a cycle with a a and starts the
        // next with a a: four consecutive picks, still far from the naive a a a a a b c (five, then a gap of two).
        #expect(longestRun(of: 0, in: order + order) == 4)
        #expect(longestRun(of: 0, in: [0, 0, 0, 0, 0, 1, 2] + [0, 0, 0, 0, 0, 1, 2]) == 5)
    }

    private func longestRun(of value: Int, in sequence: [Int]) -> Int {
        var longest = 0
        var current = 0
        for element in sequence {
            current = element == value ? current + 1 : 0
            longest = max(longest, current)
        }
        return longest
    }

    @Test("least connections picks the fewest active per unit of weight")
    func leastConnectionsWeighted() {
        #expect(Balancer.leastConnections(active: [3, 1, 2], weights: [1, 1, 1], tieBreak: 0) == 1)
        // 3/4 < 1/1: the heavier backend still has room.
        #expect(Balancer.leastConnections(active: [3, 1], weights: [4, 1], tieBreak: 1) == 0)
        // 5/4 > 1/1.
        #expect(Balancer.leastConnections(active: [5, 1], weights: [4, 1], tieBreak: 0) == 1)
        #expect(Balancer.leastConnections(active: [7], weights: [1], tieBreak: 12) == 0)
    }

    @Test("ties rotate with the tie-break")
    func leastConnectionsTies() {
        let picks = (0..<6).map { Balancer.leastConnections(active: [0, 0, 0], weights: [1, 1, 1], tieBreak: $0) }
        #expect(picks == [0, 1, 2, 0, 1, 2])
        // 2/2 == 1/1: a weighted tie also rotates.
        #expect(Balancer.leastConnections(active: [2, 1], weights: [2, 1], tieBreak: 0) == 0)
        #expect(Balancer.leastConnections(active: [2, 1], weights: [2, 1], tieBreak: 1) == 1)
        // Only the tied minimum rotates; the busier backend is never chosen.
        let partial = (0..<4).map { Balancer.leastConnections(active: [1, 0, 0], weights: [1, 1, 1], tieBreak: $0) }
        #expect(partial == [1, 1, 2, 1])
    }
}

@Suite("Pool")
struct PoolTests {
    private func backend(_ id: String, port: Int, weight: Int = 1) throws -> Backend {
        Backend(
            config: BackendConfig(id: id, host: "127.0.0.1", port: port, weight: weight),
            address: try SocketAddress(ipAddress: "127.0.0.1", port: port))
    }

    private func tally(_ pool: Pool, picks: Int) -> [String: Int] {
        var counts: [String: Int] = [:]
        for _ in 0..<picks {
            if let picked = pool.pick() { counts[picked.id, default: 0] += 1 }
        }
        return counts
    }

    @Test("round-robin rotates over equal backends")
    func roundRobinEqual() throws {
        let pool = Pool(
            name: "p", balance: .roundRobin,
            backends: [try backend("a", port: 9001), try backend("b", port: 9002), try backend("c", port: 9003)])
        let firstSix = (0..<6).map { _ in pool.pick()?.id }
        #expect(firstSix == ["a", "b", "c", "a", "b", "c"])
        #expect(tally(pool, picks: 300) == ["a": 100, "b": 100, "c": 100])
    }

    @Test("round-robin honours weights over many picks")
    func roundRobinWeighted() throws {
        let pool = Pool(
            name: "p", balance: .roundRobin,
            backends: [
                try backend("a", port: 9001, weight: 5), try backend("b", port: 9002), try backend("c", port: 9003),
            ])
        let firstCycle = (0..<7).map { _ in pool.pick()?.id }
        #expect(firstCycle == ["a", "a", "b", "a", "c", "a", "a"])
        #expect(tally(pool, picks: 700) == ["a": 500, "b": 100, "c": 100])
    }

    @Test("least connections prefers the backend with fewer active connections")
    func leastConnectionsPrefersIdle() throws {
        let a = try backend("a", port: 9001)
        let b = try backend("b", port: 9002)
        let c = try backend("c", port: 9003)
        let pool = Pool(name: "p", balance: .leastConnections, backends: [a, b, c])
        a.acquire()
        a.acquire()
        b.acquire()
        #expect(tally(pool, picks: 10) == ["c": 10])

        c.acquire()
        c.acquire()
        #expect(a.active == 2 && b.active == 1 && c.active == 2)
        #expect(tally(pool, picks: 10) == ["b": 10])

        a.release()
        a.release()
        #expect(a.active == 0)
        #expect(a.total == 2)
        #expect(tally(pool, picks: 10) == ["a": 10])
    }

    @Test("least connections spreads evenly over idle backends")
    func leastConnectionsRotatesTies() throws {
        let pool = Pool(
            name: "p", balance: .leastConnections,
            backends: [try backend("a", port: 9001), try backend("b", port: 9002)])
        #expect(tally(pool, picks: 10) == ["a": 5, "b": 5])
    }

    @Test("least connections honours weights")
    func leastConnectionsWeighted() throws {
        let heavy = try backend("heavy", port: 9001, weight: 3)
        let light = try backend("light", port: 9002, weight: 1)
        let pool = Pool(name: "p", balance: .leastConnections, backends: [heavy, light])
        for _ in 0..<2 { heavy.acquire() }
        light.acquire()
        // 2/3 < 1/1.
        #expect(tally(pool, picks: 4) == ["heavy": 4])
    }

    @Test("an empty pool picks nothing", arguments: BalanceAlgorithm.allCases)
    func emptyPool(balance: BalanceAlgorithm) {
        let pool = Pool(name: "empty", balance: balance, backends: [])
        #expect(pool.pick() == nil)
        #expect(pool.pick() == nil)
    }
}
