/// A backend as placement sees it: identity, weight, region, load and limits, and whether it may take new keys.
public struct PlacementCandidate: Sendable, Equatable {
    public var id: String
    /// Relative capacity. A candidate with a weight ≤ 0 is never given a new key.
    public var weight: Int
    public var region: String?
    /// Keys the backend currently owns.
    public var keys: Int
    /// Open connections to the backend: in-flight requests and open WebSockets alike.
    public var connections: Int
    /// The backend is full (takes no new key) when `keys >= maxKeys`.
    public var maxKeys: Int?
    /// The backend is full (takes no new key) when `connections >= maxConnections`.
    public var maxConnections: Int?
    /// Healthy and not draining. Placement of new keys only ever uses usable candidates.
    public var usable: Bool

    public init(
        id: String,
        weight: Int = 1,
        region: String? = nil,
        keys: Int = 0,
        connections: Int = 0,
        maxKeys: Int? = nil,
        maxConnections: Int? = nil,
        usable: Bool = true
    ) {
        self.id = id
        self.weight = weight
        self.region = region
        self.keys = keys
        self.connections = connections
        self.maxKeys = maxKeys
        self.maxConnections = maxConnections
        self.usable = usable
    }

    /// A candidate from a routing snapshot: usable when healthy and not draining.
    public init(_ snapshot: BackendSnapshot, maxKeys: Int? = nil, maxConnections: Int? = nil) {
        self.init(
            id: snapshot.id,
            weight: snapshot.weight,
            region: snapshot.region,
            keys: snapshot.keys,
            connections: snapshot.connections,
            maxKeys: maxKeys,
            maxConnections: maxConnections,
            usable: snapshot.healthy && !snapshot.draining
        )
    }

    /// Usable, with a positive weight, and below both of its limits.
    public var eligible: Bool {
        guard self.usable, self.weight > 0 else { return false }
        if let maxKeys = self.maxKeys, self.keys >= maxKeys { return false }
        if let maxConnections = self.maxConnections, self.connections >= maxConnections { return false }
        return true
    }
}

/// The placement strategies, one for each name in `PlacementStrategy.names`.
public enum PlacementStrategyKind: String, CaseIterable, Sendable {
    /// Fewest keys per unit of weight; ties by the key's rendezvous score, so every proxy picks the same one.
    case leastKeys = "least-keys"
    /// Fewest connections (requests and WebSockets) per unit of weight; ties as for least-keys.
    case leastConnections = "least-connections"
    /// Two candidates drawn by weight from a hash of the key and the seed; the one with fewer keys per weight.
    case powerOfTwoChoices = "power-of-two-choices"
    /// One candidate drawn by weight from a hash of the key and the seed.
    case random
    /// Smooth weighted round-robin (nginx's order) over the eligible candidates, at position `turn`.
    case weightedRoundRobin = "weighted-round-robin"
    /// Weighted highest-random-weight hashing of the key.
    case rendezvous
    /// Ketama ring (libketama / nginx points) of the key.
    case ketama
    /// Maglev table (65537 entries) of the key.
    case maglev
    /// Jump consistent hash of the key over the eligible candidates sorted by id, `weight` buckets each.
    case jump
    /// Consistent hashing with bounded loads: the first candidate in the key's probe order below its capacity.
    case boundedLoad = "bounded-load"
}

/// One placement question: which backend should own `key`?
public struct PlacementRequest: Sendable {
    public var key: String
    public var strategy: PlacementStrategyKind
    /// Prefer eligible candidates in this region; use the others only when it has none.
    public var preferredRegion: String?
    /// Bounded-load ε: each candidate may hold up to (1 + ε) times its weighted share of the keys (plus the new
    /// one), rounded up. Negative values count as 0.
    public var balanceFactor: Double = 0.25
    /// Caller-provided randomness for random and power-of-two-choices: the same seed gives the same answer.
    public var seed: UInt64
    /// Rotation counter for weighted-round-robin (any integer; taken modulo the total weight).
    public var turn: Int

    public init(
        key: String,
        strategy: PlacementStrategyKind,
        preferredRegion: String? = nil,
        balanceFactor: Double = 0.25,
        seed: UInt64 = 0,
        turn: Int = 0
    ) {
        self.key = key
        self.strategy = strategy
        self.preferredRegion = preferredRegion
        self.balanceFactor = balanceFactor
        self.seed = seed
        self.turn = turn
    }
}

/// Placement of new keys: pure functions of the request and the candidates (no I/O, no shared state). The same
/// inputs give the same answer on every machine, whatever the order of `candidates`.
///
/// Candidates are first filtered to the eligible ones (usable, weight > 0, below `maxKeys` and `maxConnections`);
/// when `preferredRegion` names a region holding an eligible candidate, only that region's candidates remain.
/// The strategy then chooses among them, in id order. The answer is nil when no candidate is eligible.
public enum Placement {
    /// The id of the backend that should own `request.key`, or nil when no candidate is eligible.
    ///
    /// Ketama and Maglev build their ring/table on every call here; callers that place many keys over the same
    /// candidates should keep a `PlacementCache` and use `place(_:candidates:cache:)`.
    public static func place(_ request: PlacementRequest, candidates: [PlacementCandidate]) -> String? {
        var cache = PlacementCache(capacity: 0)
        return self.place(request, candidates: candidates, cache: &cache)
    }

    /// As `place(_:candidates:)`, reusing the Ketama rings and Maglev tables in `cache`. The cache never changes
    /// an answer, only its cost.
    public static func place(
        _ request: PlacementRequest,
        candidates: [PlacementCandidate],
        cache: inout PlacementCache
    ) -> String? {
        let chosen = self.eligible(candidates, preferredRegion: request.preferredRegion)
        guard !chosen.isEmpty else { return nil }
        if chosen.count == 1 { return chosen[0].id }
        let keyHash = ConsistentHashing.hash64(request.key)
        switch request.strategy {
        case .leastKeys:
            return self.leastLoaded(chosen, keyHash: keyHash, load: \.keys)
        case .leastConnections:
            return self.leastLoaded(chosen, keyHash: keyHash, load: \.connections)
        case .powerOfTwoChoices:
            return self.powerOfTwoChoices(chosen, keyHash: keyHash, seed: request.seed)
        case .random:
            let h = ConsistentHashing.mix64(keyHash ^ ConsistentHashing.mix64(request.seed ^ randomSalt))
            return chosen[self.weightedIndex(chosen, h, excluding: nil)].id
        case .weightedRoundRobin:
            let order = Balancer.interleavedWeightedOrder(weights: chosen.map(\.weight))
            let position = ((request.turn % order.count) + order.count) % order.count
            return chosen[order[position]].id
        case .rendezvous:
            return ConsistentHashing.rendezvous(key: request.key, backends: chosen.map { ($0.id, $0.weight) })
        case .ketama:
            return cache.ketama(for: chosen).lookup(request.key)
        case .maglev:
            return cache.maglev(for: chosen).lookup(request.key)
        case .jump:
            let total = chosen.reduce(0) { $0 + $1.weight }
            let bucket = ConsistentHashing.jump(key: keyHash, buckets: total)
            var end = 0
            for candidate in chosen {
                end += candidate.weight
                if bucket < end { return candidate.id }
            }
            return chosen[chosen.count - 1].id
        case .boundedLoad:
            return self.boundedLoad(chosen, keyHash: keyHash, balanceFactor: request.balanceFactor)
        }
    }

    /// The candidates a strategy chooses among: eligible, in the preferred region when it has any, sorted by id.
    public static func eligible(_ candidates: [PlacementCandidate], preferredRegion: String?) -> [PlacementCandidate] {
        var eligible = candidates.filter(\.eligible)
        if let preferredRegion {
            let local = eligible.filter { $0.region == preferredRegion }
            if !local.isEmpty { eligible = local }
        }
        eligible.sort { $0.id < $1.id }
        return eligible
    }

    /// The per-candidate capacities bounded-load enforces: ⌈(1 + ε) · (total keys + 1) · weight / total weight⌉,
    /// which for n equal weights is ⌈(1 + ε) · (total keys + 1) / n⌉. Totals are over `candidates` as given.
    public static func boundedLoadCapacities(_ candidates: [PlacementCandidate], balanceFactor: Double) -> [Int] {
        let epsilon = balanceFactor > 0 ? balanceFactor : 0
        let totalKeys = candidates.reduce(0) { $0 + $1.keys }
        let totalWeight = candidates.reduce(0) { $0 + $1.weight }
        guard totalWeight > 0 else { return candidates.map { _ in 0 } }
        let budget = (1 + epsilon) * Double(totalKeys + 1)
        return candidates.map { Int((budget * Double($0.weight) / Double(totalWeight)).rounded(.up)) }
    }

    // MARK: - Strategies

    private static let randomSalt: UInt64 = 0x5851_f42d_4c95_7f2d
    private static let secondChoiceSalt: UInt64 = 0x9e37_79b9_7f4a_7c15

    /// Whether `a` carries less load per unit of weight than `b` (cross-multiplied, no division).
    private static func lighter(_ a: Int, _ aWeight: Int, than b: Int, _ bWeight: Int) -> Bool {
        a * bWeight < b * aWeight
    }

    private static func sameLoad(_ a: Int, _ aWeight: Int, as b: Int, _ bWeight: Int) -> Bool {
        a * bWeight == b * aWeight
    }

    /// The candidate with the least `load` per weight; ties by the highest rendezvous score of the key, then by id.
    private static func leastLoaded(
        _ chosen: [PlacementCandidate],
        keyHash: UInt64,
        load: KeyPath<PlacementCandidate, Int>
    ) -> String {
        var best = 0
        var bestScore = self.score(chosen[0], keyHash)
        for i in 1..<chosen.count {
            let c = chosen[i]
            let b = chosen[best]
            if self.lighter(c[keyPath: load], c.weight, than: b[keyPath: load], b.weight) {
                best = i
                bestScore = self.score(c, keyHash)
            } else if self.sameLoad(c[keyPath: load], c.weight, as: b[keyPath: load], b.weight) {
                // Candidates are in id order, so a strictly higher score is needed to displace a smaller id.
                let s = self.score(c, keyHash)
                if s > bestScore {
                    best = i
                    bestScore = s
                }
            }
        }
        return chosen[best].id
    }

    private static func score(_ candidate: PlacementCandidate, _ keyHash: UInt64) -> Double {
        ConsistentHashing.rendezvousScore(
            keyHash: keyHash,
            idHash: ConsistentHashing.hash64(candidate.id),
            weight: candidate.weight
        )
    }

    /// The index drawn by weight from `h`, skipping `excluding`.
    private static func weightedIndex(_ chosen: [PlacementCandidate], _ h: UInt64, excluding: Int?) -> Int {
        var total = 0
        for (i, c) in chosen.enumerated() where i != excluding { total += c.weight }
        var r = Int(h % UInt64(total))
        for (i, c) in chosen.enumerated() where i != excluding {
            if r < c.weight { return i }
            r -= c.weight
        }
        return chosen.count - 1
    }

    private static func powerOfTwoChoices(_ chosen: [PlacementCandidate], keyHash: UInt64, seed: UInt64) -> String {
        let h1 = ConsistentHashing.mix64(keyHash ^ ConsistentHashing.mix64(seed ^ randomSalt))
        let h2 = ConsistentHashing.mix64(h1 ^ secondChoiceSalt)
        let first = self.weightedIndex(chosen, h1, excluding: nil)
        let second = self.weightedIndex(chosen, h2, excluding: first)
        let a = chosen[first]
        let b = chosen[second]
        if self.lighter(a.keys, a.weight, than: b.keys, b.weight) { return a.id }
        if self.lighter(b.keys, b.weight, than: a.keys, a.weight) { return b.id }
        let sa = self.score(a, keyHash)
        let sb = self.score(b, keyHash)
        if sa != sb { return sa > sb ? a.id : b.id }
        return min(a.id, b.id)
    }

    /// Consistent hashing with bounded loads (Mirrokni, Thorup & Zadimoghaddam, 2018), with random-jump probing:
    /// the probe sequence is the key's weighted rendezvous ranking, so each successive probe lands on an
    /// independent, hash-chosen candidate (rather than the next one on a ring). The overflow of a full candidate
    /// therefore spreads evenly over all the others instead of cascading onto a neighbour. The first candidate
    /// below its capacity (`boundedLoadCapacities`) wins; one always exists, as the capacities add up to more
    /// than the total.
    private static func boundedLoad(_ chosen: [PlacementCandidate], keyHash: UInt64, balanceFactor: Double) -> String {
        let capacities = self.boundedLoadCapacities(chosen, balanceFactor: balanceFactor)
        var order = chosen.indices.map { (index: $0, score: self.score(chosen[$0], keyHash)) }
        order.sort { $0.score != $1.score ? $0.score > $1.score : chosen[$0.index].id < chosen[$1.index].id }
        for probe in order where chosen[probe.index].keys < capacities[probe.index] {
            return chosen[probe.index].id
        }
        return chosen[order[0].index].id
    }
}

/// Ketama rings and Maglev tables for recently seen candidate sets, owned by the caller (one per pool, say) and
/// passed to `Placement.place(_:candidates:cache:)`. A plain value: it never changes an answer, only its cost.
public struct PlacementCache: Sendable {
    struct Member: Hashable, Sendable {
        var id: String
        var weight: Int
    }

    /// How many distinct candidate sets are kept per kind; 0 keeps none.
    public let capacity: Int
    private var ketamas: [[Member]: Ketama] = [:]
    private var maglevs: [[Member]: Maglev] = [:]

    public init(capacity: Int = 8) {
        self.capacity = capacity
    }

    mutating func ketama(for chosen: [PlacementCandidate]) -> Ketama {
        let members = chosen.map { Member(id: $0.id, weight: $0.weight) }
        if let ring = self.ketamas[members] { return ring }
        let ring = Ketama(backends: chosen.map { ($0.id, $0.weight) })
        if self.capacity > 0 {
            if self.ketamas.count >= self.capacity { self.ketamas.removeAll() }
            self.ketamas[members] = ring
        }
        return ring
    }

    mutating func maglev(for chosen: [PlacementCandidate]) -> Maglev {
        let members = chosen.map { Member(id: $0.id, weight: $0.weight) }
        if let table = self.maglevs[members] { return table }
        let table = Maglev(backends: chosen.map { ($0.id, $0.weight) })
        if self.capacity > 0 {
            if self.maglevs.count >= self.capacity { self.maglevs.removeAll() }
            self.maglevs[members] = table
        }
        return table
    }
}
