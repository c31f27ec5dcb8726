import CLuaShim
import Logging
import NIOCore
import NIOHTTP1
import ProxyCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// What a Lua decision says beyond `RouteDecision`.
public struct LuaDecisionExtras: Sendable, Equatable {
    /// The decision had `response_body = true`: buffer the response body (bounded by the proxy's limits) and pass it
    /// to `on_response` as `res.body`.
    public var wantsResponseBody: Bool

    public init(wantsResponseBody: Bool = false) {
        self.wantsResponseBody = wantsResponseBody
    }
}

/// A decision and its extras, from `LuaRoutingPolicy.decide(_:)`.
public struct LuaRouteResult: Sendable, Equatable {
    public var decision: RouteDecision
    public var extras: LuaDecisionExtras
}

/// A routing policy running a Lua 5.4 script's `route(req)` (and optionally `on_response(req, res)`).
///
/// One instance per event loop: it is not `Sendable`, and every method must be called on the thread that uses it.
/// See `docs/routing-api.md` for the script contract.
public final class LuaRoutingPolicy: RoutingPolicy {
    /// The `place` values a decision may name unless the host passes its own set: the core's strategies.
    public static let defaultPlacements: Set<String> = PlacementStrategy.names

    /// Internal: the state calls back into this policy through unretained pointers, so the script must not outlive
    /// it.
    let script: LuaScript
    let environment: any RoutingEnvironment
    let logger: Logger
    let placements: Set<String>

    private var routeRef: Int32 = LUA_NOREF
    private var onResponseRef: Int32 = LUA_NOREF
    private var requestMetatableRef: Int32 = LUA_NOREF
    private var responseMetatableRef: Int32 = LUA_NOREF
    /// A registry list of the `req` field names, interned once: pushing them from it skips hashing each name on
    /// every request.
    private var fieldNamesRef: Int32 = LUA_NOREF
    /// The last `pool` and `place` strings a decision returned, as Swift strings (`place` already checked against
    /// `placements`): scripts return the same few constants on every call, so reading them again costs a pointer
    /// comparison instead of a `String` and, for `place`, a set lookup.
    private var lastPool = RepeatedString()
    private var lastPlace = RepeatedString()
    /// The request behind the `req` table of the call in progress, and that table's address: the lazy fields of
    /// `req` are filled from it (`luaFillRequest`). Both are nil between calls.
    private var currentRequest: UnsafePointer<RouteRequest>?
    private var currentRequestTable: UnsafeRawPointer?
    var nullRef: Int32 = LUA_NOREF

    var ringCache = RingCache()

    /// The extras of the last successful `route`/`decide` call: the side channel for hosts that only call `route`.
    public private(set) var lastExtras = LuaDecisionExtras()

    /// Loads the script, exposes `options` as `proxy.options`, runs the main chunk and finds `route` (required) and
    /// `on_response` (optional).
    public init(
        scriptPath: String,
        options: LuaValue = [:],
        environment: any RoutingEnvironment,
        limits: LuaLimits = LuaLimits(),
        logger: Logger,
        placements: Set<String> = LuaRoutingPolicy.defaultPlacements
    ) throws {
        self.script = try LuaScript(path: scriptPath, limits: limits)
        self.environment = environment
        var logger = logger
        logger[metadataKey: "script"] = "\(scriptPath)"
        self.logger = logger
        self.placements = placements
        // All properties are set: from here a throw runs `deinit`, which releases the state through `script`.
        try self.installProxyModule(options: options)
        try self.script.run()
        guard let route = self.script.globalFunctionRef("route") else {
            throw LuaScriptError.missingFunction("\(scriptPath): no global function 'route'")
        }
        self.routeRef = route
        self.onResponseRef = self.script.globalFunctionRef("on_response") ?? LUA_NOREF
        self.probe = try self.readProbe()
    }

    /// The reconciliation probe the script declares with a global `probe` table and a `probe_keys(backend, res)`
    /// function (see docs/routing-api.md), nil when it declares none.
    public private(set) var probe: ProbeSpec?

    private func readProbe() throws(LuaScriptError) -> ProbeSpec? {
        let L = self.script.L
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        lua_getglobal(L, "probe")
        guard lua_type(L, -1) != LUA_TNIL else { return nil }
        guard lua_type(L, -1) == LUA_TTABLE else {
            throw LuaScriptError.badDecision("probe must be a table, got \(typeName(L, -1))")
        }
        let table = lua_gettop(L)
        func string(_ field: String) -> String? {
            lua_getfield(L, table, field)
            defer { clua_pop(L, 1) }
            return lua_type(L, -1) == LUA_TSTRING ? self.script.string(at: -1) : nil
        }
        func seconds(_ field: String, default value: Double) throws(LuaScriptError) -> TimeAmount {
            lua_getfield(L, table, field)
            defer { clua_pop(L, 1) }
            guard lua_type(L, -1) != LUA_TNIL else { return .nanoseconds(Int64(value * 1e9)) }
            guard lua_type(L, -1) == LUA_TNUMBER, lua_tonumberx(L, -1, nil) > 0 else {
                throw LuaScriptError.badDecision("probe.\(field) must be a positive number of seconds")
            }
            return .nanoseconds(Int64(lua_tonumberx(L, -1, nil) * 1e9))
        }
        guard let pool = string("pool"), let path = string("path"), path.hasPrefix("/") else {
            throw LuaScriptError.badDecision("probe needs pool (string) and path (string starting with '/')")
        }
        lua_getfield(L, table, "headers")
        var headers: [Header] = []
        if lua_type(L, -1) != LUA_TNIL {
            headers = try self.readHeaderMap(L, lua_gettop(L), field: "probe.headers")
        }
        clua_pop(L, 1)
        let interval = try seconds("interval", default: 30)
        let timeout = try seconds("timeout", default: 5)
        guard self.script.globalFunctionRef("probe_keys").map({ luaL_unref(L, clua_registryindex(), $0); return true }) ?? false
        else {
            throw LuaScriptError.badDecision("a script with a probe table must define probe_keys(backend, res)")
        }
        return ProbeSpec(pool: pool, path: path, headers: headers, interval: interval, timeout: timeout)
    }

    /// Runs `probe_keys(backend, res)`: `res` has `status`, `headers`, `body`; it returns a list of keys.
    public func probeKeys(backend: String, response: FanoutResponse) throws -> [String] {
        let L = self.script.L
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        lua_getglobal(L, "probe_keys")
        guard lua_type(L, -1) == LUA_TFUNCTION else { return [] }
        pushString(L, backend)
        lua_createtable(L, 0, 3)
        let res = lua_gettop(L)
        lua_pushinteger(L, lua_Integer(response.status))
        setField(L, res, "status")
        self.pushHeaders(L, response.headers, into: res)
        pushString(L, String(buffer: response.body))
        setField(L, res, "body")
        try self.script.call(arguments: 2, results: 1)
        let list = lua_gettop(L)
        guard lua_type(L, list) == LUA_TTABLE else {
            throw LuaScriptError.badDecision("probe_keys must return a list of keys, got \(typeName(L, list))")
        }
        var keys: [String] = []
        let count = luaL_len(L, list)
        if count > 0 {
            for index in 1...count {
                lua_rawgeti(L, list, index)
                if lua_type(L, -1) == LUA_TSTRING, let key = self.script.string(at: -1), !key.isEmpty {
                    keys.append(key)
                }
                clua_pop(L, 1)
            }
        }
        return keys
    }

    /// The script file, as given.
    public var scriptPath: String {
        self.script.path
    }

    /// Bytes the Lua state currently holds (bounded by `LuaLimits.memoryLimit`).
    public var memoryInUse: Int {
        self.script.memoryInUse
    }

    /// True when the script defines `on_response(req, res)`.
    public var hasOnResponse: Bool {
        self.onResponseRef != LUA_NOREF
    }

    public func route(_ request: RouteRequest) throws -> RouteDecision {
        let result = try self.decide(request)
        var decision = result.decision
        decision.responseBody = result.extras.wantsResponseBody
        return decision
    }

    public var observesResponses: Bool {
        self.hasOnResponse
    }

    public func onResponse(_ request: RouteRequest, _ response: RouteResponse) throws -> ResponseAction? {
        let body = response.body.map { String(buffer: $0) }
        return try self.onResponse(request: request, status: response.status, headers: response.headers, body: body)
            .map { .claim($0) }
    }

    /// `route`, with the extras (also left in `lastExtras`).
    public func decide(_ request: RouteRequest) throws(LuaScriptError) -> LuaRouteResult {
        let L = self.script.L
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        lua_rawgeti(L, clua_registryindex(), lua_Integer(self.routeRef))
        return try withUnsafePointer(to: request) { (pointer) throws(LuaScriptError) -> LuaRouteResult in
            self.pushRequest(L, pointer)
            defer { self.endRequest() }
            try self.script.call(arguments: 1, results: 1)
            let result = try self.readDecision(L, lua_gettop(L), hasBody: pointer.pointee.body != nil)
            self.lastExtras = result.extras
            return result
        }
    }

    /// Runs `on_response(req, res)` when the script has it: `res` has `status`, `headers` (like `req.headers`),
    /// and `body` when given. Returns the key the response claims (`{claim = K}`), nil when it returns nil, `{}`,
    /// or the script has no `on_response`.
    public func onResponse(request: RouteRequest, status: Int, headers: HTTPHeaders, body: String?) throws -> String? {
        guard self.hasOnResponse else { return nil }
        let L = self.script.L
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        lua_rawgeti(L, clua_registryindex(), lua_Integer(self.onResponseRef))
        return try withUnsafePointer(to: request) { (pointer) throws -> String? in
            self.pushRequest(L, pointer)
            defer { self.endRequest() }
            lua_createtable(L, 0, 4)
            lua_pushinteger(L, lua_Integer(status))
            setField(L, -2, "status")
            self.pushHeaders(L, headers, into: lua_gettop(L))
            if let body {
                pushString(L, body)
                setField(L, -2, "body")
            }
            lua_rawgeti(L, clua_registryindex(), lua_Integer(self.responseMetatableRef))
            lua_setmetatable(L, -2)
            try self.script.call(arguments: 2, results: 1)
            let index = lua_gettop(L)
            switch lua_type(L, index) {
            case LUA_TNIL:
                return nil
            case LUA_TTABLE:
                var claim: String?
                lua_pushnil(L)
                while lua_next(L, index) != 0 {
                    guard lua_type(L, -2) == LUA_TSTRING, self.script.string(at: -2) == "claim" else {
                        throw LuaScriptError.badDecision("on_response: unknown field \(self.keyDescription(L, -2))")
                    }
                    claim = try self.nonEmptyString(L, field: "on_response: claim")
                    clua_pop(L, 1)
                }
                return claim
            default:
                throw LuaScriptError.badDecision("on_response must return nil or a table, got \(typeName(L, index))")
            }
        }
    }

    /// Runs the global merge function `function(req, responses)` of a fan-out: `responses` is a list of
    /// `{backend=, status=, headers=, body=}` (answers that arrived, in backend order); it returns a response table
    /// like `respond` (`{status=, headers=, body=}`).
    public func mergeFanout(_ request: RouteRequest, function: String, responses: [FanoutResponse]) throws -> LocalResponse {
        let L = self.script.L
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        lua_getglobal(L, function)
        guard lua_type(L, -1) == LUA_TFUNCTION else {
            throw UnknownMergeFunction(name: function)
        }
        return try withUnsafePointer(to: request) { (pointer) throws -> LocalResponse in
            self.pushRequest(L, pointer)
            defer { self.endRequest() }
            lua_createtable(L, Int32(responses.count), 0)
            let list = lua_gettop(L)
            for (index, response) in responses.enumerated() {
                lua_createtable(L, 0, 4)
                let item = lua_gettop(L)
                pushString(L, response.backend)
                setField(L, item, "backend")
                lua_pushinteger(L, lua_Integer(response.status))
                setField(L, item, "status")
                self.pushHeaders(L, response.headers, into: item)
                pushString(L, String(buffer: response.body))
                setField(L, item, "body")
                lua_rawseti(L, list, lua_Integer(index + 1))
            }
            try self.script.call(arguments: 2, results: 1)
            return try self.readResponse(L, lua_gettop(L))
        }
    }

    // MARK: - The request table

    /// The `req` field names interned in `fieldNamesRef`, by position.
    private enum FieldName: lua_Integer, CaseIterable {
        case method = 1, path, isUpgrade, body

        var name: String {
            switch self {
            case .method: "method"
            case .path: "path"
            case .isUpgrade: "is_upgrade"
            case .body: "body"
            }
        }
    }

    /// Pushes a `req` table and makes it the current one (`endRequest()` ends that). Only `method`, `path`,
    /// `is_upgrade` and `body` are set here; the prelude's `__index` asks `luaFillRequest` for the others on first
    /// read, so a script reading only the path never pays for the header table.
    private func pushRequest(_ L: OpaquePointer, _ pointer: UnsafePointer<RouteRequest>) {
        lua_rawgeti(L, clua_registryindex(), lua_Integer(self.fieldNamesRef))
        let names = lua_gettop(L)
        lua_createtable(L, 0, 4)
        let table = lua_gettop(L)
        lua_rawgeti(L, names, FieldName.method.rawValue)
        pushString(L, pointer.pointee.method.rawValue)
        lua_rawset(L, table)
        lua_rawgeti(L, names, FieldName.path.rawValue)
        pushString(L, pointer.pointee.path)
        lua_rawset(L, table)
        lua_rawgeti(L, names, FieldName.isUpgrade.rawValue)
        lua_pushboolean(L, pointer.pointee.isUpgrade ? 1 : 0)
        lua_rawset(L, table)
        if let body = pointer.pointee.body {
            lua_rawgeti(L, names, FieldName.body.rawValue)
            body.withUnsafeReadableBytes { bytes in
                _ = lua_pushlstring(L, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count)
            }
            lua_rawset(L, table)
        }
        lua_rawgeti(L, clua_registryindex(), lua_Integer(self.requestMetatableRef))
        lua_setmetatable(L, table)
        lua_rotate(L, names, -1)  // lua_remove(L, names): the request table is left on top
        clua_pop(L, 1)
        self.currentRequest = pointer
        self.currentRequestTable = lua_topointer(L, -1)
    }

    private func endRequest() {
        self.currentRequest = nil
        self.currentRequestTable = nil
    }

    /// `fill(t, k)` from the prelude: sets the lazy field `k` of the current `req` table `t` and returns it. A `req`
    /// kept past its call has only the fields read during the call; reading another one is an error, not a silent
    /// nil or another request's value.
    func luaFillRequest(_ L: OpaquePointer) -> Int32 {
        guard lua_type(L, 2) == LUA_TSTRING, let name = self.script.string(at: 2) else { return 0 }
        guard let pointer = self.currentRequest, lua_topointer(L, 1) == self.currentRequestTable else {
            pushString(L, "req.\(name) was first read after the call that received req returned; read it during the call")
            return -1
        }
        let request = pointer.pointee
        switch name {
        case "headers":
            self.pushHeaders(L, request.headers, into: 1)
            lua_pushvalue(L, 2)
            lua_rawget(L, 1)
            return 1
        case "query": pushSubstring(L, request.query)
        case "host": pushString(L, request.host)
        case "scheme": pushString(L, request.scheme)
        case "client_ip": pushString(L, request.clientIP)
        case "listener": pushString(L, request.listener)
        default: return 0
        }
        lua_pushvalue(L, 2)
        lua_pushvalue(L, -2)
        lua_rawset(L, 1)
        return 1
    }

    /// Sets `headers` (lower-case name → value; repeated fields joined with ", ", except `set-cookie` which keeps
    /// its first value) on the table at `table`, and `headers_all` (name → list of values) when a name repeats
    /// (otherwise the prelude derives it from `headers` on first use).
    private func pushHeaders(_ L: OpaquePointer, _ headers: HTTPHeaders, into table: Int32) {
        lua_createtable(L, 0, Int32(clamping: headers.count))
        let map = lua_gettop(L)
        var repeated = false
        for (name, value) in headers {
            pushLowercased(L, name)
            lua_pushvalue(L, -1)
            if lua_rawget(L, map) == LUA_TNIL {
                clua_pop(L, 1)
                pushString(L, value)
                lua_rawset(L, map)
            } else {
                repeated = true
                if name.utf8.count == 10, name.lowercased() == "set-cookie" {
                    clua_pop(L, 2)
                } else {
                    _ = lua_pushlstring(L, ", ", 2)
                    pushString(L, value)
                    lua_concat(L, 3)
                    lua_rawset(L, map)
                }
            }
        }
        setField(L, table, "headers")
        guard repeated else { return }
        lua_createtable(L, 0, Int32(clamping: headers.count))
        let all = lua_gettop(L)
        for (name, value) in headers {
            pushLowercased(L, name)
            lua_pushvalue(L, -1)
            if lua_rawget(L, all) == LUA_TNIL {
                clua_pop(L, 1)
                lua_createtable(L, 1, 0)
                pushString(L, value)
                lua_rawseti(L, -2, 1)
                lua_rawset(L, all)
            } else {
                let next = lua_Integer(lua_rawlen(L, -1)) + 1
                pushString(L, value)
                lua_rawseti(L, -2, next)
                clua_pop(L, 2)
            }
        }
        setField(L, table, "headers_all")
    }

    // MARK: - Reading a decision

    private func readDecision(
        _ L: OpaquePointer,
        _ index: Int32,
        hasBody: Bool
    ) throws(LuaScriptError) -> LuaRouteResult {
        guard lua_type(L, index) == LUA_TTABLE else {
            throw LuaScriptError.badDecision("route must return a table, got \(typeName(L, index))")
        }
        var key: String?
        var pool: String?
        var place: String?
        var backend: String?
        var path: String?
        var respond: LocalResponse?
        var needBody = false
        var responseBody = false
        var setHeaders: [Header] = []
        var removeHeaders: [String] = []
        var fanout: String?
        var merge: String?
        var timeout: Double?

        lua_pushnil(L)
        while lua_next(L, index) != 0 {
            guard lua_type(L, -2) == LUA_TSTRING else {
                throw LuaScriptError.badDecision("decision fields are named, found \(self.keyDescription(L, -2))")
            }
            var length = 0
            let pointer = lua_tolstring(L, -2, &length)!
            let field = UnsafeRawBufferPointer(start: pointer, count: length)
            if fieldIs(field, "key") {
                key = try self.nonEmptyString(L, field: "key")
            } else if fieldIs(field, "pool") {
                let cached = try self.lastPool.read(L) { value throws(LuaScriptError) in
                    guard !value.isEmpty else { throw LuaScriptError.badDecision("pool must not be empty") }
                }
                if let cached { pool = cached } else { pool = try self.nonEmptyString(L, field: "pool") }
            } else if fieldIs(field, "backend") {
                backend = try self.nonEmptyString(L, field: "backend")
            } else if fieldIs(field, "place") {
                let placements = self.placements
                let cached = try self.lastPlace.read(L) { value throws(LuaScriptError) in
                    guard !value.isEmpty else { throw LuaScriptError.badDecision("place must not be empty") }
                    guard placements.contains(value) else {
                        let known = placements.sorted().joined(separator: ", ")
                        throw LuaScriptError.badDecision("unknown place '\(value)' (known: \(known))")
                    }
                }
                if let cached { place = cached } else { place = try self.nonEmptyString(L, field: "place") }
            } else if fieldIs(field, "path") {
                let value = try self.nonEmptyString(L, field: "path")
                guard value.utf8.first == UInt8(ascii: "/"),
                    !value.utf8.contains(where: { $0 <= 0x20 || $0 == 0x7f || $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "#") })
                else {
                    throw LuaScriptError.badDecision(
                        "path must start with '/' and hold no spaces, control characters, '?' or '#'"
                    )
                }
                path = value
            } else if fieldIs(field, "need_body") {
                needBody = try self.boolean(L, field: "need_body")
            } else if fieldIs(field, "response_body") {
                responseBody = try self.boolean(L, field: "response_body")
            } else if fieldIs(field, "respond") {
                respond = try self.readResponse(L, lua_gettop(L))
            } else if fieldIs(field, "set_headers") {
                setHeaders = try self.readHeaderMap(L, lua_gettop(L), field: "set_headers")
            } else if fieldIs(field, "remove_headers") {
                removeHeaders = try self.readNameList(L, lua_gettop(L), field: "remove_headers")
            } else if fieldIs(field, "fanout") {
                fanout = try self.nonEmptyString(L, field: "fanout")
            } else if fieldIs(field, "merge") {
                merge = try self.nonEmptyString(L, field: "merge")
            } else if fieldIs(field, "timeout") {
                guard lua_type(L, -1) == LUA_TNUMBER else {
                    throw LuaScriptError.badDecision("timeout must be a number of seconds, got \(typeName(L, -1))")
                }
                let seconds = lua_tonumberx(L, -1, nil)
                guard seconds > 0, seconds <= 300 else {
                    throw LuaScriptError.badDecision("timeout must be between 0 and 300 seconds, got \(seconds)")
                }
                timeout = seconds
            } else {
                throw LuaScriptError.badDecision("unknown field '\(String(decoding: field, as: UTF8.self))'")
            }
            clua_pop(L, 1)
        }

        let action: RouteDecision.Action
        if (merge != nil || timeout != nil) && fanout == nil {
            throw LuaScriptError.badDecision("merge and timeout apply only with fanout")
        }
        if let fanout {
            if let other = [key.map { _ in "key" }, backend.map { _ in "backend" }, pool.map { _ in "pool" },
                            respond.map { _ in "respond" }].compactMap({ $0 }).first ?? (needBody ? "need_body" : nil)
            {
                throw LuaScriptError.badDecision("fanout cannot be combined with \(other)")
            }
            let mergeName = merge ?? Fanout.jsonArrayMerge
            if mergeName != Fanout.jsonArrayMerge {
                lua_getglobal(L, mergeName)
                let isFunction = lua_type(L, -1) == LUA_TFUNCTION
                clua_pop(L, 1)
                guard isFunction else {
                    throw LuaScriptError.badDecision("merge '\(mergeName)' is neither json-array nor a global function")
                }
            }
            action = .fanout(
                Fanout(pool: fanout, merge: mergeName,
                       timeout: timeout.map { .nanoseconds(Int64($0 * 1e9)) } ?? .seconds(5)))
        } else if let respond {
            if let other = [key.map { _ in "key" }, backend.map { _ in "backend" }, pool.map { _ in "pool" }]
                .compactMap({ $0 }).first ?? (needBody ? "need_body" : nil)
            {
                throw LuaScriptError.badDecision("respond cannot be combined with \(other)")
            }
            if !setHeaders.isEmpty || !removeHeaders.isEmpty || path != nil {
                throw LuaScriptError.badDecision(
                    "set_headers, remove_headers and path apply to forwarded requests, not to respond"
                )
            }
            action = .respond(respond)
        } else if needBody {
            if key != nil || backend != nil || pool != nil {
                throw LuaScriptError.badDecision("need_body cannot be combined with key, backend or pool")
            }
            if hasBody {
                throw LuaScriptError.badDecision("need_body returned although req.body is already present")
            }
            action = .needBody
        } else if let key {
            if backend != nil {
                throw LuaScriptError.badDecision("key and backend are exclusive")
            }
            guard let pool else {
                throw LuaScriptError.badDecision("key needs a pool to place it on")
            }
            action = .forward(.keyed(key: key, pool: pool, placement: place))
        } else if let backend {
            if pool != nil {
                throw LuaScriptError.badDecision("backend and pool are exclusive (a backend id names one backend)")
            }
            action = .forward(.backend(backend))
        } else if let pool {
            action = .forward(.pool(pool))
        } else {
            throw LuaScriptError.badDecision(
                "the decision names no action (expected key+pool, backend, pool, respond or need_body)"
            )
        }
        if place != nil, key == nil {
            throw LuaScriptError.badDecision("place applies only with key")
        }
        return LuaRouteResult(
            decision: RouteDecision(action: action, setHeaders: setHeaders, removeHeaders: removeHeaders, path: path),
            extras: LuaDecisionExtras(wantsResponseBody: responseBody)
        )
    }

    private func readResponse(_ L: OpaquePointer, _ index: Int32) throws(LuaScriptError) -> LocalResponse {
        guard lua_type(L, index) == LUA_TTABLE else {
            throw LuaScriptError.badDecision("respond must be a table, got \(typeName(L, index))")
        }
        var status: Int?
        var headers: [Header] = []
        var body = ""
        lua_pushnil(L)
        while lua_next(L, index) != 0 {
            let name = lua_type(L, -2) == LUA_TSTRING ? self.script.string(at: -2) : nil
            switch name {
            case "status":
                guard lua_type(L, -1) == LUA_TNUMBER, lua_isinteger(L, -1) != 0 else {
                    throw LuaScriptError.badDecision("respond.status must be an integer, got \(typeName(L, -1))")
                }
                let value = lua_tointegerx(L, -1, nil)
                guard (100...599).contains(value) else {
                    throw LuaScriptError.badDecision("respond.status must be in 100...599, got \(value)")
                }
                status = Int(value)
            case "headers":
                headers = try self.readHeaderMap(L, lua_gettop(L), field: "respond.headers")
            case "body":
                guard lua_type(L, -1) == LUA_TSTRING else {
                    throw LuaScriptError.badDecision("respond.body must be a string, got \(typeName(L, -1))")
                }
                body = self.script.string(at: -1) ?? ""
            default:
                throw LuaScriptError.badDecision("unknown field respond.\(self.keyDescription(L, -2))")
            }
            clua_pop(L, 1)
        }
        guard let status else {
            throw LuaScriptError.badDecision("respond needs a status")
        }
        return LocalResponse(status: HTTPResponseStatus(statusCode: status), headers: headers, body: body)
    }

    /// A table name → value (string or number), validated as HTTP header fields; sorted by name so the result does
    /// not depend on Lua's table order.
    private func readHeaderMap(_ L: OpaquePointer, _ index: Int32, field: String) throws(LuaScriptError) -> [Header] {
        guard lua_type(L, index) == LUA_TTABLE else {
            throw LuaScriptError.badDecision("\(field) must be a table of name = value, got \(typeName(L, index))")
        }
        var headers: [Header] = []
        lua_pushnil(L)
        while lua_next(L, index) != 0 {
            guard lua_type(L, -2) == LUA_TSTRING, let name = self.script.string(at: -2), isToken(name) else {
                throw LuaScriptError.badDecision("\(field): \(self.keyDescription(L, -2)) is not a valid header name")
            }
            let valueType = lua_type(L, -1)
            guard valueType == LUA_TSTRING || valueType == LUA_TNUMBER else {
                throw LuaScriptError.badDecision(
                    "\(field).\(name) must be a string or a number, got \(typeName(L, -1))"
                )
            }
            lua_pushvalue(L, -1)  // tolstring converts numbers in place: convert a copy
            var length = 0
            let pointer = lua_tolstring(L, -1, &length)!
            let value = String(decoding: UnsafeRawBufferPointer(start: pointer, count: length), as: UTF8.self)
            clua_pop(L, 1)
            guard !value.utf8.contains(where: { $0 == 0x0d || $0 == 0x0a || $0 == 0 }) else {
                throw LuaScriptError.badDecision("\(field).\(name) holds a CR, LF or NUL")
            }
            headers.append(Header(name, value))
            clua_pop(L, 1)
        }
        headers.sort { $0.name < $1.name }
        return headers
    }

    /// A list of header names, lower-cased.
    private func readNameList(_ L: OpaquePointer, _ index: Int32, field: String) throws(LuaScriptError) -> [String] {
        guard lua_type(L, index) == LUA_TTABLE else {
            throw LuaScriptError.badDecision("\(field) must be a list of header names, got \(typeName(L, index))")
        }
        let count = lua_rawlen(L, index)
        var names: [String] = []
        names.reserveCapacity(Int(count))
        var seen = 0
        lua_pushnil(L)
        while lua_next(L, index) != 0 {
            seen += 1
            clua_pop(L, 1)
        }
        guard seen == count else {
            throw LuaScriptError.badDecision("\(field) must be a list (keys 1...n)")
        }
        if count > 0 {
            for i in 1...count {
                lua_rawgeti(L, index, lua_Integer(i))
                guard let name = self.script.string(at: -1), isToken(name) else {
                    throw LuaScriptError.badDecision("\(field)[\(i)] is not a valid header name")
                }
                names.append(name.lowercased())
                clua_pop(L, 1)
            }
        }
        return names
    }

    private func nonEmptyString(_ L: OpaquePointer, field: String) throws(LuaScriptError) -> String {
        guard lua_type(L, -1) == LUA_TSTRING, let value = self.script.string(at: -1) else {
            throw LuaScriptError.badDecision("\(field) must be a string, got \(typeName(L, -1))")
        }
        guard !value.isEmpty else {
            throw LuaScriptError.badDecision("\(field) must not be empty")
        }
        return value
    }

    private func boolean(_ L: OpaquePointer, field: String) throws(LuaScriptError) -> Bool {
        guard lua_type(L, -1) == LUA_TBOOLEAN else {
            throw LuaScriptError.badDecision("\(field) must be a boolean, got \(typeName(L, -1))")
        }
        return lua_toboolean(L, -1) != 0
    }

    private func keyDescription(_ L: OpaquePointer, _ index: Int32) -> String {
        if lua_type(L, index) == LUA_TSTRING, let name = self.script.string(at: index) {
            return "'\(name)'"
        }
        return "a \(typeName(L, index)) key (\(self.script.describe(at: index) ?? "?"))"
    }

    // MARK: - Setup

    private func installProxyModule(options: LuaValue) throws {
        let L = self.script.L
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        self.pushProxyModule(L)
        let proxy = lua_gettop(L)
        lua_pushvalue(L, proxy)
        lua_setglobal(L, "proxy")

        try self.script.load(luaPrelude, name: "=prelude")
        lua_pushvalue(L, proxy)
        clua_pushcfunction(L, clua_parsequery)
        clua_pushswiftfunction(L, { L, context in
            Unmanaged<LuaRoutingPolicy>.fromOpaque(context!).takeUnretainedValue().luaFillRequest(L!)
        }, Unmanaged.passUnretained(self).toOpaque())
        try self.script.call(arguments: 3, results: 3)
        self.nullRef = luaL_ref(L, clua_registryindex())
        self.responseMetatableRef = luaL_ref(L, clua_registryindex())
        self.requestMetatableRef = luaL_ref(L, clua_registryindex())

        lua_createtable(L, Int32(FieldName.allCases.count), 0)
        for field in FieldName.allCases {
            pushString(L, field.name)
            lua_rawseti(L, -2, field.rawValue)
        }
        self.fieldNamesRef = luaL_ref(L, clua_registryindex())

        options.push(L, nullRef: self.nullRef)
        setField(L, proxy, "options")
    }
}

@inline(__always)
func fieldIs(_ field: UnsafeRawBufferPointer, _ name: StaticString) -> Bool {
    field.count == name.utf8CodeUnitCount && memcmp(field.baseAddress!, name.utf8Start, field.count) == 0
}

@inline(__always)
func pushSubstring(_ L: OpaquePointer, _ string: Substring) {
    if let done: Void = string.utf8.withContiguousStorageIfAvailable({ bytes in
        bytes.withMemoryRebound(to: CChar.self) { _ = lua_pushlstring(L, $0.baseAddress, $0.count) }
    }) {
        return done
    }
    pushString(L, String(string))
}

func typeName(_ L: OpaquePointer, _ index: Int32) -> String {
    String(cString: lua_typename(L, lua_type(L, index)))
}

/// An HTTP token (RFC 9110 field name).
func isToken(_ name: String) -> Bool {
    guard !name.isEmpty else { return false }
    return name.utf8.allSatisfy { byte in
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        default:
            return "!#$%&'*+-.^_`|~".utf8.contains(byte)
        }
    }
}

/// One decision field's last string value (`pool`, `place`), kept as a Swift `String` with the Lua string it came
/// from. A Lua string's bytes do not move while it lives, and two live strings never share an address; the cached
/// one is kept alive through a registry slot, so an equal address means the same string, already checked.
struct RepeatedString {
    private var bytes: UnsafePointer<CChar>?
    private var value = ""
    private var anchor: Int32 = LUA_NOREF

    /// The string at the top of the stack when it is one: the cached value when it is the cached string, otherwise
    /// `check`ed, cached and returned. Nil when the value is not a string (the caller reports the type).
    mutating func read(
        _ L: OpaquePointer, check: (String) throws(LuaScriptError) -> Void
    ) throws(LuaScriptError) -> String? {
        guard lua_type(L, -1) == LUA_TSTRING else { return nil }
        var length = 0
        guard let pointer = lua_tolstring(L, -1, &length) else { return nil }
        if pointer == self.bytes { return self.value }
        let value = pointer.withMemoryRebound(to: UInt8.self, capacity: length) {
            String(decoding: UnsafeBufferPointer(start: $0, count: length), as: UTF8.self)
        }
        try check(value)
        lua_pushvalue(L, -1)
        if self.anchor == LUA_NOREF {
            self.anchor = luaL_ref(L, clua_registryindex())
        } else {
            lua_rawseti(L, clua_registryindex(), lua_Integer(self.anchor))
        }
        self.bytes = pointer
        self.value = value
        return value
    }
}
