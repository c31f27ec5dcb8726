import NIOCore
import NIOPosix
import ProxyCore
import Synchronization
import Testing

/// A migration lists the drained backend's keys once per batch, not once per key moved: listing scans the whole
/// ownership table under its lock.
@Suite struct MigrationListingTests {
    /// The in-memory directory, counting how often the backend's keys are listed.
    final class CountingDirectory: OwnershipDirectory {
        let inner = InMemoryOwnershipDirectory()
        let listings = Atomic<Int>(0)

        func owner(of key: String) -> Ownership? { self.inner.owner(of: key) }
        func validOwner(key: String, pool: String, stillValid: (String) -> Bool) -> Ownership? {
            self.inner.validOwner(key: key, pool: pool, stillValid: stillValid)
        }
        func resolve(_ query: OwnershipQuery, on eventLoop: EventLoop?) -> OwnershipResolution {
            self.inner.resolve(query, on: eventLoop)
        }
        func claim(key: String, pool: String, backend: String, idleTTL: TimeAmount) {
            self.inner.claim(key: key, pool: pool, backend: backend, idleTTL: idleTTL)
        }
        func release(key: String) { self.inner.release(key: key) }
        func acquireLease(key: String) { self.inner.acquireLease(key: key) }
        func releaseLease(key: String) { self.inner.releaseLease(key: key) }
        func keyCount(on backend: String) -> Int { self.inner.keyCount(on: backend) }
        func keys(ownedBy backend: String) -> [String] {
            self.listings.add(1, ordering: .relaxed)
            return self.inner.keys(ownedBy: backend)
        }
        func list(prefix: String, limit: Int) -> [(ownership: Ownership, live: Int)] {
            self.inner.list(prefix: prefix, limit: limit)
        }
        func liveCount(of key: String) -> Int { self.inner.liveCount(of: key) }
        func onChange(_ handler: @escaping @Sendable (OwnershipChange) -> Void) { self.inner.onChange(handler) }
    }

    @Test func migratingThirtyKeysListsTheBackendsKeysTwice() async throws {
        let directory = CountingDirectory()
        var config = ProxyConfig(
            listeners: [ListenerConfig(name: "test", address: "127.0.0.1", port: 0, pool: "main")],
            pools: [
                PoolConfig(
                    name: "main",
                    backends: [
                        BackendConfig(id: "a", host: "127.0.0.1", port: 1),
                        BackendConfig(id: "b", host: "127.0.0.1", port: 2),
                    ])
            ],
            logging: LoggingConfig(level: .critical, format: .logfmt, accessLog: false))
        config.ownership.migrateRate = 1_000
        config.timeouts.shutdownGrace = .milliseconds(100)
        let server = try ProxyServer(config: config, group: MultiThreadedEventLoopGroup.singleton, directory: directory)
        try await server.start()
        for index in 0..<40 {
            let owner = index % 4 == 0 ? "b" : "a"
            _ = directory.resolve(
                OwnershipQuery(
                    key: "room:\(index)", pool: "main", idleTTL: .seconds(300), stillValid: { _ in true },
                    place: { _, _ in owner }),
                on: nil)
        }
        #expect(directory.keyCount(on: "a") == 30)
        #expect(server.drain(backend: "a", migrate: true))
        // 30 ms of migration at this rate; the margin is for a loaded machine (the suite runs in parallel on 2 cores).
        let moved = await WSSupport.waitUntil(timeout: .seconds(15)) { directory.keyCount(on: "a") == 0 }
        #expect(moved, "keys left on a: \(directory.keyCount(on: "a"))")
        // The migration ends once a listing finds nothing more.
        let ended = await WSSupport.waitUntil(timeout: .seconds(2)) { directory.listings.load(ordering: .relaxed) >= 2 }
        #expect(ended)
        try await Task.sleep(for: .milliseconds(100))
        // One listing for the batch of 30, one that finds the backend empty: not one per key.
        #expect(directory.listings.load(ordering: .relaxed) == 2)
        #expect(directory.keyCount(on: "b") == 10)
        await server.shutdown()
    }
}
