/// Why a tunnel ended, as its access-log line says (`end=`): the first of these that happened, as HAProxy's
/// termination state says who ended a session.
enum TunnelEnd: String, Sendable {
    /// The client closed its connection (or ended its stream) first.
    case client
    /// The backend closed its connection first.
    case backend
    /// No byte passed either way for `timeouts.tunnel_idle`.
    case idle
    /// The proxy closed it: its key moved (owner change, migration, drain) or the proxy shut down.
    case proxy
    /// A socket failed (a reset, a refused write, an error the kernel reported), or the tunnel could not be set up.
    case error
}
