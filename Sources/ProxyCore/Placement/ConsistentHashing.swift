/// Deterministic key → backend placement functions.
///
/// Every function here gives the same answer on every machine and in every process: they hash with fixed
/// algorithms implemented in this file (64-bit FNV-1a followed by the MurmurHash3 `fmix64` finalizer, and MD5 for
/// Ketama), never with Swift's per-process seeded `Hasher`.
public enum ConsistentHashing {
    /// 64-bit FNV-1a of `bytes`.
    @inlinable
    public static func fnv1a64<Bytes: Sequence>(_ bytes: Bytes) -> UInt64 where Bytes.Element == UInt8 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in bytes {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01b3
        }
        return hash
    }

    /// MurmurHash3's 64-bit finalizer: spreads every input bit over the whole output.
    @inlinable
    public static func mix64(_ value: UInt64) -> UInt64 {
        var k = value
        k ^= k >> 33
        k = k &* 0xff51_afd7_ed55_8ccd
        k ^= k >> 33
        k = k &* 0xc4ce_b9fe_1a85_ec53
        k ^= k >> 33
        return k
    }

    /// The hash every placement function here uses for keys and ids: `mix64(fnv1a64(utf8))`.
    @inlinable
    public static func hash64(_ string: String) -> UInt64 {
        mix64(fnv1a64(string.utf8))
    }

    /// Weighted rendezvous (highest random weight) hashing: the backend with the highest
    /// `weight / -ln(u(key, id))` wins, where `u` is a uniform number in (0, 1) derived from the key and the id.
    /// Backends with a weight ≤ 0 are never chosen. Ties go to the smaller id. Nil when no backend qualifies.
    ///
    /// Adding or removing a backend moves only the keys that it wins or held (≈ 1/N of them).
    public static func rendezvous(key: String, backends: [(id: String, weight: Int)]) -> String? {
        let keyHash = hash64(key)
        var best: (id: String, score: Double)?
        for backend in backends where backend.weight > 0 {
            let score = rendezvousScore(keyHash: keyHash, idHash: hash64(backend.id), weight: backend.weight)
            if let current = best {
                if score > current.score || (score == current.score && backend.id < current.id) {
                    best = (backend.id, score)
                }
            } else {
                best = (backend.id, score)
            }
        }
        return best?.id
    }

    /// The rendezvous score of one (key, backend) pair: for callers that iterate backends themselves.
    @inlinable
    public static func rendezvousScore(keyHash: UInt64, idHash: UInt64, weight: Int) -> Double {
        let h = mix64(keyHash ^ idHash)
        // 53 random bits, shifted away from 0 and 1: u in (0, 1).
        let u = (Double(h >> 11) + 0.5) / 9_007_199_254_740_992.0
        return Double(weight) / -placementLog(u)
    }

    /// Jump consistent hash (Lamping & Veach, 2014): a bucket in `0..<buckets` for a 64-bit key. Growing from
    /// `n` to `n + 1` buckets moves ≈ 1/(n+1) of the keys, all of them to the new bucket. Returns -1 when
    /// `buckets` ≤ 0.
    public static func jump(key: UInt64, buckets: Int) -> Int {
        guard buckets > 0 else { return -1 }
        var key = key
        var b: Int64 = -1
        var j: Int64 = 0
        while j < Int64(buckets) {
            b = j
            key = key &* 2_862_933_555_777_941_757 &+ 1
            j = Int64(Double(b + 1) * (Double(Int64(1) << 31) / Double((key >> 33) + 1)))
        }
        return Int(b)
    }

    /// Jump consistent hash of a string key (hashed with `hash64`).
    public static func jump(key: String, buckets: Int) -> Int {
        jump(key: hash64(key), buckets: buckets)
    }
}

/// The natural logarithm without libm (identical on every platform), for the rendezvous score.
@usableFromInline
func placementLog(_ x: Double) -> Double {
    // ln(x) = ln(m · 2^e) = ln(m) + e · ln 2, with m in [1, 2); ln(m) by the atanh series, which converges fast there.
    guard x > 0 else { return -.infinity }
    let e = x.exponent
    let m = x.significand
    let t = (m - 1) / (m + 1)
    let t2 = t * t
    var term = t
    var sum = 0.0
    var k = 1.0
    while true {
        let next = sum + term / k
        if next == sum { break }
        sum = next
        term *= t2
        k += 2
    }
    return 2 * sum + Double(e) * 0.693_147_180_559_945_3
}

/// Ketama consistent hashing, as in libketama and nginx's `hash … consistent` family: each backend gets 160 points
/// per weight unit on a 32-bit ring. The points of backend `id` come from `MD5("\(id)-\(i)")` for
/// `i in 0..<40·weight`, four little-endian 32-bit points per digest (libketama's layout, with the point count
/// proportional to the weight rather than to the share of the total). A key maps to the first point at or after
/// the first 4 digest bytes of `MD5(key)`, wrapping around.
///
/// Adding or removing a backend moves ≈ 1/N of the keys.
public struct Ketama: Sendable {
    public static let pointsPerWeight = 160

    private let points: [UInt32]
    private let owners: [Int32]
    public let ids: [String]

    public init(backends: [(id: String, weight: Int)]) {
        var ring: [(point: UInt32, owner: Int32)] = []
        var ids: [String] = []
        for backend in backends where backend.weight > 0 {
            let owner = Int32(ids.count)
            ids.append(backend.id)
            for i in 0..<(backend.weight * Self.pointsPerWeight / 4) {
                let digest = MD5.digest(Array("\(backend.id)-\(i)".utf8))
                for h in 0..<4 {
                    ring.append((Self.point(digest, h), owner))
                }
            }
        }
        // Ties (same point for two backends) go to the smaller id, so the order of `backends` does not matter.
        ring.sort { a, b in
            a.point != b.point ? a.point < b.point : ids[Int(a.owner)] < ids[Int(b.owner)]
        }
        self.points = ring.map(\.point)
        self.owners = ring.map(\.owner)
        self.ids = ids
    }

    /// The 32-bit ring position of a key.
    public static func position(of key: String) -> UInt32 {
        point(MD5.digest(Array(key.utf8)), 0)
    }

    /// The backend id owning `key`, nil when the ring is empty.
    public func lookup(_ key: String) -> String? {
        guard !self.points.isEmpty else { return nil }
        let position = Self.position(of: key)
        var low = 0
        var high = self.points.count
        while low < high {
            let mid = (low + high) / 2
            if self.points[mid] < position { low = mid + 1 } else { high = mid }
        }
        return self.ids[Int(self.owners[low == self.points.count ? 0 : low])]
    }

    private static func point(_ digest: [UInt8], _ h: Int) -> UInt32 {
        UInt32(digest[3 + h * 4]) << 24 | UInt32(digest[2 + h * 4]) << 16 | UInt32(digest[1 + h * 4]) << 8
            | UInt32(digest[h * 4])
    }
}

/// Maglev hashing (Eisenbud et al., NSDI 2016): a lookup table of a prime size (65537 by default) filled by the
/// backends' permutations in turn, weighted by giving a backend `weight` turns per round. Each backend's offset and
/// skip come from two independent `hash64` variants of its id; backends are ordered by id first, so the input order
/// does not matter. A key maps to `table[hash64(key) % size]`.
///
/// Lookups are one array read; building costs O(size · log size). Adding or removing a backend moves somewhat more
/// than 1/N of the keys (the paper measures a few percent extra).
public struct Maglev: Sendable {
    public static let defaultTableSize = 65537

    private let table: [Int32]
    public let ids: [String]

    public init(backends: [(id: String, weight: Int)], tableSize: Int = Maglev.defaultTableSize) {
        precondition(tableSize > 1, "the table size must be a prime > 1")
        let sorted = backends.filter { $0.weight > 0 }.sorted { $0.id < $1.id }
        self.ids = sorted.map(\.id)
        guard !sorted.isEmpty else {
            self.table = []
            return
        }
        let m = UInt64(tableSize)
        let offsets = sorted.map { ConsistentHashing.mix64(ConsistentHashing.fnv1a64($0.id.utf8)) % m }
        let skips = sorted.map {
            ConsistentHashing.mix64(ConsistentHashing.fnv1a64($0.id.utf8) ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1
        }
        var next = [UInt64](repeating: 0, count: sorted.count)
        var table = [Int32](repeating: -1, count: tableSize)
        var filled = 0
        fill: while true {
            for (i, backend) in sorted.enumerated() {
                for _ in 0..<backend.weight {
                    var slot = (offsets[i] &+ next[i] &* skips[i]) % m
                    while table[Int(slot)] >= 0 {
                        next[i] += 1
                        slot = (offsets[i] &+ next[i] &* skips[i]) % m
                    }
                    table[Int(slot)] = Int32(i)
                    next[i] += 1
                    filled += 1
                    if filled == tableSize { break fill }
                }
            }
        }
        self.table = table
    }

    /// The backend id owning `key`, nil when there are no backends.
    public func lookup(_ key: String) -> String? {
        guard !self.table.isEmpty else { return nil }
        let slot = Int(ConsistentHashing.hash64(key) % UInt64(self.table.count))
        return self.ids[Int(self.table[slot])]
    }
}

/// MD5 (RFC 1321), for Ketama's ring points only: not for anything security-related.
public enum MD5 {
    private static let s: [UInt32] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22,
        5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20,
        4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23,
        6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ]

    /// floor(|sin(i + 1)| · 2^32).
    private static let k: [UInt32] = [
        0xd76a_a478, 0xe8c7_b756, 0x2420_70db, 0xc1bd_ceee, 0xf57c_0faf, 0x4787_c62a, 0xa830_4613, 0xfd46_9501,
        0x6980_98d8, 0x8b44_f7af, 0xffff_5bb1, 0x895c_d7be, 0x6b90_1122, 0xfd98_7193, 0xa679_438e, 0x49b4_0821,
        0xf61e_2562, 0xc040_b340, 0x265e_5a51, 0xe9b6_c7aa, 0xd62f_105d, 0x0244_1453, 0xd8a1_e681, 0xe7d3_fbc8,
        0x21e1_cde6, 0xc337_07d6, 0xf4d5_0d87, 0x455a_14ed, 0xa9e3_e905, 0xfcef_a3f8, 0x676f_02d9, 0x8d2a_4c8a,
        0xfffa_3942, 0x8771_f681, 0x6d9d_6122, 0xfde5_380c, 0xa4be_ea44, 0x4bde_cfa9, 0xf6bb_4b60, 0xbebf_bc70,
        0x289b_7ec6, 0xeaa1_27fa, 0xd4ef_3085, 0x0488_1d05, 0xd9d4_d039, 0xe6db_99e5, 0x1fa2_7cf8, 0xc4ac_5665,
        0xf429_2244, 0x432a_ff97, 0xab94_23a7, 0xfc93_a039, 0x655b_59c3, 0x8f0c_cc92, 0xffef_f47d, 0x8584_5dd1,
        0x6fa8_7e4f, 0xfe2c_e6e0, 0xa301_4314, 0x4e08_11a1, 0xf753_7e82, 0xbd3a_f235, 0x2ad7_d2bb, 0xeb86_d391,
    ]

    public static func digest(_ message: [UInt8]) -> [UInt8] {
        var a0: UInt32 = 0x6745_2301
        var b0: UInt32 = 0xefcd_ab89
        var c0: UInt32 = 0x98ba_dcfe
        var d0: UInt32 = 0x1032_5476

        var data = message
        data.append(0x80)
        while data.count % 64 != 56 { data.append(0) }
        let bitLength = UInt64(message.count) &* 8
        for i in 0..<8 { data.append(UInt8(truncatingIfNeeded: bitLength >> (8 * UInt64(i)))) }

        var w = [UInt32](repeating: 0, count: 16)
        for chunk in stride(from: 0, to: data.count, by: 64) {
            for i in 0..<16 {
                let j = chunk + i * 4
                w[i] = UInt32(data[j]) | UInt32(data[j + 1]) << 8 | UInt32(data[j + 2]) << 16 | UInt32(data[j + 3]) << 24
            }
            var a = a0, b = b0, c = c0, d = d0
            for i in 0..<64 {
                var f: UInt32
                let g: Int
                switch i {
                case 0..<16:
                    f = (b & c) | (~b & d)
                    g = i
                case 16..<32:
                    f = (d & b) | (~d & c)
                    g = (5 * i + 1) % 16
                case 32..<48:
                    f = b ^ c ^ d
                    g = (3 * i + 5) % 16
                default:
                    f = c ^ (b | ~d)
                    g = (7 * i) % 16
                }
                f = f &+ a &+ k[i] &+ w[g]
                a = d
                d = c
                c = b
                b = b &+ (f << s[i] | f >> (32 - s[i]))
            }
            a0 = a0 &+ a
            b0 = b0 &+ b
            c0 = c0 &+ c
            d0 = d0 &+ d
        }
        var out: [UInt8] = []
        out.reserveCapacity(16)
        for v in [a0, b0, c0, d0] {
            for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) }
        }
        return out
    }
}
