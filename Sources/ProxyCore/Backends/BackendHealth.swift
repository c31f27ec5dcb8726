import Logging
import NIOCore
import Synchronization

/// A thread-safe home for one backend's `BackendStateMachine`, shared by every event loop and every configuration
/// generation in which the backend keeps its id and address (see `BackendRegistry`).
///
/// Events take the lock; `isUsable`, which every balancing decision asks, reads one atomic instead.
public final class BackendHealth: Sendable {
    public let id: String
    private let machine: Mutex<BackendStateMachine>
    /// `usableFrom` of the machine in uptime nanoseconds; `UInt64.max` = not usable until an event.
    private let usableFrom: Atomic<UInt64>
    /// True when a successful request would change nothing (no failures counted, no back-off, no ejection, or
    /// passive ejection off): lets the common case skip the lock on every response.
    private let successIsNoOp: Atomic<Bool>
    private let logger: Logger?

    public init(id: String, settings: BackendStateMachine.Settings = .init(), logger: Logger? = nil) {
        self.id = id
        let machine = BackendStateMachine(settings: settings)
        self.machine = Mutex(machine)
        self.usableFrom = Atomic(Self.encode(machine.usableFrom))
        self.successIsNoOp = Atomic(Self.successIsNoOp(machine))
        self.logger = logger
    }

    public var isUsable: Bool {
        let from = self.usableFrom.load(ordering: .relaxed)
        if from == 0 { return true }
        if from == .max { return false }
        return NIODeadline.now().uptimeNanoseconds >= from
    }

    public var status: BackendStatus {
        let now = NIODeadline.now()
        return self.machine.withLock { BackendStatus(machine: $0, now: now) }
    }

    /// A copy of the machine, for tests and diagnostics.
    public var snapshot: BackendStateMachine { self.machine.withLock { $0 } }

    @discardableResult
    public func recordActiveCheck(passed: Bool) -> [BackendStateMachine.Action] {
        self.apply { $0.activeCheck(passed: passed, now: $1) }
    }

    @discardableResult
    public func record(_ outcome: BackendStateMachine.PassiveOutcome) -> [BackendStateMachine.Action] {
        switch outcome {
        case .success, .response(status: ..<500):
            if self.successIsNoOp.load(ordering: .relaxed) { return [] }
        case .connectFailure, .response:
            break
        }
        return self.apply { $0.record(outcome, now: $1) }
    }

    @discardableResult
    public func drain() -> [BackendStateMachine.Action] {
        self.apply { machine, _ in machine.drain() }
    }

    @discardableResult
    public func undrain() -> [BackendStateMachine.Action] {
        self.apply { machine, _ in machine.undrain() }
    }

    @discardableResult
    public func remove() -> [BackendStateMachine.Action] {
        self.apply { machine, _ in machine.remove() }
    }

    @discardableResult
    public func update(settings: BackendStateMachine.Settings) -> [BackendStateMachine.Action] {
        self.apply { $0.update(settings: settings, now: $1) }
    }

    private func apply(
        _ event: (inout BackendStateMachine, NIODeadline) -> [BackendStateMachine.Action]
    ) -> [BackendStateMachine.Action] {
        let now = NIODeadline.now()
        let actions = self.machine.withLock { machine in
            let actions = event(&machine, now)
            self.usableFrom.store(Self.encode(machine.usableFrom), ordering: .relaxed)
            self.successIsNoOp.store(Self.successIsNoOp(machine), ordering: .relaxed)
            return actions
        }
        for action in actions { self.log(action) }
        return actions
    }

    private func log(_ action: BackendStateMachine.Action) {
        guard let logger = self.logger else { return }
        let metadata: Logger.Metadata = ["backend": "\(self.id)"]
        switch action {
        case .markedUnhealthy:
            logger.warning("backend failed its health checks: out of rotation", metadata: metadata)
        case .markedHealthy:
            logger.info("backend passed its health checks: back in rotation", metadata: metadata)
        case .ejected(let until, let ejections):
            var metadata = metadata
            metadata["for"] = "\(until - NIODeadline.now())"
            metadata["ejections"] = "\(ejections)"
            logger.warning("backend ejected after consecutive failures", metadata: metadata)
        case .ejectionEnded(let byActiveCheck):
            var metadata = metadata
            metadata["by"] = byActiveCheck ? "health check" : "time"
            logger.info("backend ejection ended", metadata: metadata)
        case .startedDraining:
            logger.info("backend draining", metadata: metadata)
        case .stoppedDraining:
            logger.info("backend drain undone: taking new work again", metadata: metadata)
        case .removed:
            logger.info("backend removed", metadata: metadata)
        }
    }

    private static func successIsNoOp(_ machine: BackendStateMachine) -> Bool {
        guard machine.settings.passive.map({ $0.consecutiveFailures > 0 }) ?? false else { return true }
        return machine.consecutiveFailures == 0 && machine.ejections == 0 && machine.ejectedUntil == nil
    }

    private static func encode(_ deadline: NIODeadline?) -> UInt64 {
        guard let deadline else { return .max }
        return deadline.uptimeNanoseconds
    }
}

/// One backend's health as the admin API shows it.
public struct BackendStatus: Sendable, Equatable {
    public var state: BackendStateMachine.State
    public var usable: Bool
    /// Whether passive ejection currently keeps it out, and until when.
    public var ejectedUntil: NIODeadline?
    /// Consecutive ejections so far (the back-off exponent + 1).
    public var ejections: Int
    /// Consecutive failed requests counted towards the next ejection.
    public var consecutiveFailures: Int
    /// The active checks' verdict (true without active checks).
    public var passingChecks: Bool

    init(machine: BackendStateMachine, now: NIODeadline) {
        self.state = machine.state(at: now)
        self.usable = machine.isUsable(at: now)
        self.ejectedUntil = machine.isEjected(at: now) ? machine.ejectedUntil : nil
        self.ejections = machine.ejections
        self.consecutiveFailures = machine.consecutiveFailures
        self.passingChecks = machine.healthy
    }
}

extension Backend {
    /// Healthy and neither draining, removed nor ejected: balancing and placement skip backends that are not.
    public var isUsable: Bool { self.health.isUsable }

    public var status: BackendStatus { self.health.status }

    /// Connecting to the backend failed or timed out.
    public func recordConnectFailure() {
        self.health.record(.connectFailure)
    }

    /// The backend answered with a final response head.
    public func recordResponse(status: Int) {
        self.health.record(.response(status: status))
    }

    /// The backend served a request.
    public func recordSuccess() {
        self.health.record(.success)
    }
}
