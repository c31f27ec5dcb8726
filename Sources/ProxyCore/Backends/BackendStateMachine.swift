import NIOCore

/// The health of one backend as a pure state machine: events in (active check results, request outcomes, drain,
/// removal, the passing of time), actions and state out. No I/O and no clock: every event carries `now`, so tests
/// drive it deterministically.
///
/// Two independent verdicts make a backend unusable:
/// - **active checks** (when configured): `fall` consecutive failures make it unhealthy, `rise` consecutive passes
///   make it healthy again. A backend starts healthy (as HAProxy's servers do), so a reload or a new discovered
///   address does not wait `rise` intervals before taking traffic.
/// - **passive ejection** (when configured): `consecutive_failures` failed requests in a row eject it for
///   `ejection_time × 2^(n-1)` (n = consecutive ejections, capped at `max_ejection_time`). The ejection ends when
///   that time has passed, or at the first passing active check. A request that succeeds outside an ejection resets
///   both the failure count and the back-off.
///
/// Draining and removal are lifecycle steps on top of that: a draining backend is kept for what it already serves but
/// takes nothing new, until the drain is undone; a removed one is gone from configuration or discovery, for good.
public struct BackendStateMachine: Sendable, Equatable {
    /// What the admin API reports. An ejected backend reports `unhealthy`.
    public enum State: String, Sendable, Equatable, CaseIterable {
        case healthy, unhealthy, draining, removed
    }

    public enum Lifecycle: String, Sendable, Equatable {
        case active, draining, removed
    }

    /// The outcome of one real request to the backend.
    public enum PassiveOutcome: Sendable, Equatable {
        /// Connecting failed or timed out.
        case connectFailure
        /// The backend sent a final response head with this status.
        case response(status: Int)
        /// The backend served a request (used where no status is known, e.g. a completed tunnel).
        case success
    }

    /// What changed; callers log these and count them in metrics.
    public enum Action: Sendable, Equatable {
        /// `fall` consecutive active checks failed.
        case markedUnhealthy
        /// `rise` consecutive active checks passed.
        case markedHealthy
        /// Passively ejected until `until`; `ejections` counts consecutive ejections (the back-off exponent + 1).
        case ejected(until: NIODeadline, ejections: Int)
        /// The ejection ended, because its time passed or an active check passed.
        case ejectionEnded(byActiveCheck: Bool)
        case startedDraining
        /// A drain was undone: the backend takes new work again.
        case stoppedDraining
        case removed
    }

    public struct Settings: Sendable, Equatable {
        /// Active checks; only `rise` and `fall` matter here.
        public var active: HealthCheckConfig?
        public var passive: PassiveConfig?

        public init(active: HealthCheckConfig? = nil, passive: PassiveConfig? = nil) {
            self.active = active
            self.passive = passive
        }

        public init(pool: PoolConfig) {
            self.init(active: pool.healthCheck, passive: pool.passive)
        }

        var ejectsPassively: Bool { (self.passive?.consecutiveFailures ?? 0) > 0 }
    }

    public private(set) var settings: Settings
    public private(set) var lifecycle: Lifecycle = .active
    /// The active checks' verdict (always true without active checks).
    public private(set) var healthy = true
    /// Consecutive passing active checks while unhealthy, failing ones while healthy.
    public private(set) var checkStreak = 0
    /// Consecutive failed requests (outside an ejection).
    public private(set) var consecutiveFailures = 0
    /// Consecutive ejections, for the back-off.
    public private(set) var ejections = 0
    public private(set) var ejectedUntil: NIODeadline?

    public init(settings: Settings = Settings()) {
        self.settings = settings
    }

    // MARK: Reading

    public func state(at now: NIODeadline) -> State {
        switch self.lifecycle {
        case .removed: return .removed
        case .draining: return .draining
        case .active: return self.healthy && !self.isEjected(at: now) ? .healthy : .unhealthy
        }
    }

    public func isEjected(at now: NIODeadline) -> Bool {
        self.ejectedUntil.map { now < $0 } ?? false
    }

    /// Healthy, active (neither draining nor removed) and not ejected.
    public func isUsable(at now: NIODeadline) -> Bool {
        self.state(at: now) == .healthy
    }

    /// From when the backend is usable if no further event arrives: `.distantPast` when it is usable now, the end
    /// of the ejection while only an ejection stands in the way, nil while it needs an event (a passing check).
    /// This is what lets readers decide usability without taking a lock.
    public var usableFrom: NIODeadline? {
        guard self.lifecycle == .active, self.healthy else { return nil }
        return self.ejectedUntil ?? .distantPast
    }

    // MARK: Events

    /// Ends an ejection whose time has passed. Every other event calls this first, so callers only need it to
    /// observe the transition at the moment it happens.
    public mutating func expire(now: NIODeadline) -> [Action] {
        guard let until = self.ejectedUntil, now >= until else { return [] }
        self.ejectedUntil = nil
        self.consecutiveFailures = 0
        return [.ejectionEnded(byActiveCheck: false)]
    }

    public mutating func activeCheck(passed: Bool, now: NIODeadline) -> [Action] {
        guard self.lifecycle != .removed, let active = self.settings.active else { return [] }
        var actions = self.expire(now: now)
        if passed {
            if self.ejectedUntil != nil {
                self.ejectedUntil = nil
                self.consecutiveFailures = 0
                actions.append(.ejectionEnded(byActiveCheck: true))
            }
            if self.healthy {
                self.checkStreak = 0
            } else {
                self.checkStreak += 1
                if self.checkStreak >= active.rise {
                    self.healthy = true
                    self.checkStreak = 0
                    actions.append(.markedHealthy)
                }
            }
        } else {
            if self.healthy {
                self.checkStreak += 1
                if self.checkStreak >= active.fall {
                    self.healthy = false
                    self.checkStreak = 0
                    actions.append(.markedUnhealthy)
                }
            } else {
                self.checkStreak = 0
            }
        }
        return actions
    }

    public mutating func record(_ outcome: PassiveOutcome, now: NIODeadline) -> [Action] {
        guard self.lifecycle != .removed, let passive = self.settings.passive, self.settings.ejectsPassively else {
            return []
        }
        var actions = self.expire(now: now)
        // Outcomes of requests that were already in flight when the backend was ejected change nothing.
        guard self.ejectedUntil == nil else { return actions }
        let failed: Bool
        switch outcome {
        case .connectFailure: failed = true
        case .response(let status): failed = passive.count5xx && (500...599).contains(status)
        case .success: failed = false
        }
        guard failed else {
            self.consecutiveFailures = 0
            self.ejections = 0
            return actions
        }
        self.consecutiveFailures += 1
        guard self.consecutiveFailures >= passive.consecutiveFailures else { return actions }
        self.consecutiveFailures = 0
        self.ejections += 1
        let until = now + Self.ejectionTime(passive, ejections: self.ejections)
        self.ejectedUntil = until
        actions.append(.ejected(until: until, ejections: self.ejections))
        return actions
    }

    /// Takes no new work; what it serves continues. A removed backend stays removed.
    public mutating func drain() -> [Action] {
        guard self.lifecycle == .active else { return [] }
        self.lifecycle = .draining
        return [.startedDraining]
    }

    /// Undoes a drain: the backend takes new work again (when its health allows). A removed backend stays removed.
    public mutating func undrain() -> [Action] {
        guard self.lifecycle == .draining else { return [] }
        self.lifecycle = .active
        return [.stoppedDraining]
    }

    /// Gone from configuration or discovery.
    public mutating func remove() -> [Action] {
        guard self.lifecycle != .removed else { return [] }
        self.lifecycle = .removed
        return [.removed]
    }

    /// New thresholds from a reload. Turning active checks off forgets their verdict; turning passive ejection off
    /// ends a standing ejection.
    public mutating func update(settings: Settings, now: NIODeadline) -> [Action] {
        var actions = self.expire(now: now)
        let old = self.settings
        self.settings = settings
        if settings.active == nil, old.active != nil {
            self.checkStreak = 0
            if !self.healthy {
                self.healthy = true
                actions.append(.markedHealthy)
            }
        }
        if !settings.ejectsPassively {
            self.consecutiveFailures = 0
            self.ejections = 0
            if self.ejectedUntil != nil {
                self.ejectedUntil = nil
                actions.append(.ejectionEnded(byActiveCheck: false))
            }
        }
        return actions
    }

    /// `ejection_time × 2^(ejections-1)`, capped at `max_ejection_time` (and safe from overflow).
    static func ejectionTime(_ passive: PassiveConfig, ejections: Int) -> TimeAmount {
        let base = passive.ejectionTime.nanoseconds
        let cap = max(passive.maxEjectionTime.nanoseconds, base)
        var time = base
        for _ in 1..<max(ejections, 1) {
            guard time < cap else { break }
            time = time > cap / 2 ? cap : time * 2
        }
        return .nanoseconds(min(time, cap))
    }
}
