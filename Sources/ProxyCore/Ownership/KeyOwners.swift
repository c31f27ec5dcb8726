import Synchronization

/// Keys claimed by a backend (today: through a policy's `onResponse`), shared by every event loop.
///
/// This is the seed of the ownership directory: no leases or epochs yet, so it is bounded instead — beyond `capacity`
/// the oldest claims are forgotten (those keys fall back to hashing).
public final class KeyOwners: Sendable {
    private struct State {
        var owners: [String: String] = [:]
        var order: [String] = []
        var head = 0
    }

    private let state = Mutex(State())
    public let capacity: Int

    public init(capacity: Int = 100_000) {
        self.capacity = capacity
    }

    public func owner(of key: String) -> String? {
        self.state.withLock { $0.owners[key] }
    }

    public func claim(_ key: String, backend: String) {
        self.state.withLock { state in
            if state.owners.updateValue(backend, forKey: key) == nil {
                state.order.append(key)
            }
            while state.owners.count > self.capacity, state.head < state.order.count {
                state.owners.removeValue(forKey: state.order[state.head])
                state.head += 1
            }
            if state.head > 1024 && state.head * 2 > state.order.count {
                state.order.removeFirst(state.head)
                state.head = 0
            }
        }
    }

    public var count: Int { self.state.withLock { $0.owners.count } }
}

/// The live view a routing policy gets: backends of the current generation and claimed owners.
public struct LiveRoutingEnvironment: RoutingEnvironment {
    let table: RoutingTable
    let owners: KeyOwners

    public init(table: RoutingTable, owners: KeyOwners) {
        self.table = table
        self.owners = owners
    }

    public func backends(pool: String) -> [BackendSnapshot]? {
        guard let pool = self.table.pools[pool] else { return nil }
        return pool.backends.map { backend in
            BackendSnapshot(
                id: backend.id,
                pool: pool.name,
                region: backend.config.region,
                tags: backend.config.tags,
                weight: backend.config.weight,
                connections: backend.active
            )
        }
    }

    public func owner(key: String) -> String? {
        self.owners.owner(of: key)
    }
}
