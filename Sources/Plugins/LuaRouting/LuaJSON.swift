import CLuaShim

/// A small JSON (RFC 8259) reader and writer working directly on the Lua stack.
///
/// Decoding: objects and arrays become tables, `null` becomes the `proxy.json.null` sentinel, integers that fit
/// 64 bits become Lua integers, other numbers floats. Encoding: a table whose keys are exactly `1...n` (n ≥ 1) is an
/// array, any other table an object with its keys sorted (string keys, and integer keys written as strings); an
/// empty table is `{}`; nil and `proxy.json.null` are `null`. Functions, userdata, threads, NaN and infinities
/// cannot be encoded. Nesting is limited to 100 levels both ways (so cycles fail instead of looping).
enum LuaJSON {
    static let maxDepth = 100

    // MARK: Decode

    /// Decodes `bytes` and pushes the value; on failure pushes nothing and returns the message.
    static func decode(_ L: OpaquePointer, _ bytes: UnsafeBufferPointer<UInt8>, nullRef: Int32) -> String? {
        var reader = Reader(L: L, bytes: bytes, position: 0, nullRef: nullRef)
        let top = lua_gettop(L)
        do throws(DecodeError) {
            reader.skipWhitespace()
            try reader.value(depth: 0)
            reader.skipWhitespace()
            if reader.position != bytes.count {
                throw reader.error("unexpected data after the value")
            }
            return nil
        } catch {
            lua_settop(L, top)
            return error.message
        }
    }

    struct DecodeError: Error {
        var message: String
    }

    private struct Reader {
        let L: OpaquePointer
        let bytes: UnsafeBufferPointer<UInt8>
        var position: Int
        let nullRef: Int32

        func error(_ what: String) -> DecodeError {
            DecodeError(message: "\(what) at byte \(self.position + 1)")
        }

        var current: UInt8? {
            self.position < self.bytes.count ? self.bytes[self.position] : nil
        }

        mutating func skipWhitespace() {
            while let byte = self.current, byte == 0x20 || byte == 0x0a || byte == 0x0d || byte == 0x09 {
                self.position += 1
            }
        }

        mutating func expect(_ literal: StaticString) throws(DecodeError) {
            let count = literal.utf8CodeUnitCount
            guard self.position + count <= self.bytes.count else { throw self.error("truncated literal") }
            for i in 0..<count where self.bytes[self.position + i] != literal.utf8Start[i] {
                throw self.error("invalid literal")
            }
            self.position += count
        }

        mutating func value(depth: Int) throws(DecodeError) {
            guard depth < LuaJSON.maxDepth else { throw self.error("nesting deeper than \(LuaJSON.maxDepth)") }
            guard lua_checkstack(self.L, 4) != 0 else { throw self.error("too deeply nested") }
            guard let byte = self.current else { throw self.error("unexpected end of input") }
            switch byte {
            case UInt8(ascii: "{"):
                self.position += 1
                lua_createtable(self.L, 0, 0)
                self.skipWhitespace()
                if self.current == UInt8(ascii: "}") {
                    self.position += 1
                    return
                }
                while true {
                    self.skipWhitespace()
                    guard self.current == UInt8(ascii: "\"") else { throw self.error("expected a string key") }
                    try self.string()
                    self.skipWhitespace()
                    guard self.current == UInt8(ascii: ":") else { throw self.error("expected ':'") }
                    self.position += 1
                    self.skipWhitespace()
                    try self.value(depth: depth + 1)
                    lua_rawset(self.L, -3)
                    self.skipWhitespace()
                    if self.current == UInt8(ascii: ",") {
                        self.position += 1
                    } else if self.current == UInt8(ascii: "}") {
                        self.position += 1
                        return
                    } else {
                        throw self.error("expected ',' or '}'")
                    }
                }
            case UInt8(ascii: "["):
                self.position += 1
                lua_createtable(self.L, 0, 0)
                self.skipWhitespace()
                if self.current == UInt8(ascii: "]") {
                    self.position += 1
                    return
                }
                var index: lua_Integer = 1
                while true {
                    self.skipWhitespace()
                    try self.value(depth: depth + 1)
                    lua_rawseti(self.L, -2, index)
                    index += 1
                    self.skipWhitespace()
                    if self.current == UInt8(ascii: ",") {
                        self.position += 1
                    } else if self.current == UInt8(ascii: "]") {
                        self.position += 1
                        return
                    } else {
                        throw self.error("expected ',' or ']'")
                    }
                }
            case UInt8(ascii: "\""):
                try self.string()
            case UInt8(ascii: "t"):
                try self.expect("true")
                lua_pushboolean(self.L, 1)
            case UInt8(ascii: "f"):
                try self.expect("false")
                lua_pushboolean(self.L, 0)
            case UInt8(ascii: "n"):
                try self.expect("null")
                lua_rawgeti(self.L, clua_registryindex(), lua_Integer(self.nullRef))
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
                try self.number()
            default:
                throw self.error("unexpected character '\(Unicode.Scalar(byte))'")
            }
        }

        mutating func number() throws(DecodeError) {
            let start = self.position
            var integral = true
            if self.current == UInt8(ascii: "-") { self.position += 1 }
            func digits(_ reader: inout Reader) -> Int {
                var n = 0
                while let byte = reader.current, byte >= 0x30, byte <= 0x39 {
                    reader.position += 1
                    n += 1
                }
                return n
            }
            let first = self.current
            guard digits(&self) > 0 else { throw self.error("invalid number") }
            if first == UInt8(ascii: "0"), self.position - start > (self.bytes[start] == UInt8(ascii: "-") ? 2 : 1) {
                throw self.error("leading zero in number")
            }
            if self.current == UInt8(ascii: ".") {
                integral = false
                self.position += 1
                guard digits(&self) > 0 else { throw self.error("invalid number") }
            }
            if self.current == UInt8(ascii: "e") || self.current == UInt8(ascii: "E") {
                integral = false
                self.position += 1
                if self.current == UInt8(ascii: "+") || self.current == UInt8(ascii: "-") { self.position += 1 }
                guard digits(&self) > 0 else { throw self.error("invalid number") }
            }
            let text = String(decoding: UnsafeBufferPointer(rebasing: self.bytes[start..<self.position]), as: UTF8.self)
            if integral, let value = Int64(text) {
                lua_pushinteger(self.L, lua_Integer(value))
            } else if let value = Double(text) {
                lua_pushnumber(self.L, value)
            } else {
                throw self.error("invalid number")
            }
        }

        mutating func hex4() throws(DecodeError) -> UInt32 {
            guard self.position + 4 <= self.bytes.count else { throw self.error("truncated \\u escape") }
            var value: UInt32 = 0
            for _ in 0..<4 {
                let byte = self.bytes[self.position]
                let digit: UInt32
                switch byte {
                case 0x30...0x39: digit = UInt32(byte - 0x30)
                case 0x41...0x46: digit = UInt32(byte - 0x41 + 10)
                case 0x61...0x66: digit = UInt32(byte - 0x61 + 10)
                default: throw self.error("invalid \\u escape")
                }
                value = value << 4 | digit
                self.position += 1
            }
            return value
        }

        /// Reads a string (the opening quote is current) and pushes it.
        mutating func string() throws(DecodeError) {
            self.position += 1
            let start = self.position
            // Fast path: no escapes.
            while let byte = self.current, byte != UInt8(ascii: "\""), byte != UInt8(ascii: "\\") {
                guard byte >= 0x20 else { throw self.error("control character in string") }
                self.position += 1
            }
            guard let stop = self.current else { throw self.error("unterminated string") }
            if stop == UInt8(ascii: "\"") {
                self.pushBytes(start..<self.position)
                self.position += 1
                return
            }
            var out = Array(self.bytes[start..<self.position])
            while true {
                guard let byte = self.current else { throw self.error("unterminated string") }
                self.position += 1
                switch byte {
                case UInt8(ascii: "\""):
                    out.withUnsafeBufferPointer { buffer in
                        buffer.withMemoryRebound(to: CChar.self) { _ = lua_pushlstring(self.L, $0.baseAddress, $0.count) }
                    }
                    return
                case UInt8(ascii: "\\"):
                    guard let escape = self.current else { throw self.error("unterminated string") }
                    self.position += 1
                    switch escape {
                    case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(escape)
                    case UInt8(ascii: "b"): out.append(0x08)
                    case UInt8(ascii: "f"): out.append(0x0c)
                    case UInt8(ascii: "n"): out.append(0x0a)
                    case UInt8(ascii: "r"): out.append(0x0d)
                    case UInt8(ascii: "t"): out.append(0x09)
                    case UInt8(ascii: "u"):
                        var scalar = try self.hex4()
                        if scalar >= 0xd800, scalar < 0xdc00,
                            self.position + 6 <= self.bytes.count,
                            self.bytes[self.position] == UInt8(ascii: "\\"),
                            self.bytes[self.position + 1] == UInt8(ascii: "u")
                        {
                            let save = self.position
                            self.position += 2
                            let low = try self.hex4()
                            if low >= 0xdc00, low < 0xe000 {
                                scalar = 0x10000 + ((scalar - 0xd800) << 10) + (low - 0xdc00)
                            } else {
                                self.position = save
                            }
                        }
                        let character = Unicode.Scalar(scalar) ?? "\u{FFFD}"
                        out.append(contentsOf: UTF8.encode(character)!)
                    default:
                        throw self.error("invalid escape")
                    }
                default:
                    guard byte >= 0x20 else { throw self.error("control character in string") }
                    out.append(byte)
                }
            }
        }

        func pushBytes(_ range: Range<Int>) {
            let slice = UnsafeBufferPointer(rebasing: self.bytes[range])
            slice.withMemoryRebound(to: CChar.self) { _ = lua_pushlstring(self.L, $0.baseAddress, $0.count) }
        }
    }

    // MARK: Encode

    /// Encodes the value at `index`; the text, or the reason it cannot be encoded.
    static func encode(_ L: OpaquePointer, at index: Int32, nullRef: Int32) -> Result<[UInt8], DecodeError> {
        var out: [UInt8] = []
        do throws(DecodeError) {
            try self.write(L, lua_absindex(L, index), into: &out, depth: 0, nullRef: nullRef)
            return .success(out)
        } catch {
            return .failure(error)
        }
    }

    private static func write(
        _ L: OpaquePointer,
        _ index: Int32,
        into out: inout [UInt8],
        depth: Int,
        nullRef: Int32
    ) throws(DecodeError) {
        switch lua_type(L, index) {
        case LUA_TNIL, LUA_TNONE:
            out.append(contentsOf: "null".utf8)
        case LUA_TBOOLEAN:
            out.append(contentsOf: (lua_toboolean(L, index) != 0 ? "true" : "false").utf8)
        case LUA_TNUMBER:
            if lua_isinteger(L, index) != 0 {
                out.append(contentsOf: String(lua_tointegerx(L, index, nil)).utf8)
            } else {
                let value = lua_tonumberx(L, index, nil)
                guard value.isFinite else { throw DecodeError(message: "cannot encode \(value)") }
                out.append(contentsOf: value.description.utf8)
            }
        case LUA_TSTRING:
            self.writeString(L, index, into: &out)
        case LUA_TTABLE:
            lua_rawgeti(L, clua_registryindex(), lua_Integer(nullRef))
            let isNull = lua_rawequal(L, -1, index) != 0
            clua_pop(L, 1)
            if isNull {
                out.append(contentsOf: "null".utf8)
                return
            }
            guard depth < self.maxDepth else {
                throw DecodeError(message: "nesting deeper than \(self.maxDepth) (a cycle?)")
            }
            guard lua_checkstack(L, 4) != 0 else { throw DecodeError(message: "too deeply nested") }
            try self.writeTable(L, index, into: &out, depth: depth, nullRef: nullRef)
        default:
            let name = String(cString: lua_typename(L, lua_type(L, index)))
            throw DecodeError(message: "cannot encode a \(name)")
        }
    }

    private static func writeTable(
        _ L: OpaquePointer,
        _ index: Int32,
        into out: inout [UInt8],
        depth: Int,
        nullRef: Int32
    ) throws(DecodeError) {
        let length = lua_rawlen(L, index)
        var keys: [(text: [UInt8], isString: Bool)] = []
        var count = 0
        lua_pushnil(L)
        while lua_next(L, index) != 0 {
            count += 1
            switch lua_type(L, -2) {
            case LUA_TSTRING:
                var size = 0
                let pointer = lua_tolstring(L, -2, &size)!
                keys.append((Array(UnsafeRawBufferPointer(start: pointer, count: size)), true))
            case LUA_TNUMBER where lua_isinteger(L, -2) != 0:
                keys.append((Array(String(lua_tointegerx(L, -2, nil)).utf8), false))
            default:
                let name = String(cString: lua_typename(L, lua_type(L, -2)))
                clua_pop(L, 2)
                throw DecodeError(message: "cannot encode a table key of type \(name)")
            }
            clua_pop(L, 1)
        }
        if length > 0, count == length {
            out.append(UInt8(ascii: "["))
            for i in 1...length {
                if i > 1 { out.append(UInt8(ascii: ",")) }
                lua_rawgeti(L, index, lua_Integer(i))
                defer { clua_pop(L, 1) }
                try self.write(L, lua_gettop(L), into: &out, depth: depth + 1, nullRef: nullRef)
            }
            out.append(UInt8(ascii: "]"))
            return
        }
        keys.sort { $0.text.lexicographicallyPrecedes($1.text) }
        out.append(UInt8(ascii: "{"))
        for (i, key) in keys.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            key.text.withUnsafeBufferPointer { buffer in
                buffer.withMemoryRebound(to: CChar.self) { _ = lua_pushlstring(L, $0.baseAddress, $0.count) }
            }
            self.writeString(L, -1, into: &out)
            out.append(UInt8(ascii: ":"))
            if key.isString {
                lua_rawget(L, index)
            } else {
                clua_pop(L, 1)
                lua_rawgeti(L, index, lua_Integer(String(decoding: key.text, as: UTF8.self))!)
            }
            defer { clua_pop(L, 1) }
            try self.write(L, lua_gettop(L), into: &out, depth: depth + 1, nullRef: nullRef)
        }
        out.append(UInt8(ascii: "}"))
    }

    private static func writeString(_ L: OpaquePointer, _ index: Int32, into out: inout [UInt8]) {
        var size = 0
        let pointer = lua_tolstring(L, index, &size)!
        let bytes = UnsafeRawBufferPointer(start: pointer, count: size)
        out.append(UInt8(ascii: "\""))
        for byte in bytes {
            switch byte {
            case UInt8(ascii: "\""): out.append(contentsOf: "\\\"".utf8)
            case UInt8(ascii: "\\"): out.append(contentsOf: "\\\\".utf8)
            case 0x0a: out.append(contentsOf: "\\n".utf8)
            case 0x0d: out.append(contentsOf: "\\r".utf8)
            case 0x09: out.append(contentsOf: "\\t".utf8)
            case 0..<0x20, 0x7f:
                let hex: [UInt8] = Array("0123456789abcdef".utf8)
                out.append(contentsOf: "\\u00".utf8)
                out.append(hex[Int(byte >> 4)])
                out.append(hex[Int(byte & 0xf)])
            default: out.append(byte)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}
