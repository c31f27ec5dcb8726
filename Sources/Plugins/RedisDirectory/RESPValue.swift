import NIOCore

/// One RESP2 value. RESP3 replies are mapped onto these (see `RESPParser`) so callers handle one shape.
public enum RESPValue: Sendable, Hashable {
    /// `+OK\r\n`
    case simpleString(String)
    /// `-ERR message\r\n`: a server error reply (`RedisConnection.send` turns it into `RedisError.server`).
    case error(String)
    /// `:42\r\n`
    case integer(Int64)
    /// `$3\r\nfoo\r\n`; nil is the null bulk string `$-1\r\n`.
    case bulkString(ByteBuffer?)
    /// `*2\r\n...`; nil is the null array `*-1\r\n`.
    case array([RESPValue]?)

    /// A null reply (null bulk string or null array).
    public var isNull: Bool {
        switch self {
        case .bulkString(nil), .array(nil): return true
        default: return false
        }
    }

    /// The text of a simple or bulk string (bulk strings decoded as UTF-8), or an integer's decimal form.
    public var string: String? {
        switch self {
        case .simpleString(let text): return text
        case .bulkString(let buffer?): return String(buffer: buffer)
        case .integer(let value): return String(value)
        default: return nil
        }
    }

    /// An integer reply, or a simple/bulk string holding a decimal integer.
    public var int: Int64? {
        switch self {
        case .integer(let value): return value
        case .simpleString, .bulkString: return self.string.flatMap { Int64($0) }
        default: return nil
        }
    }

    /// The elements of a non-null array.
    public var array: [RESPValue]? {
        if case .array(let elements?) = self { return elements }
        return nil
    }

    /// The bytes of a non-null bulk string.
    public var bytes: ByteBuffer? {
        if case .bulkString(let buffer?) = self { return buffer }
        return nil
    }
}

extension RESPValue: CustomStringConvertible {
    public var description: String {
        switch self {
        case .simpleString(let text): return "+\(text)"
        case .error(let text): return "-\(text)"
        case .integer(let value): return ":\(value)"
        case .bulkString(nil): return "(nil)"
        case .bulkString(let buffer?):
            let shown = buffer.readableBytes <= 64 ? String(buffer: buffer) : "<\(buffer.readableBytes) bytes>"
            return "\"\(shown)\""
        case .array(nil): return "(nil array)"
        case .array(let elements?): return "[" + elements.map(\.description).joined(separator: ", ") + "]"
        }
    }
}
