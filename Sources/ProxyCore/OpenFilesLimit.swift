import CProxySys

/// The process's open-file limit (`RLIMIT_NOFILE`, `ulimit -n`) against what the configuration needs.
///
/// A proxied connection costs two descriptors: the client's and its backend's. A tunnel holds both for its whole life,
/// and so does a keep-alive connection the HTTP relay serves, until its client has been idle for
/// `timeouts.upstream_idle`. So `limits.max_connections` clients may need twice as many descriptors, plus the pooled
/// idle backend connections and a reserve for listeners, epoll and event descriptors, Redis, the admin listener and
/// scripts. Many hosts start processes with a soft limit of 1,024 under a much higher hard limit (systemd's default
/// is 1,024 / 524,288): `ott-proxy run` raises the soft limit to what it needs, within the hard limit, as HAProxy does
/// by default (nginx needs `worker_rlimit_nofile`), and warns when even the hard limit is short. Without it, the
/// proxy would fail to accept or to connect (`EMFILE`) long before `max_connections`.
public enum OpenFilesLimit {
    /// Descriptors kept in reserve beyond the connections' (listeners, epoll and eventfds, Redis, admin, logs).
    public static let reserve = 256

    /// What `config` may need at most: two per client connection, the idle pooled backend connections (per backend
    /// and event loop), and the reserve.
    public static func needed(for config: ProxyConfig, loops: Int) -> Int {
        let backends = config.pools.reduce(0) { $0 + $1.backends.count }
        let pooled = config.limits.maxIdleUpstreamPerBackend * backends * max(loops, 1)
        return 2 * config.limits.maxConnections + pooled + Self.reserve
    }

    /// The process's limit, soft and hard.
    public struct Limit: Sendable, Equatable {
        public var soft: Int
        public var hard: Int

        public init(soft: Int, hard: Int) {
            self.soft = soft
            self.hard = hard
        }
    }

    /// The limit now, after raising the soft limit to `needed` (never beyond the hard limit, never lowering it); nil
    /// where the platform cannot say.
    public static func raise(to needed: Int) -> (before: Limit, after: Limit)? {
        var soft: UInt64 = 0
        var hard: UInt64 = 0
        guard cproxy_open_files_limit(0, &soft, &hard) == 0 else { return nil }
        let before = Limit(soft: Int(clamping: soft), hard: Int(clamping: hard))
        guard cproxy_open_files_limit(UInt64(max(needed, 0)), &soft, &hard) == 0 else { return (before, before) }
        return (before, Limit(soft: Int(clamping: soft), hard: Int(clamping: hard)))
    }

    /// The warning to log when `limit` (the soft limit in force) is below `needed`; nil when it suffices.
    public static func shortfall(limit: Int, needed: Int, maxConnections: Int) -> String? {
        guard limit < needed else { return nil }
        let fits = Self.connectionsFitting(limit: limit)
        let fitting = fits == 1 ? "1 connection fits" : "\(fits) connections fit"
        return "the open-file limit (\(limit)) is below the \(needed) descriptors limits.max_connections "
            + "(\(maxConnections)) may need (two per proxied connection): about \(fitting), and "
            + "limits.max_connections is lowered to \(fits) for this run. Raise the hard limit (ulimit -Hn, systemd "
            + "LimitNOFILE=) or lower limits.max_connections"
    }

    /// The client connections that fit in `limit` descriptors, two each after the reserve; at least 1.
    public static func connectionsFitting(limit: Int) -> Int {
        max((limit - Self.reserve) / 2, 1)
    }
}
