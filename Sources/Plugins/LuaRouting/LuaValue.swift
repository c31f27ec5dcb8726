import CLuaShim

/// A plain value tree handed to a script (as `proxy.options`): what a YAML or JSON document holds.
public enum LuaValue: Sendable, Equatable {
    /// Becomes `proxy.json.null` in Lua (a nil would vanish from tables).
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    /// A Lua sequence (1-based).
    case array([LuaValue])
    /// A Lua table with string keys.
    case table([String: LuaValue])
}

extension LuaValue: ExpressibleByNilLiteral, ExpressibleByBooleanLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByFloatLiteral, ExpressibleByStringLiteral, ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral
{
    public init(nilLiteral: ()) { self = .null }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(integerLiteral value: Int) { self = .int(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(stringLiteral value: String) { self = .string(value) }
    public init(arrayLiteral elements: LuaValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, LuaValue)...) {
        self = .table(Dictionary(elements, uniquingKeysWith: { _, last in last }))
    }
}

extension LuaValue {
    /// Pushes the value (tables fully built); `nullRef` is the registry reference of the null sentinel.
    func push(_ L: OpaquePointer, nullRef: Int32) {
        lua_checkstack(L, 4)
        switch self {
        case .null:
            lua_rawgeti(L, clua_registryindex(), lua_Integer(nullRef))
        case .bool(let value):
            lua_pushboolean(L, value ? 1 : 0)
        case .int(let value):
            lua_pushinteger(L, lua_Integer(value))
        case .double(let value):
            lua_pushnumber(L, value)
        case .string(let value):
            pushString(L, value)
        case .array(let elements):
            lua_createtable(L, Int32(clamping: elements.count), 0)
            for (i, element) in elements.enumerated() {
                element.push(L, nullRef: nullRef)
                lua_rawseti(L, -2, lua_Integer(i + 1))
            }
        case .table(let entries):
            lua_createtable(L, 0, Int32(clamping: entries.count))
            for (key, value) in entries {
                pushString(L, key)
                value.push(L, nullRef: nullRef)
                lua_rawset(L, -3)
            }
        }
    }
}

/// Pushes the UTF-8 bytes of `string` without copying them into a new buffer.
@inline(__always)
func pushString(_ L: OpaquePointer, _ string: String) {
    if let done: Void = string.utf8.withContiguousStorageIfAvailable({ bytes in
        bytes.withMemoryRebound(to: CChar.self) { chars in
            _ = lua_pushlstring(L, chars.baseAddress, chars.count)
        }
    }) {
        return done
    }
    var copy = string
    copy.withUTF8 { bytes in
        bytes.withMemoryRebound(to: CChar.self) { chars in
            _ = lua_pushlstring(L, chars.baseAddress, chars.count)
        }
    }
}

/// Pushes `string` lower-cased (ASCII), for header names.
@inline(__always)
func pushLowercased(_ L: OpaquePointer, _ string: String) {
    var copy = string
    copy.withUTF8 { bytes in
        if !bytes.contains(where: { $0 &- 65 < 26 }) {
            bytes.withMemoryRebound(to: CChar.self) { chars in
                _ = lua_pushlstring(L, chars.baseAddress, chars.count)
            }
            return
        }
        withUnsafeTemporaryAllocation(of: CChar.self, capacity: bytes.count) { lowered in
            for (i, byte) in bytes.enumerated() {
                lowered[i] = CChar(bitPattern: byte &- 65 < 26 ? byte | 0x20 : byte)
            }
            _ = lua_pushlstring(L, lowered.baseAddress, bytes.count)
        }
    }
}

/// `t[name] = top` (raw; pops the value) for the table at `index`, with `name` pushed from its static bytes: a
/// Swift `String` literal passed as `const char *` would be copied into a temporary C string on every call.
@inline(__always)
func setField(_ L: OpaquePointer, _ index: Int32, _ name: StaticString) {
    let table = lua_absindex(L, index)
    name.withUTF8Buffer { bytes in
        _ = lua_pushlstring(L, UnsafeRawPointer(bytes.baseAddress!).assumingMemoryBound(to: CChar.self), bytes.count)
    }
    clua_insert(L, -2)
    lua_rawset(L, table)
}
