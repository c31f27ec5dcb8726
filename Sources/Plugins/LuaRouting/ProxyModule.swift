import CLuaShim
import Logging
import ProxyCore

/// Rings built for `proxy.hash.ketama`/`maglev`, keyed by the (id, weight) list: building a ring costs far more
/// than a lookup, and scripts pass the same pool again and again.
struct RingCache {
    struct Key: Hashable {
        var ids: [String]
        var weights: [Int]
    }

    static let capacity = 16
    var ketama: [Key: Ketama] = [:]
    var maglev: [Key: Maglev] = [:]

    mutating func ketama(for backends: [(id: String, weight: Int)]) -> Ketama {
        let key = Key(ids: backends.map(\.id), weights: backends.map(\.weight))
        if let ring = self.ketama[key] { return ring }
        if self.ketama.count >= Self.capacity { self.ketama.removeAll(keepingCapacity: true) }
        let ring = Ketama(backends: backends)
        self.ketama[key] = ring
        return ring
    }

    mutating func maglev(for backends: [(id: String, weight: Int)]) -> Maglev {
        let key = Key(ids: backends.map(\.id), weights: backends.map(\.weight))
        if let table = self.maglev[key] { return table }
        if self.maglev.count >= Self.capacity { self.maglev.removeAll(keepingCapacity: true) }
        let table = Maglev(backends: backends)
        self.maglev[key] = table
        return table
    }
}

/// Raises `message` (the trampoline prepends the caller's position).
@inline(__always)
private func raise(_ L: OpaquePointer, _ message: String) -> Int32 {
    pushString(L, message)
    return -1
}

private func policy(_ context: UnsafeMutableRawPointer?) -> LuaRoutingPolicy {
    Unmanaged<LuaRoutingPolicy>.fromOpaque(context!).takeUnretainedValue()
}

extension LuaRoutingPolicy {
    /// Pushes the `proxy` table (without `options` and `json.null`, which setup adds).
    func pushProxyModule(_ L: OpaquePointer) {
        let context = Unmanaged.passUnretained(self).toOpaque()
        lua_createtable(L, 0, 8)
        let proxy = lua_gettop(L)

        func add(_ table: Int32, _ name: String, _ function: clua_SwiftFn) {
            clua_pushswiftfunction(L, function, context)
            lua_setfield(L, table, name)
        }

        add(proxy, "backends") { L, context in policy(context).luaBackends(L!) }
        add(proxy, "owner") { L, context in policy(context).luaOwner(L!) }
        add(proxy, "log") { L, context in policy(context).luaLog(L!) }
        clua_pushnowfunction(L)
        setField(L, proxy, "now")

        lua_createtable(L, 0, 4)
        let hash = lua_gettop(L)
        add(hash, "rendezvous") { L, context in policy(context).luaHash(L!, .rendezvous) }
        add(hash, "ketama") { L, context in policy(context).luaHash(L!, .ketama) }
        add(hash, "maglev") { L, context in policy(context).luaHash(L!, .maglev) }
        add(hash, "jump") { L, context in policy(context).luaJump(L!) }
        setField(L, proxy, "hash")

        lua_createtable(L, 0, 3)
        let json = lua_gettop(L)
        add(json, "decode") { L, context in policy(context).luaJSONDecode(L!) }
        add(json, "encode") { L, context in policy(context).luaJSONEncode(L!) }
        setField(L, proxy, "json")
    }

    // MARK: proxy.backends(pool), proxy.owner(key)

    fileprivate func luaBackends(_ L: OpaquePointer) -> Int32 {
        guard lua_type(L, 1) == LUA_TSTRING, let pool = self.script.string(at: 1) else {
            return raise(L, "proxy.backends: pool must be a string, got \(typeName(L, 1))")
        }
        guard let backends = self.environment.backends(pool: pool) else {
            lua_pushnil(L)
            return 1
        }
        lua_createtable(L, Int32(clamping: backends.count), 0)
        for (i, backend) in backends.enumerated() {
            lua_createtable(L, 0, 9)
            pushString(L, backend.id)
            setField(L, -2, "id")
            pushString(L, backend.pool)
            setField(L, -2, "pool")
            lua_pushboolean(L, backend.healthy ? 1 : 0)
            setField(L, -2, "healthy")
            lua_pushboolean(L, backend.draining ? 1 : 0)
            setField(L, -2, "draining")
            if let region = backend.region {
                pushString(L, region)
                setField(L, -2, "region")
            }
            lua_createtable(L, Int32(clamping: backend.tags.count), 0)
            for (j, tag) in backend.tags.enumerated() {
                pushString(L, tag)
                lua_rawseti(L, -2, lua_Integer(j + 1))
            }
            setField(L, -2, "tags")
            lua_pushinteger(L, lua_Integer(backend.weight))
            setField(L, -2, "weight")
            lua_pushinteger(L, lua_Integer(backend.keys))
            setField(L, -2, "keys")
            lua_pushinteger(L, lua_Integer(backend.connections))
            setField(L, -2, "connections")
            lua_rawseti(L, -2, lua_Integer(i + 1))
        }
        return 1
    }

    fileprivate func luaOwner(_ L: OpaquePointer) -> Int32 {
        guard lua_type(L, 1) == LUA_TSTRING, let key = self.script.string(at: 1) else {
            return raise(L, "proxy.owner: key must be a string, got \(typeName(L, 1))")
        }
        if let owner = self.environment.owner(key: key) {
            pushString(L, owner)
        } else {
            lua_pushnil(L)
        }
        return 1
    }

    // MARK: proxy.log(level, message)

    fileprivate func luaLog(_ L: OpaquePointer) -> Int32 {
        guard lua_type(L, 1) == LUA_TSTRING, let name = self.script.string(at: 1) else {
            return raise(L, "proxy.log: level must be a string, got \(typeName(L, 1))")
        }
        let level: Logger.Level
        switch name {
        case "trace": level = .trace
        case "debug": level = .debug
        case "info": level = .info
        case "notice": level = .notice
        case "warn", "warning": level = .warning
        case "error": level = .error
        case "critical": level = .critical
        default:
            return raise(L, "proxy.log: unknown level '\(name)' (trace, debug, info, notice, warning, error, critical)")
        }
        guard self.logger.logLevel <= level else { return 0 }
        let message = self.script.describe(at: 2) ?? "nil"
        self.logger.log(level: level, "\(message)")
        return 0
    }

    // MARK: proxy.hash.*

    enum HashKind {
        case rendezvous, ketama, maglev
    }

    fileprivate func luaHash(_ L: OpaquePointer, _ kind: HashKind) -> Int32 {
        let name: String
        switch kind {
        case .rendezvous: name = "proxy.hash.rendezvous"
        case .ketama: name = "proxy.hash.ketama"
        case .maglev: name = "proxy.hash.maglev"
        }
        guard lua_type(L, 1) == LUA_TSTRING, let key = self.script.string(at: 1) else {
            return raise(L, "\(name): key must be a string, got \(typeName(L, 1))")
        }
        guard lua_type(L, 2) == LUA_TTABLE else {
            return raise(L, "\(name): expected a list of backend ids or backend tables, got \(typeName(L, 2))")
        }
        var backends: [(id: String, weight: Int)] = []
        let count = lua_rawlen(L, 2)
        backends.reserveCapacity(Int(count))
        let base = lua_gettop(L)
        if count > 0 {
            for i in 1...count {
                switch lua_rawgeti(L, 2, lua_Integer(i)) {
                case LUA_TSTRING:
                    backends.append((self.script.string(at: -1)!, 1))
                case LUA_TTABLE:
                    guard lua_getfield_raw(L, "id") == LUA_TSTRING, let id = self.script.string(at: -1) else {
                        lua_settop(L, base)
                        return raise(L, "\(name): element \(i) has no string id")
                    }
                    var weight = 1
                    let type = lua_getfield_raw(L, "weight", from: -2)
                    if type == LUA_TNUMBER, lua_isinteger(L, -1) != 0 {
                        weight = Int(lua_tointegerx(L, -1, nil))
                    } else if type != LUA_TNIL {
                        lua_settop(L, base)
                        return raise(L, "\(name): element \(i) has a weight that is not an integer")
                    }
                    backends.append((id, weight))
                default:
                    let found = typeName(L, -1)
                    lua_settop(L, base)
                    return raise(L, "\(name): element \(i) is a \(found), expected an id or a backend table")
                }
                lua_settop(L, base)
            }
        }
        let chosen: String?
        switch kind {
        case .rendezvous: chosen = ConsistentHashing.rendezvous(key: key, backends: backends)
        case .ketama: chosen = backends.isEmpty ? nil : self.ringCache.ketama(for: backends).lookup(key)
        case .maglev: chosen = backends.isEmpty ? nil : self.ringCache.maglev(for: backends).lookup(key)
        }
        if let chosen {
            pushString(L, chosen)
        } else {
            lua_pushnil(L)
        }
        return 1
    }

    fileprivate func luaJump(_ L: OpaquePointer) -> Int32 {
        guard lua_type(L, 1) == LUA_TSTRING, let key = self.script.string(at: 1) else {
            return raise(L, "proxy.hash.jump: key must be a string, got \(typeName(L, 1))")
        }
        guard lua_type(L, 2) == LUA_TNUMBER, lua_isinteger(L, 2) != 0 else {
            return raise(L, "proxy.hash.jump: buckets must be an integer, got \(typeName(L, 2))")
        }
        let buckets = lua_tointegerx(L, 2, nil)
        guard buckets >= 1, buckets <= Int32.max else {
            return raise(L, "proxy.hash.jump: buckets must be in 1...\(Int32.max), got \(buckets)")
        }
        lua_pushinteger(L, lua_Integer(ConsistentHashing.jump(key: key, buckets: Int(buckets)) + 1))
        return 1
    }

    // MARK: proxy.json

    fileprivate func luaJSONDecode(_ L: OpaquePointer) -> Int32 {
        guard lua_type(L, 1) == LUA_TSTRING else {
            return raise(L, "proxy.json.decode: expected a string, got \(typeName(L, 1))")
        }
        var length = 0
        let pointer = lua_tolstring(L, 1, &length)!
        let bytes = UnsafeRawBufferPointer(start: pointer, count: length).bindMemory(to: UInt8.self)
        if let error = LuaJSON.decode(L, bytes, nullRef: self.nullRef) {
            lua_pushnil(L)
            pushString(L, "proxy.json.decode: \(error)")
            return 2
        }
        return 1
    }

    fileprivate func luaJSONEncode(_ L: OpaquePointer) -> Int32 {
        lua_settop(L, 1)
        switch LuaJSON.encode(L, at: 1, nullRef: self.nullRef) {
        case .success(let text):
            text.withUnsafeBufferPointer { buffer in
                buffer.withMemoryRebound(to: CChar.self) { _ = lua_pushlstring(L, $0.baseAddress, $0.count) }
            }
            return 1
        case .failure(let error):
            return raise(L, "proxy.json.encode: \(error.message)")
        }
    }
}

/// `rawget(t, name)` for the table at `index` (default: the top), pushing the value and returning its type.
@inline(__always)
private func lua_getfield_raw(_ L: OpaquePointer, _ name: String, from index: Int32 = -1) -> Int32 {
    let table = lua_absindex(L, index)
    pushString(L, name)
    return lua_rawget(L, table)
}
