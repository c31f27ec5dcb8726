import NIOCore
import Synchronization

/// Anything commands can be sent to: a `RedisConnection` or a `RedisClient` pool.
public protocol RedisCommandSender: Sendable {
    func send(_ command: [any RESPArgument], timeout: TimeAmount?) -> EventLoopFuture<RESPValue>
}

extension RedisConnection: RedisCommandSender {}
extension RedisClient: RedisCommandSender {}

/// A Lua script run with EVALSHA: loaded once (SCRIPT LOAD) on first use; if the server has lost it (NOSCRIPT after
/// a restart or SCRIPT FLUSH), that call runs it with EVAL, which also caches it on the server again.
public final class RedisScript: Sendable {
    public let source: String
    private let loadedSHA = Mutex<String?>(nil)

    public init(_ source: String) {
        self.source = source
    }

    /// The SHA1 the server gave for the script, once loaded.
    public var sha: String? { self.loadedSHA.withLock { $0 } }

    fileprivate func remember(_ sha: String) { self.loadedSHA.withLock { $0 = sha } }
}

extension RedisCommandSender {
    private func expect<T>(_ command: [any RESPArgument], timeout: TimeAmount? = nil, _ transform: @escaping @Sendable (RESPValue) -> T?)
        -> EventLoopFuture<T>
    {
        self.send(command, timeout: timeout).flatMapThrowing { value in
            guard let result = transform(value) else { throw RedisError.unexpectedReply(value) }
            return result
        }
    }

    /// GET: the value, or nil when the key does not exist.
    public func get(_ key: String) -> EventLoopFuture<ByteBuffer?> {
        self.expect(["GET", key]) { value -> ByteBuffer?? in
            if case .bulkString(let bytes) = value { return .some(bytes) }
            return nil
        }
    }

    /// SET, with an expiry in milliseconds (PX) and NX (only if absent) when asked. True when the value was set.
    @discardableResult
    public func set(
        _ key: String, to value: some RESPArgument, expireAfter: TimeAmount? = nil, onlyIfAbsent: Bool = false
    ) -> EventLoopFuture<Bool> {
        var command: [any RESPArgument] = ["SET", key, value]
        if let expireAfter {
            command += ["PX", max(1, expireAfter.nanoseconds / 1_000_000)]
        }
        if onlyIfAbsent { command.append("NX") }
        return self.expect(command) { value in
            switch value {
            case .simpleString("OK"): return true
            case .bulkString(nil), .array(nil): return false
            default: return nil
            }
        }
    }

    /// INCR: the incremented value.
    public func incr(_ key: String) -> EventLoopFuture<Int64> {
        self.expect(["INCR", key]) { value in
            if case .integer(let number) = value { return number }
            return nil
        }
    }

    /// DEL: how many of the keys existed.
    @discardableResult
    public func del(_ keys: [String]) -> EventLoopFuture<Int64> {
        self.expect(["DEL"] + keys) { value in
            if case .integer(let number) = value { return number }
            return nil
        }
    }

    /// PUBLISH: how many subscribers received the message.
    @discardableResult
    public func publish(_ message: some RESPArgument, to channel: String) -> EventLoopFuture<Int64> {
        self.expect(["PUBLISH", channel, message]) { value in
            if case .integer(let number) = value { return number }
            return nil
        }
    }

    /// SCRIPT LOAD: the script's SHA1.
    public func scriptLoad(_ source: String) -> EventLoopFuture<String> {
        self.expect(["SCRIPT", "LOAD", source]) { $0.string }
    }

    public func eval(_ source: String, keys: [String] = [], args: [any RESPArgument] = []) -> EventLoopFuture<RESPValue> {
        self.send(["EVAL", source, keys.count] + keys + args, timeout: nil)
    }

    /// EVALSHA; fails with `RedisError.server("NOSCRIPT ...")` when the server does not have the script.
    public func evalsha(_ sha: String, keys: [String] = [], args: [any RESPArgument] = []) -> EventLoopFuture<RESPValue> {
        self.send(["EVALSHA", sha, keys.count] + keys + args, timeout: nil)
    }

    /// Runs the script with EVALSHA (SCRIPT LOAD first, once), falling back to EVAL on NOSCRIPT.
    public func evalsha(_ script: RedisScript, keys: [String] = [], args: [any RESPArgument] = []) -> EventLoopFuture<RESPValue> {
        guard let sha = script.sha else {
            return self.scriptLoad(script.source).flatMap { sha in
                script.remember(sha)
                return self.evalsha(script, keys: keys, args: args)
            }
        }
        let attempt = self.evalsha(sha, keys: keys, args: args)
        return attempt.flatMapError { error in
            guard (error as? RedisError)?.serverCode == "NOSCRIPT" else { return attempt }
            return self.eval(script.source, keys: keys, args: args)
        }
    }
}
