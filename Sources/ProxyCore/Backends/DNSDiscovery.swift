import Logging
import NIOCore
import NIOPosix
import Synchronization

// The C library (getaddrinfo) through Foundation, as the rest of ProxyCore sees it: importing Glibc directly would
// change how clients of ProxyCore see its globals (`stdout` stops being `@preconcurrency`).
import Foundation

/// Turns a DNS name into addresses. The proxy uses `SystemResolver`; tests inject their own.
public protocol BackendResolver: Sendable {
    /// Every A and AAAA address of `name`, with `port`. Throws when the name does not resolve.
    func resolve(name: String, port: Int) async throws -> [SocketAddress]
}

/// `getaddrinfo` on NIO's blocking-I/O thread pool, never on an event loop or the cooperative pool.
public struct SystemResolver: BackendResolver {
    public struct Failure: Error, CustomStringConvertible {
        public var name: String
        public var code: Int32
        public var description: String { "cannot resolve '\(self.name)': \(String(cString: gai_strerror(self.code)))" }
    }

    public init() {}

    public func resolve(name: String, port: Int) async throws -> [SocketAddress] {
        try await NIOThreadPool.singleton.runIfActive { try Self.lookup(name: name, port: port) }
    }

    static func lookup(name: String, port: Int) throws -> [SocketAddress] {
        var hints = addrinfo()
        #if canImport(Darwin)
        hints.ai_socktype = SOCK_STREAM
        #else
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        #endif
        var list: UnsafeMutablePointer<addrinfo>?
        let code = getaddrinfo(name, String(port), &hints, &list)
        guard code == 0 else { throw Failure(name: name, code: code) }
        defer { freeaddrinfo(list) }
        var addresses: [SocketAddress] = []
        var next = list
        while let info = next?.pointee {
            next = info.ai_next
            guard let raw = info.ai_addr else { continue }
            switch info.ai_family {
            case AF_INET:
                raw.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { addresses.append(SocketAddress($0.pointee, host: name)) }
            case AF_INET6:
                raw.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { addresses.append(SocketAddress($0.pointee, host: name)) }
            default:
                continue
            }
        }
        return addresses
    }
}

/// DNS discovery for one pool: resolves `discovery.dns.name` every `interval` and hands the resulting backends to
/// `apply` when they differ from what it applied last.
///
/// - Ids are `<pool>-<ip>:<port>` (e.g. `app-10.0.0.7:3000`, `app-::1:3000`), so an address keeps its id, and with
///   it its health state and its keys, across re-resolutions and reloads.
/// - A failed or empty answer keeps the backends found before: a DNS outage must not empty the pool.
/// - An `apply` that fails (a reload was in progress) is retried at the next interval.
final class DNSDiscovery: Sendable {
    typealias Apply = @Sendable (_ pool: String, _ backends: [BackendConfig]) async -> Bool

    let pool: String
    let config: DNSDiscoveryConfig
    private let task: Mutex<Task<Void, Never>?> = Mutex(nil)

    init(pool: String, config: DNSDiscoveryConfig) {
        self.pool = pool
        self.config = config
    }

    /// The backends an answer stands for: one per distinct address, sorted by id.
    static func backends(pool: String, port: Int, addresses: [SocketAddress]) -> [BackendConfig] {
        var seen = Set<String>()
        return addresses.compactMap { address -> BackendConfig? in
            guard let ip = address.ipAddress, seen.insert(ip).inserted else { return nil }
            return BackendConfig(id: "\(pool)-\(ip):\(port)", host: ip, port: port)
        }.sorted { $0.id < $1.id }
    }

    func start(resolver: BackendResolver, alreadyApplied: [BackendConfig], logger: Logger, apply: @escaping Apply) {
        let pool = self.pool
        let config = self.config
        let task = Task {
            var applied: [BackendConfig]? = alreadyApplied.isEmpty ? nil : alreadyApplied
            var failing = false
            while !Task.isCancelled {
                do {
                    let addresses = try await resolver.resolve(name: config.name, port: config.port)
                    let backends = Self.backends(pool: pool, port: config.port, addresses: addresses)
                    guard !backends.isEmpty else { throw EmptyAnswer() }
                    if failing {
                        logger.info("DNS discovery resolves again", metadata: ["pool": "\(pool)", "name": "\(config.name)"])
                    }
                    failing = false
                    if backends != applied, !Task.isCancelled {
                        if await apply(pool, backends) {
                            logger.info(
                                "DNS discovery applied",
                                metadata: ["pool": "\(pool)", "name": "\(config.name)", "backends": "\(backends.map(\.id))"])
                            applied = backends
                        }
                    }
                } catch {
                    if !failing {
                        logger.warning(
                            "DNS discovery failed; keeping the backends found before",
                            metadata: ["pool": "\(pool)", "name": "\(config.name)", "error": "\(error)"])
                    }
                    failing = true
                }
                let interval = config.interval.nanoseconds
                do {
                    try await Task.sleep(for: .nanoseconds(interval + Int64.random(in: -(interval / 10)...(interval / 10))))
                } catch {
                    return
                }
            }
        }
        self.task.withLock { $0 = task }
    }

    private struct EmptyAnswer: Error, CustomStringConvertible {
        var description: String { "the name has no address" }
    }

    func cancel() {
        self.task.withLock { $0 }?.cancel()
    }
}
