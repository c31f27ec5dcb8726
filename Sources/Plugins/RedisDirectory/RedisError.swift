import NIOCore

/// Everything the Redis client can fail with.
public enum RedisError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The server answered with an error reply (`-ERR ...`, `-NOSCRIPT ...`, `-WRONGPASS ...`).
    case server(String)
    /// The command got no reply in time; its connection was closed (replies could no longer be matched).
    case timeout(command: String, after: TimeAmount)
    /// The connection closed (or failed) before the reply arrived.
    case connectionClosed(String)
    /// No connection is up (the server is down or unreachable); the last connection error is given.
    case unavailable(String)
    /// AUTH was refused while connecting.
    case authenticationFailed(String)
    /// SELECT was refused while connecting.
    case selectFailed(database: Int, String)
    /// The reply has a shape the helper did not expect.
    case unexpectedReply(RESPValue)
    /// The client or subscriber was closed.
    case closed
    /// The `redis://` or `rediss://` URL is not usable.
    case invalidURL(String)

    /// The error code of a server error (its first word: `ERR`, `NOSCRIPT`, `WRONGPASS`, ...).
    public var serverCode: String? {
        guard case .server(let message) = self else { return nil }
        return message.split(separator: " ", maxSplits: 1).first.map(String.init)
    }

    public var description: String {
        switch self {
        case .server(let message): return "redis error: \(message)"
        case .timeout(let command, let after):
            return "redis command \(command) timed out after \(after.nanoseconds / 1_000_000) ms (connection closed)"
        case .connectionClosed(let why): return "redis connection closed: \(why)"
        case .unavailable(let why): return "redis unavailable: \(why)"
        case .authenticationFailed(let message): return "redis authentication failed: \(message)"
        case .selectFailed(let database, let message): return "redis SELECT \(database) failed: \(message)"
        case .unexpectedReply(let value): return "unexpected redis reply: \(value)"
        case .closed: return "redis client closed"
        case .invalidURL(let why): return "invalid redis URL: \(why)"
        }
    }
}
