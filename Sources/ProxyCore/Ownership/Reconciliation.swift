import NIOCore

/// What a policy asks the proxy to poll on every backend, to learn which keys each one really holds.
public struct ProbeSpec: Sendable, Equatable {
    public var pool: String
    public var path: String
    public var headers: [Header]
    public var interval: TimeAmount
    public var timeout: TimeAmount

    public init(pool: String, path: String, headers: [Header] = [], interval: TimeAmount = .seconds(30), timeout: TimeAmount = .seconds(5)) {
        self.pool = pool
        self.path = path
        self.headers = headers
        self.interval = interval
        self.timeout = timeout
    }
}

/// One reconciliation pass: which keys to adopt and which are held twice. Pure, so it is tested without sockets.
///
/// A key a backend reports that nobody owns is adopted for that backend (a restarted proxy relearns where rooms are).
/// A key reported by two backends, or reported by one while the directory names another, is a duplicate: it is
/// reported, never resolved here — unloading a room is the application's decision (OTT's admin unload kicks users
/// with 4003 and deletes the room's saved state).
public struct ReconciliationReport: Sendable, Equatable {
    public struct Duplicate: Sendable, Equatable {
        public var key: String
        /// Backends that report holding the key, sorted.
        public var holders: [String]
        /// The directory's owner, when there is one.
        public var owner: String?
    }

    public var adopted: [String: String] = [:]
    public var duplicates: [Duplicate] = []
    public var backendsProbed: [String] = []
    public var backendsFailed: [String] = []

    public init() {}

    public static func compute(held: [String: [String]], owner: (String) -> String?) -> ReconciliationReport {
        var report = ReconciliationReport()
        var holders: [String: Set<String>] = [:]
        for (backend, keys) in held {
            for key in keys { holders[key, default: []].insert(backend) }
        }
        for key in holders.keys.sorted() {
            let backends = holders[key]!.sorted()
            let current = owner(key)
            if backends.count > 1 || (current != nil && !backends.contains(current!)) {
                report.duplicates.append(Duplicate(key: key, holders: backends, owner: current))
            } else if current == nil, let only = backends.first {
                report.adopted[key] = only
            }
        }
        report.backendsProbed = held.keys.sorted()
        return report
    }
}
