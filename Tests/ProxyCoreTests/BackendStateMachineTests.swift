import Logging
import NIOCore
import ProxyCore
import Testing

private let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000_000)

private func at(_ seconds: Double) -> NIODeadline {
    t0 + .nanoseconds(Int64(seconds * 1_000_000_000))
}

private let active = HealthCheckConfig(rise: 2, fall: 3)
private let passive = PassiveConfig(
    consecutiveFailures: 3, count5xx: true, ejectionTime: .seconds(10), maxEjectionTime: .seconds(35))

private func machine(active: HealthCheckConfig? = nil, passive: PassiveConfig? = nil) -> BackendStateMachine {
    BackendStateMachine(settings: .init(active: active, passive: passive))
}

/// Records `count` failures; returns every action.
private func fail(_ m: inout BackendStateMachine, _ count: Int, at now: NIODeadline) -> [BackendStateMachine.Action] {
    (0..<count).flatMap { _ in m.record(.connectFailure, now: now) }
}

@Suite("BackendStateMachine")
struct BackendStateMachineTests {
    // MARK: Initial state

    @Test("a new backend is healthy and usable, with or without checks")
    func initialState() {
        for m in [machine(), machine(active: active), machine(active: active, passive: passive)] {
            #expect(m.state(at: t0) == .healthy)
            #expect(m.isUsable(at: t0))
            #expect(m.usableFrom == .distantPast)
            #expect(m.lifecycle == .active)
        }
    }

    // MARK: Active checks

    @Test("fall consecutive failing checks make it unhealthy, rise passing ones bring it back")
    func riseAndFall() {
        var m = machine(active: active)
        #expect(m.activeCheck(passed: false, now: at(1)) == [])
        #expect(m.activeCheck(passed: false, now: at(2)) == [])
        #expect(m.isUsable(at: at(2)))
        #expect(m.activeCheck(passed: false, now: at(3)) == [.markedUnhealthy])
        #expect(m.state(at: at(3)) == .unhealthy)
        #expect(!m.isUsable(at: at(3)))
        #expect(m.usableFrom == nil)
        #expect(m.activeCheck(passed: false, now: at(4)) == [])
        #expect(m.activeCheck(passed: true, now: at(5)) == [])
        #expect(!m.isUsable(at: at(5)))
        #expect(m.activeCheck(passed: true, now: at(6)) == [.markedHealthy])
        #expect(m.state(at: at(6)) == .healthy)
        #expect(m.usableFrom == .distantPast)
    }

    @Test("a pass interrupts a run of failures, and a failure a run of passes")
    func streaksReset() {
        var m = machine(active: active)
        _ = m.activeCheck(passed: false, now: at(1))
        _ = m.activeCheck(passed: false, now: at(2))
        _ = m.activeCheck(passed: true, now: at(3))
        _ = m.activeCheck(passed: false, now: at(4))
        _ = m.activeCheck(passed: false, now: at(5))
        #expect(m.isUsable(at: at(5)))
        #expect(m.activeCheck(passed: false, now: at(6)) == [.markedUnhealthy])
        _ = m.activeCheck(passed: true, now: at(7))
        _ = m.activeCheck(passed: false, now: at(8))
        #expect(m.activeCheck(passed: true, now: at(9)) == [])
        #expect(m.activeCheck(passed: true, now: at(10)) == [.markedHealthy])
    }

    @Test("flapping checks never reach fall or rise")
    func flapping() {
        var m = machine(active: active)
        for i in 0..<50 {
            #expect(m.activeCheck(passed: i % 2 == 0, now: at(Double(i))) == [])
            #expect(m.isUsable(at: at(Double(i))))
        }
        var down = machine(active: active)
        _ = (1...3).map { down.activeCheck(passed: false, now: at(Double($0))) }
        for i in 0..<50 {
            #expect(down.activeCheck(passed: i % 2 == 1, now: at(Double(10 + i))) == [])
            #expect(!down.isUsable(at: at(Double(10 + i))))
        }
    }

    @Test("rise 1 and fall 1 switch on a single check")
    func singleCheckThresholds() {
        var m = machine(active: HealthCheckConfig(rise: 1, fall: 1))
        #expect(m.activeCheck(passed: false, now: at(1)) == [.markedUnhealthy])
        #expect(m.activeCheck(passed: true, now: at(2)) == [.markedHealthy])
    }

    @Test("check results are ignored without active checks configured")
    func checksWithoutConfiguration() {
        var m = machine()
        for i in 0..<5 { #expect(m.activeCheck(passed: false, now: at(Double(i))) == []) }
        #expect(m.isUsable(at: at(5)))
    }

    // MARK: Passive ejection

    @Test("consecutive failures eject for ejection_time, then the backend returns by itself")
    func ejection() {
        var m = machine(passive: passive)
        #expect(fail(&m, 2, at: at(1)) == [])
        #expect(m.consecutiveFailures == 2)
        #expect(m.record(.connectFailure, now: at(2)) == [.ejected(until: at(12), ejections: 1)])
        #expect(m.state(at: at(2)) == .unhealthy)
        #expect(!m.isUsable(at: at(11.999)))
        #expect(m.usableFrom == at(12))
        #expect(m.isUsable(at: at(12)))
        #expect(m.state(at: at(12)) == .healthy)
        #expect(m.expire(now: at(12)) == [.ejectionEnded(byActiveCheck: false)])
        #expect(m.ejectedUntil == nil)
        #expect(m.expire(now: at(13)) == [])
    }

    @Test("a success or a non-failure response resets the failure count")
    func successResets() {
        var m = machine(passive: passive)
        _ = fail(&m, 2, at: at(1))
        #expect(m.record(.success, now: at(2)) == [])
        #expect(m.consecutiveFailures == 0)
        _ = fail(&m, 2, at: at(3))
        #expect(m.record(.response(status: 404), now: at(4)) == [])
        #expect(fail(&m, 2, at: at(5)) == [])
        #expect(m.isUsable(at: at(5)))
    }

    @Test("5xx counts as a failure only with count_5xx")
    func fiveHundreds() {
        var counting = machine(passive: passive)
        _ = (0..<2).map { _ in counting.record(.response(status: 503), now: at(1)) }
        #expect(counting.record(.response(status: 500), now: at(1)) == [.ejected(until: at(11), ejections: 1)])

        var notCounting = machine(passive: PassiveConfig(consecutiveFailures: 3, count5xx: false))
        for _ in 0..<10 { #expect(notCounting.record(.response(status: 502), now: at(1)) == []) }
        #expect(notCounting.isUsable(at: at(1)))
        #expect(notCounting.consecutiveFailures == 0)
        // 599 is 5xx; 600 and 499 are not.
        var edges = machine(passive: PassiveConfig(consecutiveFailures: 1, count5xx: true))
        #expect(edges.record(.response(status: 499), now: at(1)) == [])
        #expect(edges.record(.response(status: 599), now: at(1)) == [.ejected(until: at(11), ejections: 1)])
    }

    @Test("consecutive ejections double the ejection time up to max_ejection_time")
    func backOff() {
        var m = machine(passive: passive)
        var now = at(0)
        var lengths: [TimeAmount] = []
        for _ in 0..<5 {
            let actions = fail(&m, 3, at: now)
            guard case .ejected(let until, _) = actions.last else {
                Issue.record("not ejected: \(actions)")
                return
            }
            lengths.append(until - now)
            now = until
        }
        #expect(lengths == [.seconds(10), .seconds(20), .seconds(35), .seconds(35), .seconds(35)])
        #expect(m.ejections == 5)
    }

    @Test("a success after an ejection resets the back-off")
    func backOffResets() {
        var m = machine(passive: passive)
        _ = fail(&m, 3, at: at(0))
        #expect(m.record(.success, now: at(10)) == [.ejectionEnded(byActiveCheck: false)])
        #expect(m.ejections == 0)
        #expect(fail(&m, 3, at: at(11)).last == .ejected(until: at(21), ejections: 1))
    }

    @Test("outcomes of requests in flight during an ejection change nothing")
    func outcomesDuringEjection() {
        var m = machine(passive: passive)
        _ = fail(&m, 3, at: at(0))
        #expect(fail(&m, 10, at: at(1)) == [])
        #expect(m.record(.success, now: at(2)) == [])
        #expect(m.ejectedUntil == at(10))
        #expect(m.ejections == 1)
    }

    @Test("consecutive_failures 0 or no passive section never ejects")
    func passiveOff() {
        for var m in [machine(), machine(passive: PassiveConfig(consecutiveFailures: 0))] {
            #expect(fail(&m, 100, at: at(1)) == [])
            #expect(m.isUsable(at: at(1)))
        }
    }

    @Test("a passing active check ends an ejection early")
    func activeCheckEndsEjection() {
        var m = machine(active: active, passive: passive)
        _ = fail(&m, 3, at: at(0))
        #expect(!m.isUsable(at: at(1)))
        #expect(m.activeCheck(passed: false, now: at(1)) == [])
        #expect(!m.isUsable(at: at(2)))
        #expect(m.activeCheck(passed: true, now: at(2)) == [.ejectionEnded(byActiveCheck: true)])
        #expect(m.isUsable(at: at(2)))
        // The back-off is remembered: the next ejection lasts twice as long.
        #expect(fail(&m, 3, at: at(3)).last == .ejected(until: at(23), ejections: 2))
    }

    @Test("an ejected backend that also fails its checks stays out after the ejection time")
    func ejectedAndUnhealthy() {
        var m = machine(active: active, passive: passive)
        _ = fail(&m, 3, at: at(0))
        _ = (1...3).map { m.activeCheck(passed: false, now: at(Double($0))) }
        #expect(m.usableFrom == nil)
        #expect(!m.isUsable(at: at(100)))
        #expect(m.activeCheck(passed: true, now: at(101)) == [.ejectionEnded(byActiveCheck: false)])
        #expect(m.activeCheck(passed: true, now: at(102)) == [.markedHealthy])
        #expect(m.isUsable(at: at(102)))
    }

    @Test("the ejection time arithmetic caps instead of overflowing")
    func ejectionTimeCap() {
        var m = machine(passive: PassiveConfig(consecutiveFailures: 1, ejectionTime: .seconds(1), maxEjectionTime: .hours(1)))
        var now = at(0)
        var last: TimeAmount = .zero
        for _ in 0..<200 {
            guard case .ejected(let until, _) = m.record(.connectFailure, now: now).last else {
                Issue.record("not ejected")
                return
            }
            last = until - now
            now = until
        }
        #expect(last == .hours(1))
    }

    // MARK: Drain and remove

    @Test("undraining returns a backend to its health verdict; a removed backend cannot be undrained")
    func undrain() {
        var m = machine(active: active, passive: passive)
        #expect(m.undrain() == [], "an active backend has no drain to undo")
        #expect(m.drain() == [.startedDraining])
        #expect(m.undrain() == [.stoppedDraining])
        #expect(m.state(at: at(1)) == .healthy)
        #expect(m.isUsable(at: at(1)))
        // Checks kept running while it drained: it comes back with their verdict, not as healthy by default.
        #expect(m.drain() == [.startedDraining])
        _ = (1...3).map { m.activeCheck(passed: false, now: at(Double($0))) }
        #expect(m.undrain() == [.stoppedDraining])
        #expect(m.state(at: at(4)) == .unhealthy)
        #expect(m.drain() == [.startedDraining])
        #expect(m.remove() == [.removed])
        #expect(m.undrain() == [])
        #expect(m.state(at: at(5)) == .removed)
    }

    @Test("draining and removed backends are not usable, whatever their health")
    func drainAndRemove() {
        var m = machine(active: active, passive: passive)
        #expect(m.drain() == [.startedDraining])
        #expect(m.drain() == [])
        #expect(m.state(at: at(1)) == .draining)
        #expect(!m.isUsable(at: at(1)))
        #expect(m.usableFrom == nil)
        // Checks still run on a draining backend (it serves what it has).
        _ = (1...3).map { m.activeCheck(passed: false, now: at(Double($0))) }
        #expect(!m.healthy)
        #expect(m.state(at: at(4)) == .draining)
        #expect(m.remove() == [.removed])
        #expect(m.remove() == [])
        #expect(m.drain() == [])
        #expect(m.state(at: at(5)) == .removed)
        // A removed backend ignores every further event.
        #expect(m.activeCheck(passed: true, now: at(6)) == [])
        #expect(fail(&m, 10, at: at(7)) == [])
        #expect(m.state(at: at(8)) == .removed)
    }

    @Test("an active backend can be removed directly")
    func removeActive() {
        var m = machine()
        #expect(m.remove() == [.removed])
        #expect(!m.isUsable(at: t0))
    }

    // MARK: Settings changes

    @Test("turning active checks off forgets an unhealthy verdict")
    func disableActiveChecks() {
        var m = machine(active: active)
        _ = (1...3).map { m.activeCheck(passed: false, now: at(Double($0))) }
        #expect(m.update(settings: .init(), now: at(4)) == [.markedHealthy])
        #expect(m.isUsable(at: at(4)))
    }

    @Test("turning passive ejection off ends an ejection")
    func disablePassive() {
        var m = machine(passive: passive)
        _ = fail(&m, 3, at: at(0))
        #expect(m.update(settings: .init(passive: PassiveConfig(consecutiveFailures: 0)), now: at(1)) == [
            .ejectionEnded(byActiveCheck: false)
        ])
        #expect(m.isUsable(at: at(1)))
        #expect(m.ejections == 0)
    }

    @Test("new thresholds apply from the next event, state is kept")
    func changeThresholds() {
        var m = machine(active: active, passive: passive)
        _ = fail(&m, 3, at: at(0))
        #expect(m.update(settings: .init(active: HealthCheckConfig(rise: 1, fall: 1), passive: passive), now: at(1)) == [])
        #expect(m.ejectedUntil == at(10))
        #expect(m.activeCheck(passed: false, now: at(2)) == [.markedUnhealthy])
    }
}

@Suite("BackendHealth")
struct BackendHealthTests {
    @Test("isUsable follows the machine, ejection expiry included, without an event")
    func lockFreeUsability() async throws {
        let health = BackendHealth(
            id: "a",
            settings: .init(passive: PassiveConfig(consecutiveFailures: 1, ejectionTime: .milliseconds(1))))
        #expect(health.isUsable)
        health.record(.connectFailure)
        // Ejected for 1 ms: whether still ejected depends on timing, but it must be usable again soon after.
        let deadline = NIODeadline.now() + .seconds(5)
        while !health.isUsable && NIODeadline.now() < deadline { try await Task.sleep(for: .milliseconds(1)) }
        #expect(health.isUsable)
        #expect(health.status.state == .healthy)
        health.drain()
        #expect(!health.isUsable)
        #expect(health.status.state == .draining)
    }

    @Test("successes reset the failure count even though the clean case skips the lock")
    func successFastPath() {
        let health = BackendHealth(id: "a", settings: .init(passive: PassiveConfig(consecutiveFailures: 3)))
        #expect(health.record(.success) == [])
        health.record(.connectFailure)
        health.record(.connectFailure)
        #expect(health.status.consecutiveFailures == 2)
        health.record(.response(status: 200))
        #expect(health.status.consecutiveFailures == 0)
        health.record(.connectFailure)
        health.record(.connectFailure)
        health.record(.response(status: 503))
        #expect(health.status.consecutiveFailures == 0)
        health.record(.connectFailure)
        health.record(.connectFailure)
        #expect(!health.record(.connectFailure).isEmpty)
        #expect(!health.isUsable)
    }

    @Test("a pool's pick skips unusable backends and returns nil when none is usable")
    func poolPick() throws {
        for balance in BalanceAlgorithm.allCases {
            let backends = (0..<3).map { i in
                Backend(
                    config: BackendConfig(id: "b\(i)", host: "127.0.0.1", port: 9000 + i),
                    address: try! SocketAddress(ipAddress: "127.0.0.1", port: 9000 + i))
            }
            let pool = Pool(name: "p", balance: balance, backends: backends)
            backends[1].health.drain()
            let picked = Set((0..<30).compactMap { _ in pool.pick()?.id })
            #expect(picked == ["b0", "b2"], "\(balance)")
            backends[0].health.remove()
            backends[2].health.remove()
            #expect(pool.pick() == nil, "\(balance)")
        }
    }

    @Test("keyed routing re-places the keys of a removed owner and no others; new keys avoid it")
    func keyedSkipsUnusable() throws {
        let backends = (0..<4).map { i in
            Backend(
                config: BackendConfig(id: "b\(i)", host: "127.0.0.1", port: 9000 + i),
                address: try! SocketAddress(ipAddress: "127.0.0.1", port: 9000 + i))
        }
        let table = RoutingTable(pools: [Pool(name: "p", balance: .roundRobin, backends: backends)])
        let runtime = ProxyRuntime(
            config: ProxyConfig(pools: [PoolConfig(name: "p", backends: backends.map(\.config))]), table: table,
            logger: Logger(label: "test"), accessLogger: Logger(label: "test"), metrics: ProxyMetrics(listeners: []))
        func owner(_ key: String) -> String? {
            guard case .owned(let backend, _) = runtime.resolve(.keyed(key: key, pool: "p", placement: "rendezvous"), on: nil)
            else { return nil }
            return backend.id
        }
        var before: [String: String] = [:]
        for i in 0..<200 { before["k\(i)"] = owner("k\(i)") }
        #expect(before.values.contains("b2"))
        backends[2].health.remove()
        for i in 0..<200 {
            let now = owner("k\(i)")
            #expect(now != nil && now != "b2")
            if before["k\(i)"] != "b2" { #expect(now == before["k\(i)"]) }
        }
        for i in 200..<300 { #expect(owner("k\(i)") != "b2") }
    }
}
