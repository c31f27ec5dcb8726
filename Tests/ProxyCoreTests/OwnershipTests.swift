import Dispatch
import NIOCore
import Synchronization
import Testing

@testable import ProxyCore

/// Counts the calls of a `place` closure and answers from a script (or always the same backend).
private final class Placer: Sendable {
    private let state: Mutex<(calls: Int, avoided: [String?], answers: [String])>

    init(_ answers: String...) {
        self.state = Mutex((0, [], answers))
    }

    var calls: Int { self.state.withLock { $0.calls } }
    var avoided: [String?] { self.state.withLock { $0.avoided } }

    /// The next scripted answer; the last one repeats.
    func place(_ avoiding: String?, _ keysOn: (String) -> Int) -> String? {
        self.state.withLock { state in
            state.calls += 1
            state.avoided.append(avoiding)
            guard !state.answers.isEmpty else { return nil }
            return state.answers.count > 1 ? state.answers.removeFirst() : state.answers[0]
        }
    }
}

private let always: @Sendable (String) -> Bool = { _ in true }

/// `table.resolve`, required to answer.
private func resolve(
    _ table: inout OwnershipTable, key: String, pool: String, idleTTL: Double, now: Double,
    stillValid: (String) -> Bool, place: (_ avoiding: String?, _ keysOn: (String) -> Int) -> String?,
    sourceLocation: SourceLocation = #_sourceLocation
) throws -> (ownership: Ownership, change: OwnershipChange?) {
    let result = table.resolve(key: key, pool: pool, idleTTL: idleTTL, now: now, stillValid: stillValid, place: place)
    return try #require(result, sourceLocation: sourceLocation)
}

/// A value shared with escaping closures (a `Mutex` itself cannot be captured by one).
private final class Locked<Value: Sendable>: Sendable {
    private let value: Mutex<Value>
    init(_ value: Value) { self.value = Mutex(value) }
    func withLock<R>(_ body: (inout Value) -> R) -> R { self.value.withLock { body(&$0) } }
}

@Suite("OwnershipTable")
struct OwnershipTableTests {
    @Test func firstResolvePlacesAndClaimsEpochOneLaterResolvesKeepTheOwner() throws {
        var table = OwnershipTable()
        let placer = Placer("a")
        let first = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 0, stillValid: always, place: placer.place)
        #expect(first.ownership == Ownership(key: "k", pool: "p", backend: "a", epoch: 1, since: 0))
        #expect(first.change == nil, "a first placement changes no owner")
        #expect(placer.calls == 1)
        #expect(placer.avoided == [nil])
        for now in [1.0, 5, 9.5] {
            let again = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: now, stillValid: always, place: placer.place)
            #expect(again.ownership == first.ownership)
            #expect(again.change == nil)
        }
        #expect(placer.calls == 1, "a resolve of an owned key must not place it again")
        #expect(table.owner(of: "k", now: 9) == first.ownership)
        #expect(table.count == 1)
    }

    @Test func epochsIncreaseAcrossKeysAndStartAfterTheGivenLastEpoch() throws {
        var table = OwnershipTable(lastEpoch: 41)
        let placer = Placer("a")
        var epochs: [UInt64] = []
        for key in ["x", "y", "z"] {
            let resolved = try resolve(&table, key: key, pool: "p", idleTTL: 10, now: 0, stillValid: always, place: placer.place)
            epochs.append(resolved.ownership.epoch)
        }
        #expect(epochs == [42, 43, 44])
    }

    @Test func nothingToPlaceOnLeavesTheKeyUnowned() {
        var table = OwnershipTable()
        let placer = Placer()
        #expect(table.resolve(key: "k", pool: "p", idleTTL: 10, now: 0, stillValid: always, place: placer.place) == nil)
        #expect(table.owner(of: "k", now: 0) == nil)
        #expect(table.count == 0)
        #expect(table.keys(on: "a") == 0)
    }

    @Test func aLiveLeaseNeverExpires() throws {
        var table = OwnershipTable()
        let placer = Placer("a")
        let owned = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 0, stillValid: always, place: placer.place)
        table.acquire(key: "k")
        table.acquire(key: "k")
        #expect(table.liveCount(of: "k") == 2)
        for now in [10.0, 11, 1_000, 1_000_000] {
            #expect(table.owner(of: "k", now: now) == owned.ownership, "at \(now)")
        }
        #expect(table.sweep(now: 1_000_000) == 0)
        // One of two ends: still live.
        table.releaseLease(key: "k", now: 100)
        #expect(table.liveCount(of: "k") == 1)
        #expect(table.owner(of: "k", now: 1_000_000) == owned.ownership)
        let again = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 1_000_000, stillValid: always, place: placer.place)
        #expect(again.ownership.epoch == 1)
        #expect(placer.calls == 1)
    }

    @Test func afterTheLastReleaseTheKeyExpiresExactlyAtIdleTTL() throws {
        var table = OwnershipTable()
        let placer = Placer("a", "b")
        _ = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 0, stillValid: always, place: placer.place)
        table.acquire(key: "k")
        table.releaseLease(key: "k", now: 100)
        #expect(table.liveCount(of: "k") == 0)
        #expect(table.owner(of: "k", now: 109.75)?.backend == "a", "the idle TTL runs from the last release, not the claim")
        #expect(table.owner(of: "k", now: 110) == nil, "expired exactly at idleSince + idleTTL")
        #expect(table.keys(ownedBy: "a", now: 110).isEmpty)
        #expect(table.list(prefix: "", limit: 10, now: 110).isEmpty)

        let fresh = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 110, stillValid: always, place: placer.place)
        #expect(placer.calls == 2, "an expired key is placed afresh")
        #expect(placer.avoided == [nil, nil], "an expired owner is not avoided: it did nothing wrong")
        #expect(fresh.ownership == Ownership(key: "k", pool: "p", backend: "b", epoch: 2, since: 110))
        #expect(fresh.change == nil, "nobody to tell about an expired key")
        #expect(table.keys(on: "a") == 0)
        #expect(table.keys(on: "b") == 1)
    }

    @Test func aKeyNeverUsedExpiresIdleTTLAfterItsClaim() throws {
        var table = OwnershipTable()
        let placer = Placer("a")
        _ = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 5, stillValid: always, place: placer.place)
        #expect(table.owner(of: "k", now: 14.5) != nil)
        #expect(table.owner(of: "k", now: 15) == nil)
    }

    @Test func releasingMoreLeasesThanAcquiredIsIgnored() throws {
        var table = OwnershipTable()
        let placer = Placer("a")
        _ = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 0, stillValid: always, place: placer.place)
        table.acquire(key: "k")
        table.releaseLease(key: "k", now: 1)
        table.releaseLease(key: "k", now: 1)
        #expect(table.liveCount(of: "k") == 0)
        table.acquire(key: "k")
        #expect(table.liveCount(of: "k") == 1)
        #expect(table.owner(of: "k", now: 1_000) != nil)
    }

    @Test func anInvalidOwnerIsReplacedOnceWithAHigherEpoch() throws {
        var table = OwnershipTable()
        let placer = Placer("a", "b")
        _ = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 0, stillValid: always, place: placer.place)
        let notA: (String) -> Bool = { $0 != "a" }
        let replaced = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 1, stillValid: notA, place: placer.place)
        #expect(replaced.ownership == Ownership(key: "k", pool: "p", backend: "b", epoch: 2, since: 1))
        #expect(replaced.change == OwnershipChange(key: "k", previous: "a", current: "b", reason: .replaced))
        #expect(placer.avoided == [nil, "a"], "placement is told which owner to avoid")
        for now in [2.0, 3, 4] {
            let again = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: now, stillValid: notA, place: placer.place)
            #expect(again.ownership == replaced.ownership)
            #expect(again.change == nil)
        }
        #expect(placer.calls == 2, "replaced once, not on every resolve")
        #expect(table.keys(on: "a") == 0)
        #expect(table.keys(on: "b") == 1)
    }

    @Test func aKeyAskedForInAnotherPoolIsPlacedAgainInThatPool() throws {
        var table = OwnershipTable()
        let placer = Placer("a", "q1")
        _ = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 0, stillValid: always, place: placer.place)
        let moved = try resolve(&table, key: "k", pool: "q", idleTTL: 10, now: 1, stillValid: always, place: placer.place)
        #expect(moved.ownership.pool == "q")
        #expect(moved.ownership.backend == "q1")
        #expect(moved.ownership.epoch == 2)
        #expect(moved.change?.previous == "a")
    }

    /// A replaced owner's tunnels are still open for a moment (they are being closed) when the key's next request
    /// starts on the new owner. The old tunnels' lease releases must not end the new request's lease.
    @Test func leasesOfTheReplacedOwnerDoNotEndTheNewOwnersLease() throws {
        var table = OwnershipTable()
        let placer = Placer("a", "b")
        _ = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 0, stillValid: always, place: placer.place)
        table.acquire(key: "k")  // a tunnel to a
        _ = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 1, stillValid: { $0 != "a" }, place: placer.place)
        table.acquire(key: "k")  // the client's new tunnel, to b
        table.releaseLease(key: "k", now: 2)  // the tunnel to a closes
        #expect(table.owner(of: "k", now: 1_000)?.backend == "b", "b's tunnel is still open: the key must stay owned")
        #expect(table.liveCount(of: "k") == 1)
        table.releaseLease(key: "k", now: 2_000)
        #expect(table.owner(of: "k", now: 2_009)?.backend == "b")
        #expect(table.owner(of: "k", now: 2_010) == nil)
    }

    /// The same after a forced re-placement (`DELETE /keys/{key}`, migration): the old tunnels end after the key
    /// was placed again.
    @Test func leasesFromBeforeAReleaseDoNotEndTheNextOwnersLease() throws {
        var table = OwnershipTable()
        let placer = Placer("a", "b")
        _ = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 0, stillValid: always, place: placer.place)
        table.acquire(key: "k")
        #expect(table.release(key: "k", now: 1) != nil)
        _ = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 1, stillValid: always, place: placer.place)
        table.acquire(key: "k")
        table.releaseLease(key: "k", now: 2)
        #expect(table.owner(of: "k", now: 1_000)?.backend == "b")
    }

    @Test func claimSemantics() throws {
        var table = OwnershipTable()
        let first = table.claim(key: "k", pool: "p", backend: "a", idleTTL: 10, now: 0)
        #expect(first.ownership == Ownership(key: "k", pool: "p", backend: "a", epoch: 1, since: 0))
        #expect(first.change == nil, "claiming an unowned key changes no owner")

        let same = table.claim(key: "k", pool: "p", backend: "a", idleTTL: 10, now: 1)
        #expect(same.ownership == first.ownership, "re-claiming for the owner keeps its epoch")
        #expect(same.change == nil)

        table.acquire(key: "k")
        let other = table.claim(key: "k", pool: "p", backend: "b", idleTTL: 10, now: 2)
        #expect(other.ownership == Ownership(key: "k", pool: "p", backend: "b", epoch: 2, since: 2))
        #expect(other.change == OwnershipChange(key: "k", previous: "a", current: "b", reason: .claimed))
        #expect(table.liveCount(of: "k") == 1, "the live request keeps its lease across the claim")
        #expect(table.owner(of: "k", now: 1_000)?.backend == "b")
        #expect(table.keys(on: "a") == 0)
        #expect(table.keys(on: "b") == 1)

        // A claim over an expired owner: nobody to tell.
        table.releaseLease(key: "k", now: 3)
        let afterExpiry = table.claim(key: "k", pool: "p", backend: "c", idleTTL: 10, now: 13)
        #expect(afterExpiry.change == nil)
        #expect(afterExpiry.ownership.epoch == 3)
        #expect(table.keys(on: "b") == 0)
        #expect(table.keys(on: "c") == 1)

        // A claimed key is then resolved to its claimant without placement.
        let placer = Placer("z")
        let resolved = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 14, stillValid: always, place: placer.place)
        #expect(resolved.ownership.backend == "c")
        #expect(placer.calls == 0)
    }

    @Test func releaseSemantics() throws {
        var table = OwnershipTable()
        let placer = Placer("a", "b")
        #expect(table.release(key: "nobody", now: 0) == nil)
        _ = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 0, stillValid: always, place: placer.place)
        #expect(table.release(key: "k", now: 1) == OwnershipChange(key: "k", previous: "a", current: nil, reason: .released))
        #expect(table.owner(of: "k", now: 1) == nil)
        #expect(table.keys(on: "a") == 0)
        #expect(table.count == 0)
        #expect(table.release(key: "k", now: 1) == nil, "a second release has nothing to release")

        let again = try resolve(&table, key: "k", pool: "p", idleTTL: 10, now: 2, stillValid: always, place: placer.place)
        #expect(again.ownership.epoch == 2)
        #expect(again.change == nil)
        #expect(placer.avoided == [nil, nil])

        // Releasing an expired key tells nobody, but forgets it.
        #expect(table.release(key: "k", now: 12) == nil)
        #expect(table.count == 0)
        #expect(table.keys(on: "b") == 0)
    }

    @Test func keysPerBackendFollowPlacementsMovesAndReleases() throws {
        var table = OwnershipTable()
        let answers = ["a", "a", "b", "a", "c", "b"]
        for (index, backend) in answers.enumerated() {
            _ = try resolve(&table, 
                key: "k\(index)", pool: "p", idleTTL: 10, now: 0, stillValid: always, place: { _, _ in backend })
        }
        #expect(table.keys(on: "a") == 3)
        #expect(table.keys(on: "b") == 2)
        #expect(table.keys(on: "c") == 1)
        #expect(table.keys(on: "d") == 0)
        #expect(Set(table.keys(ownedBy: "a", now: 0)) == ["k0", "k1", "k3"])

        // Placement sees the counts.
        var seen: [String: Int] = [:]
        _ = table.resolve(key: "new", pool: "p", idleTTL: 10, now: 0, stillValid: always, place: { _, keysOn in
            for id in ["a", "b", "c", "d"] { seen[id] = keysOn(id) }
            return "d"
        })
        #expect(seen == ["a": 3, "b": 2, "c": 1, "d": 0])

        _ = table.resolve(key: "k0", pool: "p", idleTTL: 10, now: 0, stillValid: { $0 != "a" }, place: { _, _ in "c" })
        _ = table.release(key: "k2", now: 0)
        _ = table.claim(key: "k5", pool: "p", backend: "a", idleTTL: 10, now: 0)
        #expect(table.keys(on: "a") == 3)  // k1, k3, k5
        #expect(table.keys(on: "b") == 0)
        #expect(table.keys(on: "c") == 2)  // k4, k0
        #expect(table.keys(on: "d") == 1)
    }

    @Test func sweepDropsExactlyTheExpiredKeys() throws {
        var table = OwnershipTable()
        for (key, ttl) in [("short", 5.0), ("long", 50), ("live", 5)] {
            _ = try resolve(&table, key: key, pool: "p", idleTTL: ttl, now: 0, stillValid: always, place: { _, _ in "a" })
        }
        table.acquire(key: "live")
        #expect(table.sweep(now: 4) == 0)
        #expect(table.sweep(now: 5) == 1)
        #expect(table.count == 2)
        #expect(table.keys(on: "a") == 2)
        #expect(table.owner(of: "long", now: 5) != nil)
        #expect(table.sweep(now: 50) == 1)
        #expect(table.count == 1)
        #expect(table.owner(of: "live", now: 50) != nil)
        #expect(table.sweep(now: 1_000) == 0)
    }

    /// The sweep looks only at due queue elements: keys that became live or idle again since they were queued,
    /// and keys replaced by a newer owner, must each expire at their own time, neither earlier nor never.
    @Test func sweepFollowsEachKeysOwnIdleTime() throws {
        var table = OwnershipTable()
        let place: (String?, (String) -> Int) -> String? = { _, _ in "a" }
        for key in ["busy", "again", "replaced", "quiet"] {
            _ = try resolve(&table, key: key, pool: "p", idleTTL: 10, now: 0, stillValid: always, place: place)
        }
        // "busy" is leased over its first deadline; "again" is leased and released, idle anew from 8.
        table.acquire(key: "busy")
        table.acquire(key: "again")
        table.releaseLease(key: "again", now: 8)
        // "replaced" gets a new owner at 6 (a newer epoch); its first element must not drop the new entry early.
        _ = table.claim(key: "replaced", pool: "p", backend: "b", idleTTL: 10, now: 6)
        #expect(table.sweep(now: 10) == 1)  // "quiet" only
        #expect(table.owner(of: "quiet", now: 10) == nil)
        #expect(table.owner(of: "again", now: 10) != nil)
        #expect(table.owner(of: "replaced", now: 10)?.backend == "b")
        #expect(table.owner(of: "busy", now: 10) != nil)
        #expect(table.sweep(now: 15.9) == 0)
        #expect(table.sweep(now: 16) == 1)  // "replaced", 10 after its claim
        #expect(table.sweep(now: 18) == 1)  // "again", 10 after its last lease ended
        #expect(table.count == 1)
        // "busy" ends its lease at 30: it is queued again then, and expires at 40.
        table.releaseLease(key: "busy", now: 30)
        #expect(table.sweep(now: 39.9) == 0)
        #expect(table.sweep(now: 40) == 1)
        #expect(table.count == 0)
        #expect(table.keys(on: "a") == 0)
        #expect(table.keys(on: "b") == 0)
    }

    @Test func sweepDoesAtMostItsLimitPerCallAndLeavesTheRestForTheNext() throws {
        var table = OwnershipTable()
        for index in 0..<25 {
            _ = try resolve(&table, key: "k\(index)", pool: "p", idleTTL: 1, now: 0, stillValid: always, place: { _, _ in "a" })
        }
        #expect(table.sweep(now: 2, limit: 10) == 10)
        // Not dropped yet, but expired for every lookup.
        #expect(table.owner(of: "k24", now: 2) == nil)
        #expect(table.sweep(now: 2, limit: 10) == 10)
        #expect(table.sweep(now: 2, limit: 10) == 5)
        #expect(table.count == 0)
    }

    /// Random leases, releases, claims and releases against a model: after any sweep, exactly the keys the model
    /// says expired are gone, and each sweep drops exactly those.
    @Test(arguments: [UInt64(11), 12, 13])
    func sweepMatchesAFullScanOnRandomHistories(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        var table = OwnershipTable()
        var now = 0.0
        let keys = (0..<40).map { "k\($0)" }
        var leased: [String: Int] = [:]
        for _ in 0..<3_000 {
            now += Double(random.next() % 100) / 100
            let key = keys[Int(random.next() % UInt64(keys.count))]
            switch random.next() % 6 {
            case 0, 1:
                _ = table.resolve(key: key, pool: "p", idleTTL: Double(1 + random.next() % 5), now: now,
                                  stillValid: always, place: { _, _ in "a" })
                table.acquire(key: key)
                leased[key, default: 0] += 1
            case 2, 3:
                if leased[key, default: 0] > 0 {
                    table.releaseLease(key: key, now: now)
                    leased[key]! -= 1
                }
            case 4:
                _ = table.claim(key: key, pool: "p", backend: "b", idleTTL: 2, now: now)
            default:
                // What a full scan would drop now, against what the sweep drops.
                let expected = Set(table.entries.keys.filter { table.owner(of: $0, now: now) == nil })
                let dropped = table.sweep(now: now)
                #expect(dropped == expected.count, "seed \(seed) at \(now)")
                #expect(Set(table.entries.keys).isDisjoint(with: expected))
            }
        }
    }

    @Test func listFiltersByPrefixSortsByKeyAndStopsAtTheLimit() throws {
        var table = OwnershipTable()
        for key in ["room:c", "room:a", "user:x", "room:b", "room:d"] {
            _ = try resolve(&table, key: key, pool: "p", idleTTL: 10, now: 0, stillValid: always, place: { _, _ in "a" })
        }
        table.acquire(key: "room:b")
        table.acquire(key: "room:b")
        let rooms = table.list(prefix: "room:", limit: 100, now: 1)
        #expect(rooms.map(\.ownership.key) == ["room:a", "room:b", "room:c", "room:d"])
        #expect(rooms.map(\.live) == [0, 2, 0, 0])
        #expect(table.list(prefix: "room:", limit: 2, now: 1).map(\.ownership.key) == ["room:a", "room:b"])
        #expect(table.list(prefix: "", limit: 100, now: 1).count == 5)
        #expect(table.list(prefix: "nothing", limit: 100, now: 1).isEmpty)
        // Expired keys are not listed (room:b is live).
        #expect(table.list(prefix: "room:", limit: 100, now: 10).map(\.ownership.key) == ["room:b"])
    }
}

/// A clock the test moves by hand.
private final class ManualClock: Sendable {
    private let value = Mutex<Double>(0)
    private let readCount = Mutex(0)
    /// How many times the directory read the clock.
    var reads: Int { self.readCount.withLock { $0 } }
    var now: Double {
        self.readCount.withLock { $0 += 1 }
        return self.value.withLock { $0 }
    }
    func advance(_ seconds: Double) { self.value.withLock { $0 += seconds } }
    var clock: OwnershipClock { { [self] in self.now } }
}

@Suite("InMemoryOwnershipDirectory")
struct InMemoryOwnershipDirectoryTests {
    private static func query(
        _ key: String, ttl: TimeAmount = .seconds(10), valid: @escaping @Sendable (String) -> Bool = { _ in true },
        placer: Placer
    ) -> OwnershipQuery {
        OwnershipQuery(key: key, pool: "p", idleTTL: ttl, stillValid: valid, place: { placer.place($0, $1) })
    }

    private static func owned(_ resolution: OwnershipResolution) -> Ownership? {
        if case .owned(let ownership) = resolution { return ownership }
        return nil
    }

    @Test func oneHundredConcurrentFirstResolvesPlaceTheKeyExactlyOnce() {
        for round in 0..<20 {
            let directory = InMemoryOwnershipDirectory()
            let placements = Locked(0)
            let owners = Locked<[Ownership?]>([])
            let query = OwnershipQuery(
                key: "room:hot", pool: "p", idleTTL: .seconds(10), stillValid: { _ in true },
                place: { _, _ in
                    // Every placement takes another backend: a second one would show as a second owner too.
                    let n = placements.withLock { count -> Int in
                        count += 1
                        return count
                    }
                    return "b\(n)"
                })
            DispatchQueue.concurrentPerform(iterations: 100) { _ in
                let resolved = Self.owned(directory.resolve(query, on: nil))
                owners.withLock { $0.append(resolved) }
            }
            let seen = owners.withLock { $0 }
            #expect(placements.withLock { $0 } == 1, "round \(round)")
            #expect(seen.count == 100)
            #expect(Set(seen.map { $0?.backend }) == ["b1"], "round \(round)")
            #expect(Set(seen.map { $0?.epoch }) == [1], "round \(round)")
            #expect(directory.count == 1)
        }
    }

    @Test func leasesExpireOnTheInjectedClock() throws {
        let time = ManualClock()
        let directory = InMemoryOwnershipDirectory(clock: time.clock)
        let placer = Placer("a", "b")
        let first = try #require(Self.owned(directory.resolve(Self.query("k", placer: placer), on: nil)))
        directory.acquireLease(key: "k")
        time.advance(3_600)
        #expect(directory.owner(of: "k") == first, "a live key stays owned")
        #expect(directory.liveCount(of: "k") == 1)
        directory.releaseLease(key: "k")
        time.advance(9.5)
        #expect(directory.owner(of: "k") == first)
        #expect(directory.sweep() == 0)
        time.advance(0.5)
        #expect(directory.owner(of: "k") == nil)
        #expect(directory.keys(ownedBy: "a").isEmpty)
        let second = try #require(Self.owned(directory.resolve(Self.query("k", placer: placer), on: nil)))
        #expect(second.backend == "b")
        #expect(second.epoch > first.epoch)
        #expect(placer.calls == 2)
    }

    @Test func validOwnerAnswersWhatResolveWouldKeepAndNothingElse() throws {
        let time = ManualClock()
        let directory = InMemoryOwnershipDirectory(clock: time.clock)
        #expect(directory.validOwner(key: "k", pool: "p", stillValid: { _ in true }) == nil, "unknown key")
        let placer = Placer("a", "b")
        let owner = try #require(Self.owned(directory.resolve(Self.query("k", ttl: .seconds(10), placer: placer), on: nil)))
        #expect(directory.validOwner(key: "k", pool: owner.pool, stillValid: { _ in true }) == owner)
        #expect(directory.validOwner(key: "k", pool: "other", stillValid: { _ in true }) == nil, "another pool")
        #expect(directory.validOwner(key: "k", pool: owner.pool, stillValid: { $0 != owner.backend }) == nil, "owner down")
        time.advance(10)
        #expect(directory.validOwner(key: "k", pool: owner.pool, stillValid: { _ in true }) == nil, "lease expired")
        #expect(placer.calls == 1, "validOwner never places")
    }

    /// `acquireValidOwner` answers exactly what `validOwner` answers, and takes the key's lease only with an owner.
    /// Checked on the in-memory directory's one-lock version and on the protocol's default (the Redis directory's).
    @Test(arguments: [false, true])
    func acquireValidOwnerTakesTheLeaseOnlyWithAnOwner(usingTheDefault: Bool) throws {
        let time = ManualClock()
        let inMemory = InMemoryOwnershipDirectory(clock: time.clock)
        let directory: any OwnershipDirectory = usingTheDefault ? DefaultAcquire(inMemory) : inMemory
        #expect(directory.acquireValidOwner(key: "k", pool: "p", stillValid: { _ in true }) == nil, "unknown key")
        #expect(directory.liveCount(of: "k") == 0)
        let owner = try #require(Self.owned(directory.resolve(Self.query("k", ttl: .seconds(10), placer: Placer("a")), on: nil)))
        #expect(directory.acquireValidOwner(key: "k", pool: "other", stillValid: { _ in true }) == nil, "another pool")
        #expect(directory.acquireValidOwner(key: "k", pool: owner.pool, stillValid: { _ in false }) == nil, "owner down")
        #expect(directory.liveCount(of: "k") == 0)
        #expect(directory.acquireValidOwner(key: "k", pool: owner.pool, stillValid: { _ in true }) == owner)
        #expect(directory.acquireValidOwner(key: "k", pool: owner.pool, stillValid: { _ in true }) == owner)
        #expect(directory.liveCount(of: "k") == 2)
        // Held: the key outlives its idle TTL until both leases end.
        time.advance(60)
        #expect(directory.owner(of: "k") == owner)
        directory.releaseLease(key: "k")
        directory.releaseLease(key: "k")
        time.advance(10)
        #expect(directory.acquireValidOwner(key: "k", pool: owner.pool, stillValid: { _ in true }) == nil, "expired")
        #expect(directory.liveCount(of: "k") == 0)
    }

    /// The request path's lookup reads the clock only for a key nobody is using: a live key cannot have expired.
    @Test func validOwnerReadsTheClockOnlyForAKeyWithoutALiveLease() throws {
        let time = ManualClock()
        let directory = InMemoryOwnershipDirectory(clock: time.clock)
        let owner = try #require(Self.owned(directory.resolve(Self.query("k", placer: Placer("a")), on: nil)))
        directory.acquireLease(key: "k")
        let before = time.reads
        for _ in 0..<10 {
            #expect(directory.validOwner(key: "k", pool: owner.pool, stillValid: { _ in true }) == owner)
        }
        #expect(time.reads == before, "a live key needs no clock")
        directory.releaseLease(key: "k")
        let released = time.reads
        #expect(directory.validOwner(key: "k", pool: owner.pool, stillValid: { _ in true }) == owner)
        #expect(time.reads == released + 1, "an idle key is checked against the clock")
        time.advance(10)
        #expect(directory.validOwner(key: "k", pool: owner.pool, stillValid: { _ in true }) == nil, "and expires on it")
    }

    @Test func sweepUsesTheInjectedClock() throws {
        let time = ManualClock()
        let directory = InMemoryOwnershipDirectory(clock: time.clock)
        let placer = Placer("a")
        for key in ["x", "y"] { _ = Self.owned(directory.resolve(Self.query(key, ttl: .seconds(1), placer: placer), on: nil)) }
        #expect(directory.count == 2)
        #expect(directory.keyCount(on: "a") == 2)
        time.advance(1)
        #expect(directory.sweep() == 2)
        #expect(directory.count == 0)
        #expect(directory.keyCount(on: "a") == 0)
    }

    @Test func changeHandlersHearReplacementsClaimsAndReleasesButNotFirstPlacementsOrExpiry() throws {
        let time = ManualClock()
        let directory = InMemoryOwnershipDirectory(clock: time.clock)
        let heard = Locked<[OwnershipChange]>([])
        let second = Locked(0)
        directory.onChange { change in heard.withLock { $0.append(change) } }
        directory.onChange { _ in second.withLock { $0 += 1 } }
        let placer = Placer("a", "b", "c", "d")

        _ = try #require(Self.owned(directory.resolve(Self.query("k", placer: placer), on: nil)))
        #expect(heard.withLock { $0 }.isEmpty, "a first placement is no change")

        let replaced = try #require(Self.owned(directory.resolve(Self.query("k", valid: { $0 != "a" }, placer: placer), on: nil)))
        #expect(replaced.backend == "b")
        #expect(heard.withLock { $0 } == [OwnershipChange(key: "k", previous: "a", current: "b", reason: .replaced)])

        directory.claim(key: "k", pool: "p", backend: "z", idleTTL: .seconds(10))
        directory.release(key: "k")
        directory.release(key: "k")  // nothing left to release: no event
        #expect(heard.withLock { $0 }.suffix(2) == [
            OwnershipChange(key: "k", previous: "b", current: "z", reason: .claimed),
            OwnershipChange(key: "k", previous: "z", current: nil, reason: .released),
        ])

        _ = try #require(Self.owned(directory.resolve(Self.query("k", placer: placer), on: nil)))
        time.advance(10)
        _ = try #require(Self.owned(directory.resolve(Self.query("k", placer: placer), on: nil)))
        #expect(heard.withLock { $0 }.count == 3, "expiry and the placements after it are no change: \(heard.withLock { $0 })")
        #expect(second.withLock { $0 } == 3, "every handler hears every change")
    }

    @Test func handlersMayCallBackIntoTheDirectory() throws {
        // Handlers run outside the lock: one that reads the directory must not deadlock.
        let directory = InMemoryOwnershipDirectory()
        let seenOwner = Locked<Ownership?>(nil)
        directory.onChange { change in seenOwner.withLock { $0 = directory.owner(of: change.key) } }
        let placer = Placer("a", "b")
        _ = Self.owned(directory.resolve(Self.query("k", placer: placer), on: nil))
        _ = Self.owned(directory.resolve(Self.query("k", valid: { $0 == "b" }, placer: placer), on: nil))
        #expect(seenOwner.withLock { $0 }?.backend == "b")
    }

    @Test func placementWithNoBackendIsUnavailable() {
        let directory = InMemoryOwnershipDirectory()
        let placer = Placer()
        guard case .unavailable = directory.resolve(Self.query("k", placer: placer), on: nil) else {
            Issue.record("expected .unavailable")
            return
        }
        #expect(directory.owner(of: "k") == nil)
    }
}

@Suite("WebSocketFrameTracker")
struct WebSocketFrameTrackerTests {
    /// A frame as a server sends it (or masked, as a client does) with the shortest length encoding.
    static func frame(opcode: UInt8 = 0x2, payload: Int, masked: Bool = false, forceLength: UInt8? = nil) -> [UInt8] {
        var bytes: [UInt8] = [0x80 | opcode]
        let mask: UInt8 = masked ? 0x80 : 0
        switch forceLength ?? (payload < 126 ? 0 : payload <= 0xFFFF ? 126 : 127) {
        case 126:
            bytes += [mask | 126, UInt8(payload >> 8), UInt8(payload & 0xFF)]
        case 127:
            bytes.append(mask | 127)
            for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((UInt64(payload) >> UInt64(shift)) & 0xFF)) }
        default:
            bytes.append(mask | UInt8(payload))
        }
        if masked { bytes += [0x11, 0x22, 0x33, 0x44] }
        bytes += (0..<payload).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        return bytes
    }

    /// Feeds `stream` in pieces cut at `cuts` and records `atFrameBoundary` after every piece.
    static func boundaries(_ stream: [UInt8], cuts: [Int]) -> [Bool] {
        var tracker = WebSocketFrameTracker()
        var result: [Bool] = []
        var start = 0
        for end in cuts + [stream.count] where end > start {
            tracker.consume(ByteBuffer(bytes: stream[start..<end]))
            result.append(tracker.atFrameBoundary)
            start = end
        }
        return result
    }

    @Test func aFreshTrackerIsAtABoundary() {
        #expect(WebSocketFrameTracker().atFrameBoundary)
        var tracker = WebSocketFrameTracker()
        tracker.consume(ByteBuffer())
        #expect(tracker.atFrameBoundary)
    }

    @Test(arguments: [0, 1, 5, 125, 126, 300, 65_535, 65_536, 70_000])
    func oneFrameWholeIsABoundaryAndEveryCutInsideIsNot(payload: Int) {
        let bytes = Self.frame(payload: payload)
        #expect(Self.boundaries(bytes, cuts: []) == [true])
        // Inside the header, and inside the payload.
        let headerLength = payload < 126 ? 2 : payload <= 0xFFFF ? 4 : 10
        var cuts = Array(1..<headerLength)
        if payload > 0 { cuts += [headerLength, headerLength + payload / 2, bytes.count - 1] }
        for cut in Set(cuts).sorted() where cut > 0 && cut < bytes.count {
            #expect(Self.boundaries(bytes, cuts: [cut]) == [false, true], "payload \(payload), cut at \(cut)")
        }
    }

    @Test func sixteenAndSixtyFourBitLengthsAreReadBigEndian() {
        // 0x0102 = 258 bytes; a little-endian reader would wait for 513.
        let sixteen = Self.frame(payload: 258, forceLength: 126)
        #expect(Array(sixteen[1...3]) == [126, 0x01, 0x02])
        #expect(Self.boundaries(sixteen + Self.frame(payload: 1), cuts: [sixteen.count, sixteen.count + 1]) == [true, false, true])
        // A 64-bit length for a small payload is legal framing (not minimal, still valid for the tracker).
        let sixtyFour = Self.frame(payload: 3, forceLength: 127)
        #expect(sixtyFour.count == 10 + 3)
        #expect(Self.boundaries(sixtyFour, cuts: [9, 10, 12]) == [false, false, false, true])
        let big = Self.frame(payload: 0x01_0203, forceLength: 127)
        #expect(Self.boundaries(big, cuts: [big.count - 1]) == [false, true])
    }

    @Test func maskedFramesSkipTheMaskKey() {
        let masked = Self.frame(opcode: 0x1, payload: 5, masked: true)
        #expect(masked.count == 2 + 4 + 5)
        // After the header and mask only: not a boundary; after the mask but one byte short: not either.
        #expect(Self.boundaries(masked, cuts: [2, 6, 10]) == [false, false, false, true])
        let masked16 = Self.frame(payload: 200, masked: true)
        #expect(masked16.count == 4 + 4 + 200)
        #expect(Self.boundaries(masked16 + Self.frame(payload: 0), cuts: [masked16.count - 1, masked16.count]) == [false, true, true])
    }

    @Test func oneByteAtATimeIsAtABoundaryExactlyAtFrameEnds() {
        let frames = [
            Self.frame(opcode: 0x1, payload: 5),
            Self.frame(payload: 0),
            Self.frame(payload: 126),
            Self.frame(opcode: 0x9, payload: 3, masked: true),
            Self.frame(payload: 65_536),
            Self.frame(payload: 2, forceLength: 127),
            Self.frame(opcode: 0x8, payload: 2),
        ]
        var ends: Set<Int> = []
        var stream: [UInt8] = []
        for frame in frames {
            stream += frame
            ends.insert(stream.count)
        }
        var tracker = WebSocketFrameTracker()
        var mismatches: [Int] = []
        for (index, byte) in stream.enumerated() {
            tracker.consume(ByteBuffer(bytes: [byte]))
            if tracker.atFrameBoundary != ends.contains(index + 1) { mismatches.append(index + 1) }
        }
        #expect(mismatches.isEmpty, "wrong answer after bytes \(mismatches.prefix(10))")
        #expect(tracker.atFrameBoundary)
    }

    @Test func framesSplitAcrossBuffersAnywhere() {
        let stream = Self.frame(opcode: 0x1, payload: 10) + Self.frame(payload: 1_000) + Self.frame(payload: 7, masked: true)
        let ends = [12, 12 + 4 + 1_000, stream.count]
        // Several frames and a partial one in one buffer, then the rest.
        for cut in [1, 11, 12, 13, 15, 16, 500, 1_016, 1_017, 1_020] {
            let expected = [ends.contains(cut), true]
            #expect(Self.boundaries(stream, cuts: [cut]) == expected, "cut at \(cut)")
        }
        // Three pieces whose middle spans two frame ends.
        #expect(Self.boundaries(stream, cuts: [5, 1_018]) == [false, false, true])
    }

    @Test func aLengthWithTheTopBitSetStopsTracking() {
        var bytes: [UInt8] = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 1]
        bytes += [0x82, 0x00]
        var tracker = WebSocketFrameTracker()
        tracker.consume(ByteBuffer(bytes: bytes))
        #expect(tracker.broken)
        #expect(!tracker.atFrameBoundary, "a stream that is not WebSocket framing never gets an injected frame")
        tracker.consume(ByteBuffer(bytes: Self.frame(payload: 0)))
        #expect(!tracker.atFrameBoundary)
    }

    static let closeFrames: [(UInt16, [UInt8])] = [
        (1012, [0x88, 0x02, 0x03, 0xF4]), (1001, [0x88, 0x02, 0x03, 0xE9]), (3999, [0x88, 0x02, 0x0F, 0x9F]),
    ]

    @Test(arguments: Self.closeFrames)
    func closeFrameBytes(code: UInt16, expected: [UInt8]) {
        let frame = WebSocketFrameTracker.closeFrame(code: code, allocator: ByteBufferAllocator())
        #expect(Array(frame.readableBytesView) == expected)
        // It is itself one complete frame.
        var tracker = WebSocketFrameTracker()
        tracker.consume(frame)
        #expect(tracker.atFrameBoundary)
    }
}

/// Forwards to an in-memory directory but keeps the protocol's default `acquireValidOwner`.
private final class DefaultAcquire: OwnershipDirectory {
    let base: InMemoryOwnershipDirectory
    init(_ base: InMemoryOwnershipDirectory) { self.base = base }
    func owner(of key: String) -> Ownership? { self.base.owner(of: key) }
    func validOwner(key: String, pool: String, stillValid: (String) -> Bool) -> Ownership? {
        self.base.validOwner(key: key, pool: pool, stillValid: stillValid)
    }
    func resolve(_ query: OwnershipQuery, on eventLoop: EventLoop?) -> OwnershipResolution {
        self.base.resolve(query, on: eventLoop)
    }
    func claim(key: String, pool: String, backend: String, idleTTL: TimeAmount) {
        self.base.claim(key: key, pool: pool, backend: backend, idleTTL: idleTTL)
    }
    func release(key: String) { self.base.release(key: key) }
    func acquireLease(key: String) { self.base.acquireLease(key: key) }
    func releaseLease(key: String) { self.base.releaseLease(key: key) }
    func keyCount(on backend: String) -> Int { self.base.keyCount(on: backend) }
    func keys(ownedBy backend: String) -> [String] { self.base.keys(ownedBy: backend) }
    func list(prefix: String, limit: Int) -> [(ownership: Ownership, live: Int)] { self.base.list(prefix: prefix, limit: limit) }
    func liveCount(of key: String) -> Int { self.base.liveCount(of: key) }
    func onChange(_ handler: @escaping @Sendable (OwnershipChange) -> Void) { self.base.onChange(handler) }
}
