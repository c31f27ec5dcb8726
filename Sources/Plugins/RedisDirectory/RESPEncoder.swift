import NIOCore

/// Something that can be one argument of a Redis command (sent as a bulk string).
public protocol RESPArgument: Sendable {
    func writeBulk(into buffer: inout ByteBuffer)
}

extension RESPArgument {
    @inlinable
    static func writeHeader(_ length: Int, into buffer: inout ByteBuffer) {
        buffer.writeInteger(UInt8(ascii: "$"))
        buffer.writeString(String(length))
        buffer.writeStaticString("\r\n")
    }
}

extension String: RESPArgument {
    public func writeBulk(into buffer: inout ByteBuffer) {
        Self.writeHeader(self.utf8.count, into: &buffer)
        buffer.writeString(self)
        buffer.writeStaticString("\r\n")
    }
}

extension Substring: RESPArgument {
    public func writeBulk(into buffer: inout ByteBuffer) {
        String(self).writeBulk(into: &buffer)
    }
}

extension ByteBuffer: RESPArgument {
    public func writeBulk(into buffer: inout ByteBuffer) {
        Self.writeHeader(self.readableBytes, into: &buffer)
        buffer.writeImmutableBuffer(self)
        buffer.writeStaticString("\r\n")
    }
}

extension Array: RESPArgument where Element == UInt8 {
    public func writeBulk(into buffer: inout ByteBuffer) {
        Self.writeHeader(self.count, into: &buffer)
        buffer.writeBytes(self)
        buffer.writeStaticString("\r\n")
    }
}

extension Int: RESPArgument {
    public func writeBulk(into buffer: inout ByteBuffer) { String(self).writeBulk(into: &buffer) }
}

extension Int64: RESPArgument {
    public func writeBulk(into buffer: inout ByteBuffer) { String(self).writeBulk(into: &buffer) }
}

/// Encodes commands (arrays of bulk strings, the only form a server accepts) and, for tests and tools, any value.
public enum RESPEncoder {
    public static func encode(command: [any RESPArgument], into buffer: inout ByteBuffer) {
        buffer.writeInteger(UInt8(ascii: "*"))
        buffer.writeString(String(command.count))
        buffer.writeStaticString("\r\n")
        for argument in command {
            argument.writeBulk(into: &buffer)
        }
    }

    public static func encode(_ value: RESPValue, into buffer: inout ByteBuffer) {
        switch value {
        case .simpleString(let text):
            buffer.writeInteger(UInt8(ascii: "+"))
            buffer.writeString(text)
            buffer.writeStaticString("\r\n")
        case .error(let text):
            buffer.writeInteger(UInt8(ascii: "-"))
            buffer.writeString(text)
            buffer.writeStaticString("\r\n")
        case .integer(let number):
            buffer.writeInteger(UInt8(ascii: ":"))
            buffer.writeString(String(number))
            buffer.writeStaticString("\r\n")
        case .bulkString(nil):
            buffer.writeStaticString("$-1\r\n")
        case .bulkString(let payload?):
            payload.writeBulk(into: &buffer)
        case .array(nil):
            buffer.writeStaticString("*-1\r\n")
        case .array(let elements?):
            buffer.writeInteger(UInt8(ascii: "*"))
            buffer.writeString(String(elements.count))
            buffer.writeStaticString("\r\n")
            for element in elements {
                Self.encode(element, into: &buffer)
            }
        }
    }
}
