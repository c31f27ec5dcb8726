import NIOCore
import NIOEmbedded
import Testing

@testable import RedisDirectory

/// Decodes every complete value in `bytes` (fed in one piece), stopping at the first error.
private func decodeAll(_ bytes: [UInt8], limits: RESPLimits = .default) throws -> [RESPValue] {
    var parser = RESPParser(limits: limits)
    var buffer = ByteBuffer(bytes: bytes)
    var values: [RESPValue] = []
    while let value = try parser.next(&buffer) { values.append(value) }
    return values
}

private func decode(_ text: String, limits: RESPLimits = .default) throws -> RESPValue? {
    try decodeAll(Array(text.utf8), limits: limits).first
}

private func encoded(_ value: RESPValue) -> [UInt8] {
    var buffer = ByteBuffer()
    RESPEncoder.encode(value, into: &buffer)
    return Array(buffer.readableBytesView)
}

/// A deterministic generator (SplitMix64), so failures reproduce.
struct SeededRandom: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        self.state &+= 0x9E37_79B9_7F4A_7C15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

private func randomValue(_ rng: inout SeededRandom, depth: Int = 0) -> RESPValue {
    let kind = Int.random(in: 0..<(depth < 3 ? 7 : 5), using: &rng)
    let safe = Array("abcdefghijklmnopqrstuvwxyz0123456789 _-:!".utf8)
    switch kind {
    case 0: return .simpleString(String(decoding: (0..<Int.random(in: 0..<20, using: &rng)).map { _ in safe.randomElement(using: &rng)! }, as: UTF8.self))
    case 1: return .error("ERR " + String(Int.random(in: 0..<1000, using: &rng)))
    case 2: return .integer(Int64.random(in: Int64.min...Int64.max, using: &rng))
    case 3:
        // Any bytes, including CR, LF and NUL: bulk strings are binary-safe.
        let bytes = (0..<Int.random(in: 0..<64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        return .bulkString(ByteBuffer(bytes: bytes))
    case 4: return .bulkString(nil)
    case 5: return .array(nil)
    default:
        return .array((0..<Int.random(in: 0..<6, using: &rng)).map { _ in randomValue(&rng, depth: depth + 1) })
    }
}

/// Runs the parser over `bytes` (in chunks of `chunk` bytes) and checks that it terminates with bounded work and
/// builds nothing bigger than its input. Returns without throwing on a decode error (that is an allowed outcome).
private func fuzzOne(_ bytes: [UInt8], chunk: Int, limits: RESPLimits) {
    let clock = ContinuousClock()
    let start = clock.now
    var parser = RESPParser(limits: limits)
    var buffer = ByteBuffer()
    var offset = 0
    var steps = 0
    var produced = 0
    feeding: while offset < bytes.count {
        let end = min(bytes.count, offset + chunk)
        buffer.writeBytes(bytes[offset..<end])
        offset = end
        while true {
            steps += 1
            // Every successful `next` consumes at least one byte, so there are at most as many values as bytes.
            #expect(steps <= bytes.count * 2 + 2, "no progress")
            if steps > bytes.count * 2 + 2 { break feeding }
            let before = buffer.readableBytes
            do {
                guard let value = try parser.next(&buffer) else { break }
                #expect(buffer.readableBytes < before, "a value was produced without consuming bytes")
                produced += size(of: value)
            } catch {
                break feeding
            }
        }
    }
    #expect(produced <= bytes.count, "decoded more than the input holds")
    #expect(clock.now - start < .seconds(1), "took too long on \(bytes.count) bytes")
}

/// Elements and payload bytes: each costs at least one input byte.
private func size(of value: RESPValue) -> Int {
    switch value {
    case .array(let elements?): return 1 + elements.reduce(0) { $0 + size(of: $1) }
    case .bulkString(let bytes?): return 1 + bytes.readableBytes
    default: return 1
    }
}

@Suite("RESPDecoder")
struct RESPDecoderTests {
    @Test func decodesEachRESP2Type() throws {
        #expect(try decode("+OK\r\n") == .simpleString("OK"))
        #expect(try decode("-ERR bad thing\r\n") == .error("ERR bad thing"))
        #expect(try decode(":-42\r\n") == .integer(-42))
        #expect(try decode(":9223372036854775807\r\n") == .integer(.max))
        #expect(try decode(":-9223372036854775808\r\n") == .integer(.min))
        #expect(try decode("$3\r\nfoo\r\n") == .bulkString(ByteBuffer(string: "foo")))
        #expect(try decode("$0\r\n\r\n") == .bulkString(ByteBuffer()))
        #expect(try decode("$-1\r\n") == .bulkString(nil))
        #expect(try decode("*-1\r\n") == .array(nil))
        #expect(try decode("*0\r\n") == .array([]))
        #expect(
            try decode("*3\r\n:1\r\n*1\r\n$1\r\na\r\n$-1\r\n")
                == .array([.integer(1), .array([.bulkString(ByteBuffer(string: "a"))]), .bulkString(nil)])
        )
        // Binary-safe: CRLF inside a bulk string.
        #expect(try decode("$4\r\n\r\n\r\n\r\n") == .bulkString(ByteBuffer(string: "\r\n\r\n")))
    }

    @Test func mapsRESP3TypesOrRejectsThem() throws {
        #expect(try decode("_\r\n") == .bulkString(nil))
        #expect(try decode("#t\r\n") == .integer(1))
        #expect(try decode("#f\r\n") == .integer(0))
        #expect(try decode(",3.14\r\n") == .simpleString("3.14"))
        #expect(try decode("(12345678901234567890\r\n") == .simpleString("12345678901234567890"))
        #expect(
            try decode("%2\r\n+a\r\n:1\r\n+b\r\n:2\r\n")
                == .array([.simpleString("a"), .integer(1), .simpleString("b"), .integer(2)])
        )
        #expect(try decode("~2\r\n:1\r\n:2\r\n") == .array([.integer(1), .integer(2)]))
        #expect(try decode("!5\r\nOOPS!\r\n") == .error("OOPS!"))
        #expect(throws: RESPDecodingError.invalidBoolean("x")) { try decode("#x\r\n") }
        #expect(throws: RESPDecodingError.unknownType(UInt8(ascii: "@"))) { try decode("@1\r\n") }
        #expect(throws: RESPDecodingError.invalidLength("-1")) { try decode("%-1\r\n") }
    }

    @Test func waitsForMoreBytesWithoutConsuming() throws {
        for partial in ["", "+", "+OK", "+OK\r", "$3\r\nfo", "$3\r\nfoo", "$3\r\nfoo\r", "*2\r\n:1\r\n", ":12"] {
            var parser = RESPParser()
            var buffer = ByteBuffer(string: partial)
            #expect(try parser.next(&buffer) == nil, "\(partial.debugDescription)")
        }
    }

    @Test func decodesByteByByteLikeAllAtOnce() throws {
        var rng = SeededRandom(state: 7)
        for _ in 0..<200 {
            let values = (0..<3).map { _ in randomValue(&rng) }
            let bytes = values.flatMap(encoded)
            var parser = RESPParser()
            var buffer = ByteBuffer()
            var decoded: [RESPValue] = []
            for byte in bytes {
                buffer.writeInteger(byte)
                while let value = try parser.next(&buffer) { decoded.append(value) }
            }
            #expect(decoded == values)
            #expect(buffer.readableBytes == 0)
            #expect(!parser.hasPartialValue)
        }
    }

    @Test func everyValidValueRoundTrips() throws {
        var rng = SeededRandom(state: 42)
        for _ in 0..<2_000 {
            let value = randomValue(&rng)
            #expect(try decodeAll(encoded(value)) == [value])
        }
    }

    @Test(arguments: [
        ("$abc\r\n", RESPDecodingError.invalidLength("abc")),
        ("$-2\r\n", .invalidLength("-2")),
        ("$+3\r\nfoo\r\n", .invalidLength("+3")),
        ("$\r\n", .invalidLength("")),
        ("*-5\r\n", .invalidLength("-5")),
        ("*1x\r\n", .invalidLength("1x")),
        ("$3\r\nfooXY", .invalidTerminator),
        ("$3\r\nfoo\rX", .invalidTerminator),
        ("+OK\rX", .invalidTerminator),
        (":\r\n", .invalidInteger("")),
        (":99999999999999999999\r\n", .invalidInteger("99999999999999999999")),
        (":9223372036854775808\r\n", .invalidInteger("9223372036854775808")),
        (":1.5\r\n", .invalidInteger("1.5")),
        ("$99999999999999999999\r\n", .invalidLength("99999999999999999999")),
        ("?\r\n", .unknownType(UInt8(ascii: "?"))),
    ])
    func rejectsInvalidInput(_ input: String, _ expected: RESPDecodingError) {
        #expect(throws: expected) { try decode(input) }
    }

    @Test func rejectsAHugeBulkLengthWithoutAllocating() throws {
        // 2^40: rejected from the header alone, before any payload arrives (nothing is reserved for it).
        let header = "$1099511627776\r\n"
        #expect(throws: RESPDecodingError.bulkTooLong(length: 1 << 40, limit: RESPLimits.default.maxBulkLength)) {
            try decode(header)
        }
        // Also when the limit is raised to Redis' own 512 MiB.
        let large = RESPLimits(maxBulkLength: 512 << 20)
        #expect(throws: RESPDecodingError.bulkTooLong(length: 1 << 40, limit: 512 << 20)) {
            try decode(header, limits: large)
        }
        // A bulk within the limit but not yet received reserves nothing either: the parser just waits.
        var parser = RESPParser(limits: large)
        var buffer = ByteBuffer(string: "$536870912\r\nabc")
        #expect(try parser.next(&buffer) == nil)
        #expect(buffer.capacity < 1 << 20)
    }

    @Test func enforcesArrayLengthDepthAndLineLimits() throws {
        let limits = RESPLimits(maxBulkLength: 10, maxArrayLength: 3, maxDepth: 2, maxLineLength: 8)
        #expect(throws: RESPDecodingError.arrayTooLong(length: 4, limit: 3)) { try decode("*4\r\n", limits: limits) }
        #expect(throws: RESPDecodingError.arrayTooLong(length: 2, limit: 3)) { try decode("%2\r\n", limits: limits) }
        #expect(throws: RESPDecodingError.arrayTooLong(length: 1 << 40, limit: RESPLimits.default.maxArrayLength)) {
            try decode("*1099511627776\r\n")
        }
        #expect(throws: RESPDecodingError.bulkTooLong(length: 11, limit: 10)) { try decode("$11\r\n", limits: limits) }
        #expect(throws: RESPDecodingError.nestingTooDeep(limit: 2)) { try decode("*1\r\n*1\r\n*1\r\n:1\r\n", limits: limits) }
        #expect(try decode("*1\r\n*1\r\n:1\r\n", limits: limits) == .array([.array([.integer(1)])]))
        // A line that never ends is rejected once it exceeds the limit, not buffered forever.
        #expect(throws: RESPDecodingError.lineTooLong(limit: 8)) { try decode("+0123456789", limits: limits) }
        #expect(throws: RESPDecodingError.lineTooLong(limit: 8)) { try decode("+0123456789\r\n", limits: limits) }
        #expect(try decode("+01234567\r\n", limits: limits) == .simpleString("01234567"))
        // Default depth: 10,000 nested arrays are refused at depth 32, without recursion.
        let deep = String(repeating: "*1\r\n", count: 10_000)
        #expect(throws: RESPDecodingError.nestingTooDeep(limit: 32)) { try decode(deep) }
    }

    @Test func tenThousandRandomByteStringsNeverCrashOrHang() {
        var rng = SeededRandom(state: 1)
        let limits = RESPLimits(maxBulkLength: 1 << 16, maxArrayLength: 1 << 10, maxDepth: 16, maxLineLength: 1 << 10)
        // Bias towards RESP's own bytes so the parser gets past the first byte often.
        let alphabet = Array("+-:$*_#,(%~>!=\r\n0123456789-1".utf8)
        for _ in 0..<10_000 {
            let count = Int.random(in: 0..<128, using: &rng)
            let biased = Bool.random(using: &rng)
            let bytes = (0..<count).map { _ in
                biased ? alphabet.randomElement(using: &rng)! : UInt8.random(in: 0...255, using: &rng)
            }
            fuzzOne(bytes, chunk: Int.random(in: 1...16, using: &rng), limits: limits)
        }
    }

    @Test func truncatedAndMutatedEncodingsNeverCrashOrHang() throws {
        var rng = SeededRandom(state: 99)
        let limits = RESPLimits(maxBulkLength: 1 << 16, maxArrayLength: 1 << 10, maxDepth: 16, maxLineLength: 1 << 10)
        for _ in 0..<3_000 {
            let value = randomValue(&rng)
            let bytes = encoded(value)
            // Every proper prefix is incomplete: nil, never an error or a wrong value.
            let cut = Int.random(in: 0..<bytes.count, using: &rng)
            var parser = RESPParser()
            var buffer = ByteBuffer(bytes: bytes[..<cut])
            #expect(try parser.next(&buffer) == nil)

            // Mutations: flip, insert or delete a few bytes.
            var mutated = bytes
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let position = Int.random(in: 0...mutated.count, using: &rng)
                switch Int.random(in: 0..<3, using: &rng) {
                case 0 where position < mutated.count: mutated[position] = UInt8.random(in: 0...255, using: &rng)
                case 1: mutated.insert(UInt8.random(in: 0...255, using: &rng), at: position)
                default: if position < mutated.count { mutated.remove(at: position) }
                }
            }
            fuzzOne(mutated, chunk: Int.random(in: 1...32, using: &rng), limits: limits)
        }
    }

    @Test func decoderWorksInAChannelPipeline() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(RESPDecoder()))
        try channel.writeInbound(ByteBuffer(string: "+OK\r\n:1"))
        #expect(try channel.readInbound(as: RESPValue.self) == .simpleString("OK"))
        #expect(try channel.readInbound(as: RESPValue.self) == nil)
        try channel.writeInbound(ByteBuffer(string: "\r\n"))
        #expect(try channel.readInbound(as: RESPValue.self) == .integer(1))
        #expect(throws: RESPDecodingError.self) { try channel.writeInbound(ByteBuffer(string: "?\r\n")) }
        _ = try? channel.finish()
    }
}

@Suite("RESPEncoder")
struct RESPEncoderTests {
    @Test func encodesCommandsAsArraysOfBulkStrings() {
        var buffer = ByteBuffer()
        RESPEncoder.encode(command: ["SET", "ké", ByteBuffer(string: "v"), 42, [UInt8](arrayLiteral: 0, 13)], into: &buffer)
        #expect(String(buffer: buffer) == "*5\r\n$3\r\nSET\r\n$3\r\nké\r\n$1\r\nv\r\n$2\r\n42\r\n$2\r\n\u{0}\r\r\n")
    }
}
