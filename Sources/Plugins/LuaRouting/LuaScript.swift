import CLuaShim

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The budgets of one Lua state.
public struct LuaLimits: Sendable, Equatable {
    /// VM instructions one call (`route`, `on_response`, the main chunk) may execute; 0 = unlimited. Counted in
    /// steps of up to 1000 instructions, and every coroutine created costs one step.
    public var instructionLimit: Int
    /// Bytes the whole state may hold (everything the script keeps plus the libraries, ≈ 30 KiB); 0 = unlimited.
    public var memoryLimit: Int

    public init(instructionLimit: Int = 1_000_000, memoryLimit: Int = 8 << 20) {
        self.instructionLimit = instructionLimit
        self.memoryLimit = memoryLimit
    }
}

/// Why a script could not be loaded, or a call into it failed.
public enum LuaScriptError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The file could not be read: `path: reason`.
    case unreadable(String)
    /// The script does not compile: `file:line: message`.
    case syntax(String)
    /// The script raised an error: `file:line: message` when the error is a string raised by Lua code.
    case runtime(String)
    /// The call ran out of its instruction budget.
    case instructionLimit
    /// The state ran out of its memory budget (a full collection ran afterwards; the state stays usable).
    case memoryLimit
    /// The script returned something that is not a valid decision.
    case badDecision(String)
    /// A function the host needs is not defined: `file: no global function 'route'`.
    case missingFunction(String)

    public var description: String {
        switch self {
        case .unreadable(let message), .syntax(let message), .runtime(let message), .missingFunction(let message):
            return message
        case .instructionLimit:
            return "instruction limit exceeded"
        case .memoryLimit:
            return "memory limit exceeded"
        case .badDecision(let reason):
            return "bad decision: \(reason)"
        }
    }
}

/// One sandboxed Lua 5.4 state running one script file.
///
/// Not thread-safe and not `Sendable`: create it on the thread (event loop) that uses it.
///
/// The sandbox offers base (without `dofile`, `loadfile`; `load` only compiles text; `setmetatable` refuses
/// `__gc`; `collectgarbage` only "collect", "count", "step"), `string` (without `dump`), `table`, `math`, `utf8`,
/// `coroutine` and `os.time`/`os.clock`. There is no `io`, `package`, `require` or `debug`.
public final class LuaScript {
    /// The file the script came from, as given.
    public let path: String
    public let limits: LuaLimits

    let L: OpaquePointer
    private let control: UnsafeMutablePointer<clua_Control>
    private var chunkRef: Int32

    /// Reads and compiles `path` (it does not run it yet: see `run()`).
    public init(path: String, limits: LuaLimits = LuaLimits()) throws {
        let source = try Self.readFile(path)
        self.path = path
        self.limits = limits
        self.control = .allocate(capacity: 1)
        self.control.initialize(to: clua_Control())
        self.control.pointee.memory_limit = limits.memoryLimit > 0 ? limits.memoryLimit : 0
        self.control.pointee.instruction_limit = Int64(max(0, limits.instructionLimit))
        self.control.pointee.granularity = 1000
        guard let state = clua_newstate(self.control) else {
            self.control.deallocate()
            throw LuaScriptError.unreadable("\(path): cannot create a Lua state")
        }
        self.L = state
        self.chunkRef = LUA_NOREF
        // From here on `deinit` runs if we throw: it closes the state (never close it here too).
        clua_opensandbox(state)
        let status = source.withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: CChar.self) { chars in
                clua_loadtext(state, chars.baseAddress, chars.count, "@" + path)
            }
        }
        guard status == LUA_OK else {
            throw LuaScriptError.syntax(self.fullPath(in: self.popErrorMessage()))
        }
        self.chunkRef = luaL_ref(state, clua_registryindex())
    }

    deinit {
        lua_close(self.L)
        self.control.deinitialize(count: 1)
        self.control.deallocate()
    }

    /// Runs the script's main chunk (defining its functions). Call it once, after adding host globals.
    public func run() throws {
        let top = lua_gettop(self.L)
        defer { lua_settop(self.L, top) }
        lua_rawgeti(self.L, clua_registryindex(), lua_Integer(self.chunkRef))
        try self.call(arguments: 0, results: 0)
    }

    /// Compiles and runs `source` in the sandbox (same globals and budgets as the script) and returns its first
    /// result converted like `tostring` (nil when it returns nothing or nil). For tools and tests.
    public func eval(_ source: String, name: String = "=eval") throws -> String? {
        let top = lua_gettop(self.L)
        defer { lua_settop(self.L, top) }
        try self.load(source, name: name)
        try self.call(arguments: 0, results: 1)
        return self.describe(at: -1)
    }

    /// Bytes the state currently holds.
    public var memoryInUse: Int {
        self.control.pointee.memory_used
    }

    // MARK: - For the host (same module)

    /// Compiles `source` (text only) and pushes the function.
    func load(_ source: String, name: String) throws {
        var source = source
        let status = source.withUTF8 { bytes in
            bytes.withMemoryRebound(to: CChar.self) { chars in
                clua_loadtext(self.L, chars.baseAddress, chars.count, name)
            }
        }
        guard status == LUA_OK else {
            throw LuaScriptError.syntax(self.popErrorMessage())
        }
    }

    /// Calls the function below `arguments` values on the stack, in protected mode with the budgets in force.
    /// On success the `results` values replace the function and its arguments; on failure they are gone.
    @inline(__always)
    func call(arguments: Int32, results: Int32) throws(LuaScriptError) {
        clua_begin_call(self.L, self.control)
        let status = lua_pcallk(self.L, arguments, results, 0, 0, nil)
        clua_end_call(self.control)
        if status != LUA_OK {
            throw self.failure(status: status)
        }
    }

    /// A registry reference to the global function `name`, nil when there is no such function.
    func globalFunctionRef(_ name: String) -> Int32? {
        lua_getglobal(self.L, name)
        guard lua_type(self.L, -1) == LUA_TFUNCTION else {
            clua_pop(self.L, 1)
            return nil
        }
        return luaL_ref(self.L, clua_registryindex())
    }

    private func failure(status: Int32) -> LuaScriptError {
        let error: LuaScriptError
        if self.control.pointee.instruction_hit != 0 {
            clua_pop(self.L, 1)
            error = .instructionLimit
        } else if status == LUA_ERRMEM || self.control.pointee.memory_hit != 0 {
            clua_pop(self.L, 1)
            error = .memoryLimit
        } else {
            error = .runtime(self.fullPath(in: self.popErrorMessage()))
        }
        if error == .memoryLimit {
            clua_gc_collect(self.L)
        }
        return error
    }

    /// Lua shortens chunk names to 60 bytes in positions (`...tail/of/the/path.lua:3:`): put the full path back.
    private func fullPath(in message: String) -> String {
        guard message.hasPrefix("..."), let colon = message.firstIndex(of: ":") else { return message }
        let tail = message[message.index(message.startIndex, offsetBy: 3)..<colon]
        guard !tail.isEmpty, self.path.hasSuffix(tail) else { return message }
        return self.path + message[colon...]
    }

    /// Pops the error value, as a message.
    private func popErrorMessage() -> String {
        defer { clua_pop(self.L, 1) }
        if lua_type(self.L, -1) == LUA_TSTRING {
            return self.string(at: -1) ?? ""
        }
        return "(error object is a \(String(cString: lua_typename(self.L, lua_type(self.L, -1)))) value)"
    }

    /// The string at `index` (no number conversion), nil when it is not a string.
    @inline(__always)
    func string(at index: Int32) -> String? {
        guard lua_type(self.L, index) == LUA_TSTRING else { return nil }
        var length = 0
        guard let pointer = lua_tolstring(self.L, index, &length) else { return nil }
        return pointer.withMemoryRebound(to: UInt8.self, capacity: length) {
            String(decoding: UnsafeBufferPointer(start: $0, count: length), as: UTF8.self)
        }
    }

    /// A plain description of the value at `index` (strings, numbers, booleans; a type name otherwise), without
    /// calling metamethods.
    func describe(at index: Int32) -> String? {
        switch lua_type(self.L, index) {
        case LUA_TNIL, LUA_TNONE:
            return nil
        case LUA_TSTRING:
            return self.string(at: index)
        case LUA_TNUMBER:
            if lua_isinteger(self.L, index) != 0 {
                return String(lua_tointegerx(self.L, index, nil))
            }
            return String(lua_tonumberx(self.L, index, nil))
        case LUA_TBOOLEAN:
            return lua_toboolean(self.L, index) != 0 ? "true" : "false"
        default:
            return String(cString: lua_typename(self.L, lua_type(self.L, index)))
        }
    }

    private static func readFile(_ path: String) throws -> [UInt8] {
        guard let file = fopen(path, "rb") else {
            throw LuaScriptError.unreadable("\(path): \(String(cString: strerror(errno)))")
        }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, file) }
            if n > 0 { bytes.append(contentsOf: chunk[0..<n]) }
            if n < chunk.count {
                if ferror(file) != 0 {
                    throw LuaScriptError.unreadable("\(path): read error")
                }
                break
            }
        }
        return bytes
    }
}
