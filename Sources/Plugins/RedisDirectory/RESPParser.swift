import NIOCore

/// Limits that bound what a peer can make the decoder buffer or build.
public struct RESPLimits: Sendable, Hashable {
    /// Longest bulk string accepted (Redis' own maximum is 512 MiB).
    public var maxBulkLength: Int
    /// Most elements in one array (a RESP3 map counts two per entry).
    public var maxArrayLength: Int
    /// Deepest nesting of arrays.
    public var maxDepth: Int
    /// Longest simple string, error or length line (without the CRLF).
    public var maxLineLength: Int

    public init(
        maxBulkLength: Int = 16 << 20,
        maxArrayLength: Int = 1 << 20,
        maxDepth: Int = 32,
        maxLineLength: Int = 64 << 10
    ) {
        self.maxBulkLength = maxBulkLength
        self.maxArrayLength = maxArrayLength
        self.maxDepth = maxDepth
        self.maxLineLength = maxLineLength
    }

    public static let `default` = RESPLimits()
}

/// Why bytes from the server are not valid RESP. The connection is unusable after one of these.
public enum RESPDecodingError: Error, Sendable, Hashable {
    case unknownType(UInt8)
    case invalidLength(String)
    case invalidInteger(String)
    case invalidTerminator
    case invalidBoolean(String)
    case bulkTooLong(length: Int64, limit: Int)
    case arrayTooLong(length: Int64, limit: Int)
    case nestingTooDeep(limit: Int)
    case lineTooLong(limit: Int)
}

/// An incremental RESP parser.
///
/// Feed it a buffer as bytes arrive: `next(&buffer)` returns one complete top-level value, or nil when more bytes are
/// needed. Bytes are consumed only for complete elements; partially received arrays are kept on an explicit stack (so
/// a large array arriving in many reads is parsed once, not re-scanned per read).
///
/// Guarantees, for any input: it never traps, each call consumes bytes or returns/throws (no loop without progress),
/// and memory grows only with bytes actually received: declared lengths are checked against `RESPLimits` before
/// anything is reserved, and nothing is reserved from a declared length beyond a small cap.
///
/// RESP3 replies are accepted and mapped onto RESP2 shapes: `_` null → `.bulkString(nil)`, `#t`/`#f` → `.integer(1/0)`,
/// `,` double and `(` big number → `.simpleString(text)`, `%` map → flattened `.array` (key, value, ...), `~` set and
/// `>` push → `.array`, `=` verbatim string → `.bulkString` (with its `txt:` prefix), `!` blob error → `.error`.
/// Any other type byte is `RESPDecodingError.unknownType`.
public struct RESPParser: Sendable {
    public let limits: RESPLimits

    private struct Aggregate: Sendable {
        var remaining: Int
        var elements: [RESPValue]
    }

    /// Arrays whose header has been read but whose elements have not all arrived.
    private var stack: [Aggregate] = []

    public init(limits: RESPLimits = .default) {
        self.limits = limits
    }

    /// Whether a value has been partly consumed (bytes are missing to finish it).
    public var hasPartialValue: Bool { !self.stack.isEmpty }

    private enum Element {
        case value(RESPValue)
        case aggregate(count: Int)
    }

    public mutating func next(_ buffer: inout ByteBuffer) throws -> RESPValue? {
        while true {
            guard let element = try self.readElement(&buffer) else { return nil }
            var value: RESPValue
            switch element {
            case .value(let complete):
                value = complete
            case .aggregate(let count):
                if count == 0 {
                    value = .array([])
                } else {
                    guard self.stack.count < self.limits.maxDepth else {
                        throw RESPDecodingError.nestingTooDeep(limit: self.limits.maxDepth)
                    }
                    var elements: [RESPValue] = []
                    elements.reserveCapacity(Swift.min(count, 16))
                    self.stack.append(Aggregate(remaining: count, elements: elements))
                    continue
                }
            }
            // Fold the completed value into its parents.
            while true {
                guard var top = self.stack.popLast() else { return value }
                top.elements.append(value)
                top.remaining -= 1
                if top.remaining > 0 {
                    self.stack.append(top)
                    break
                }
                value = .array(top.elements)
            }
        }
    }

    /// Reads one scalar or one aggregate header; nil (consuming nothing) when it has not fully arrived.
    private func readElement(_ buffer: inout ByteBuffer) throws -> Element? {
        guard let type = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return nil }
        let start = buffer.readerIndex
        guard let (line, afterLine) = try self.findLine(in: buffer, from: start + 1) else { return nil }
        switch type {
        case UInt8(ascii: "+"):
            buffer.moveReaderIndex(to: afterLine)
            return .value(.simpleString(Self.text(line)))
        case UInt8(ascii: "-"):
            buffer.moveReaderIndex(to: afterLine)
            return .value(.error(Self.text(line)))
        case UInt8(ascii: ":"):
            guard let value = Self.parseInteger(line) else {
                throw RESPDecodingError.invalidInteger(Self.text(line))
            }
            buffer.moveReaderIndex(to: afterLine)
            return .value(.integer(value))
        case UInt8(ascii: "_"):
            guard line.readableBytes == 0 else { throw RESPDecodingError.invalidTerminator }
            buffer.moveReaderIndex(to: afterLine)
            return .value(.bulkString(nil))
        case UInt8(ascii: "#"):
            let text = Self.text(line)
            guard text == "t" || text == "f" else { throw RESPDecodingError.invalidBoolean(text) }
            buffer.moveReaderIndex(to: afterLine)
            return .value(.integer(text == "t" ? 1 : 0))
        case UInt8(ascii: ","), UInt8(ascii: "("):
            let text = Self.text(line)
            guard !text.isEmpty else { throw RESPDecodingError.invalidInteger(text) }
            buffer.moveReaderIndex(to: afterLine)
            return .value(.simpleString(text))
        case UInt8(ascii: "$"), UInt8(ascii: "="), UInt8(ascii: "!"):
            guard let length = Self.parseLength(line, allowNull: type == UInt8(ascii: "$")) else {
                throw RESPDecodingError.invalidLength(Self.text(line))
            }
            guard length >= 0 else {
                buffer.moveReaderIndex(to: afterLine)
                return .value(.bulkString(nil))
            }
            guard length <= Int64(self.limits.maxBulkLength) else {
                throw RESPDecodingError.bulkTooLong(length: length, limit: self.limits.maxBulkLength)
            }
            let count = Int(length)
            // Wait for the whole payload and its CRLF before taking anything.
            guard buffer.writerIndex - afterLine >= count + 2 else { return nil }
            guard buffer.getInteger(at: afterLine + count, as: UInt8.self) == 13,
                buffer.getInteger(at: afterLine + count + 1, as: UInt8.self) == 10
            else { throw RESPDecodingError.invalidTerminator }
            guard let payload = buffer.getSlice(at: afterLine, length: count) else { return nil }
            buffer.moveReaderIndex(to: afterLine + count + 2)
            if type == UInt8(ascii: "!") { return .value(.error(String(buffer: payload))) }
            return .value(.bulkString(payload))
        case UInt8(ascii: "*"), UInt8(ascii: "~"), UInt8(ascii: ">"), UInt8(ascii: "%"):
            guard let declared = Self.parseLength(line, allowNull: type == UInt8(ascii: "*")) else {
                throw RESPDecodingError.invalidLength(Self.text(line))
            }
            guard declared >= 0 else {
                buffer.moveReaderIndex(to: afterLine)
                return .value(.array(nil))
            }
            // A map's entries are flattened: two elements each.
            let count = type == UInt8(ascii: "%") ? declared.multipliedReportingOverflow(by: 2) : (declared, false)
            guard !count.1, count.0 <= Int64(self.limits.maxArrayLength) else {
                throw RESPDecodingError.arrayTooLong(length: declared, limit: self.limits.maxArrayLength)
            }
            buffer.moveReaderIndex(to: afterLine)
            return .aggregate(count: Int(count.0))
        default:
            throw RESPDecodingError.unknownType(type)
        }
    }

    /// The line starting at `from` up to CRLF, and the index after the CRLF; nil when the CRLF has not arrived.
    /// Only `maxLineLength + 2` bytes are ever scanned.
    private func findLine(in buffer: ByteBuffer, from: Int) throws -> (ByteBuffer, Int)? {
        let available = buffer.writerIndex - from
        let scan = Swift.min(available, self.limits.maxLineLength + 1)
        guard scan > 0, let view = buffer.viewBytes(at: from, length: scan) else { return nil }
        guard let cr = view.firstIndex(of: 13) else {
            if available > self.limits.maxLineLength { throw RESPDecodingError.lineTooLong(limit: self.limits.maxLineLength) }
            return nil
        }
        let lineLength = cr - view.startIndex
        guard lineLength <= self.limits.maxLineLength else {
            throw RESPDecodingError.lineTooLong(limit: self.limits.maxLineLength)
        }
        guard let lf = buffer.getInteger(at: from + lineLength + 1, as: UInt8.self) else { return nil }
        guard lf == 10 else { throw RESPDecodingError.invalidTerminator }
        guard let line = buffer.getSlice(at: from, length: lineLength) else { return nil }
        return (line, from + lineLength + 2)
    }

    private static func text(_ line: ByteBuffer) -> String {
        String(decoding: line.readableBytesView, as: UTF8.self)
    }

    /// A signed decimal Int64 (optional leading `-` or `+`), with overflow checks.
    static func parseInteger(_ line: ByteBuffer) -> Int64? {
        let bytes = line.readableBytesView
        guard let first = bytes.first else { return nil }
        var negative = false
        var digits = bytes[...]
        if first == UInt8(ascii: "-") || first == UInt8(ascii: "+") {
            negative = first == UInt8(ascii: "-")
            digits = bytes.dropFirst()
        }
        guard !digits.isEmpty, digits.count <= 19 else { return nil }
        var value: Int64 = 0
        for byte in digits {
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
            let digit = Int64(byte - UInt8(ascii: "0"))
            let (times10, o1) = value.multipliedReportingOverflow(by: 10)
            let (next, o2) = negative ? times10.subtractingReportingOverflow(digit) : times10.addingReportingOverflow(digit)
            guard !o1, !o2 else { return nil }
            value = next
        }
        return value
    }

    /// A length: digits only (no sign), or exactly `-1` (null) when allowed. Returns -1 for null.
    static func parseLength(_ line: ByteBuffer, allowNull: Bool) -> Int64? {
        let bytes = line.readableBytesView
        if allowNull, bytes.elementsEqual([UInt8(ascii: "-"), UInt8(ascii: "1")]) { return -1 }
        guard let first = bytes.first, first != UInt8(ascii: "-"), first != UInt8(ascii: "+") else { return nil }
        return Self.parseInteger(line)
    }
}

/// `RESPParser` as a NIO decoder: put `ByteToMessageHandler(RESPDecoder())` in front of a handler of `RESPValue`s.
public struct RESPDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = RESPValue

    private var parser: RESPParser

    public init(limits: RESPLimits = .default) {
        self.parser = RESPParser(limits: limits)
    }

    public mutating func decode(buffer: inout ByteBuffer) throws -> RESPValue? {
        try self.parser.next(&buffer)
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> RESPValue? {
        try self.parser.next(&buffer)
    }
}
