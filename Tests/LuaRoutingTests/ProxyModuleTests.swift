import Foundation
import LuaRouting
import NIOCore
import NIOHTTP1
import ProxyCore
import Testing

private let probe = #"""
    function route(req)
        local f = assert(load(req.headers["x-code"]))
        return { respond = { status = 200, body = tostring(f()) } }
    end
    """#

private func run(_ policy: LuaRoutingPolicy, _ code: String) throws -> String? {
    try policy.body(request(headers: [("x-code", code)]))
}

@Suite struct ProxyModuleTests {
    @Test func backends() throws {
        let p = try policy(probe)
        #expect(try run(p, "return #proxy.backends('rooms')") == "3")
        #expect(try run(p, """
            local b = proxy.backends('rooms')[1]
            return table.concat({ b.id, b.pool, tostring(b.healthy), tostring(b.draining), b.region, b.tags[1],
                                  b.weight, b.keys, b.connections }, ',')
            """) == "r1,rooms,true,false,eu,blue,1,3,7")
        #expect(try run(p, "local b = proxy.backends('rooms')[2] return tostring(b.healthy) .. tostring(b.region) .. #b.tags") == "falsenil0")
        #expect(try run(p, "return proxy.backends('nope')") == "nil")
        #expect(try run(p, "return #proxy.backends('empty')") == "0")
        #expect(throws: LuaScriptError.self) { try run(p, "return proxy.backends()") }
    }

    @Test func owner() throws {
        let p = try policy(probe)
        #expect(try run(p, "return proxy.owner('room:lobby')") == "r2")
        #expect(try run(p, "return proxy.owner('room:other')") == "nil")
    }

    @Test func hashes() throws {
        let p = try policy(probe)
        let ids: [(id: String, weight: Int)] = [("a", 1), ("b", 1), ("c", 1)]
        for key in ["k1", "k2", "room:lobby", "x"] {
            #expect(try run(p, "return proxy.hash.rendezvous('\(key)', {'a','b','c'})") == ConsistentHashing.rendezvous(key: key, backends: ids))
            #expect(try run(p, "return proxy.hash.ketama('\(key)', {'a','b','c'})") == Ketama(backends: ids).lookup(key))
            #expect(try run(p, "return proxy.hash.maglev('\(key)', {'a','b','c'})") == Maglev(backends: ids).lookup(key))
            #expect(try run(p, "return proxy.hash.jump('\(key)', 3)") == String(ConsistentHashing.jump(key: key, buckets: 3) + 1))
        }
        // Backend tables (with weights) work as well as ids.
        let weighted: [(id: String, weight: Int)] = [("r1", 1), ("r2", 2), ("r3", 1)]
        #expect(try run(p, "return proxy.hash.rendezvous('k9', proxy.backends('rooms'))") == ConsistentHashing.rendezvous(key: "k9", backends: weighted))
        #expect(try run(p, "return proxy.hash.maglev('k9', proxy.backends('rooms'))") == Maglev(backends: weighted).lookup("k9"))
        #expect(try run(p, "return proxy.hash.rendezvous('k', {})") == "nil")
        #expect(try run(p, "return proxy.hash.jump('k', 1)") == "1")
        #expect(throws: LuaScriptError.self) { try run(p, "return proxy.hash.jump('k', 0)") }
        #expect(throws: LuaScriptError.self) { try run(p, "return proxy.hash.ketama('k', { {weight = 1} })") }
        #expect(throws: LuaScriptError.self) { try run(p, "return proxy.hash.ketama('k', { true })") }
    }

    @Test func json() throws {
        let p = try policy(probe)
        #expect(try run(p, #"""
            local v = proxy.json.decode('{"a": [1, 2.5, "x\\u00e9\\ud83d\\ude00", true, null], "b": {"c": -3e2}, "d": ""}')
            return table.concat({ v.a[1], v.a[2], v.a[3], tostring(v.a[4]), tostring(v.a[5] == proxy.json.null),
                                  #v.a, v.b.c, math.type(v.a[1]), v.d }, ",")
            """#) == "1,2.5,xé😀,true,true,5,-300.0,integer,")
        #expect(try run(p, #"return proxy.json.encode({ b = { 1, 2, proxy.json.null }, a = "q\"\n", c = {}, d = false, e = 1.5 })"#)
            == #"{"a":"q\"\n","b":[1,2,null],"c":{},"d":false,"e":1.5}"#)
        #expect(try run(p, #"return proxy.json.encode(proxy.json.decode('[{"x":[]}]'))"#) == #"[{"x":{}}]"#)
        #expect(try run(p, #"local v, err = proxy.json.decode('{"a": }') return tostring(v) .. " " .. err"#)
            == "nil proxy.json.decode: unexpected character '}' at byte 7")
        #expect(try run(p, #"local v, err = proxy.json.decode('[1] x') return err"#) == "proxy.json.decode: unexpected data after the value at byte 5")
        #expect(try run(p, #"local v, err = proxy.json.decode(string.rep('[', 500)) return err"#)?.contains("nesting deeper than 100") == true)
        #expect(throws: LuaScriptError.self) { try run(p, "return proxy.json.encode({ f = print })") }
        #expect(throws: LuaScriptError.self) { try run(p, "local t = {} t.t = t return proxy.json.encode(t)") }
        #expect(throws: LuaScriptError.self) { try run(p, "proxy.json.null.x = 1") }
        #expect(try run(p, "return tostring(proxy.json.null)") == "null")
    }

    @Test func logOptionsNow() throws {
        let log = CapturedLog()
        let options: LuaValue = ["pool": "rooms", "weights": [1, 2.5], "debug": true, "nothing": nil, "nested": ["n": 3]]
        let p = try policy(probe, options: options, log: log)
        _ = try run(p, "proxy.log('warning', 'careful') proxy.log('debug', 42) return 1")
        #expect(log.messages.contains { $0.0 == .warning && $0.1 == "careful" })
        #expect(log.messages.contains { $0.0 == .debug && $0.1 == "42" })
        #expect(throws: LuaScriptError.self) { try run(p, "proxy.log('loud', 'x')") }
        #expect(try run(p, """
            local o = proxy.options
            return table.concat({ o.pool, o.weights[1], o.weights[2], tostring(o.debug),
                                  tostring(o.nothing == proxy.json.null), o.nested.n }, ",")
            """) == "rooms,1,2.5,true,true,3")
        let now = Double(try run(p, "return proxy.now()") ?? "") ?? 0
        #expect(abs(now - Date().timeIntervalSince1970) < 5)
        #expect(try run(p, "return math.type(proxy.now())") == "float")
    }
}

@Suite struct ExampleScriptTests {
    static let directory = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("routing-scripts")

    private func example(_ name: String, options: LuaValue = [:]) throws -> LuaRoutingPolicy {
        try LuaRoutingPolicy(
            scriptPath: Self.directory.appendingPathComponent(name).path,
            options: options,
            environment: testEnvironment,
            logger: CapturedLog().logger
        )
    }

    @Test func tenantHeader() throws {
        let p = try example("tenant-header.lua")
        #expect(try p.route(request(headers: [("X-Tenant", "acme")])) == RouteDecision(
            action: .forward(.keyed(key: "tenant:acme", pool: "tenants", placement: "rendezvous")),
            setHeaders: [Header("x-routed-tenant", "acme")]
        ))
        guard case .respond(let response) = try p.route(request()).action else {
            Issue.record("expected a local 400")
            return
        }
        #expect(response.status == .badRequest)
        let custom = try example("tenant-header.lua", options: ["header": "x-org", "pool": "orgs"])
        #expect(try custom.route(request(headers: [("x-org", "o1")])).action == .forward(.keyed(key: "tenant:o1", pool: "orgs", placement: "rendezvous")))
    }

    @Test func pathKey() throws {
        let p = try example("path-key.lua")
        #expect(try p.route(request(.GET, "/rooms/blue/ws", upgrade: true)) == RouteDecision(
            action: .forward(.keyed(key: "room:blue", pool: "rooms", placement: "rendezvous"))
        ))
        #expect(try p.route(request(.GET, "/rooms/blue")).action == .forward(.keyed(key: "room:blue", pool: "rooms", placement: "rendezvous")))
        #expect(try p.route(request(.GET, "/")) == .pool("rooms"))
    }

    @Test func stateless() throws {
        let p = try example("stateless.lua")
        #expect(try p.route(request(.GET, "/anything")) == RouteDecision(action: .forward(.pool("web")), removeHeaders: ["x-internal-debug"]))
        #expect(try p.route(request(.GET, "/healthz")) == .respond(LocalResponse(status: .ok, body: "ok\n")))
    }
}

@Suite struct ConcurrencyTests {
    /// Two policies, each created and used on its own thread, in parallel.
    @Test func twoPoliciesOnTwoThreads() async throws {
        let source = #"""
            function route(req)
                local name = req.path:match("^/rooms/([^/]+)")
                local owner = proxy.hash.rendezvous(name, proxy.backends("rooms"))
                return { key = name .. "@" .. owner, pool = "rooms" }
            end
            """#
        let path = scriptFile(source)
        let results = try await withThrowingTaskGroup(of: Int.self) { group in
            for thread in 0..<2 {
                group.addTask {
                    try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Int, any Error>) in
                        let worker = Thread {
                            do {
                                let p = try LuaRoutingPolicy(scriptPath: path, environment: testEnvironment, logger: CapturedLog().logger)
                                var ok = 0
                                for i in 0..<5_000 {
                                    let name = "r\(thread)-\(i % 100)"
                                    let expected = ConsistentHashing.rendezvous(
                                        key: name, backends: [("r1", 1), ("r2", 2), ("r3", 1)]
                                    )!
                                    let decision = try p.route(request(.GET, "/rooms/\(name)"))
                                    if decision.action == .forward(.keyed(key: "\(name)@\(expected)", pool: "rooms", placement: nil)) {
                                        ok += 1
                                    }
                                }
                                continuation.resume(returning: ok)
                            } catch {
                                continuation.resume(throwing: error)
                            }
                        }
                        worker.start()
                    }
                }
            }
            var all: [Int] = []
            for try await count in group { all.append(count) }
            return all
        }
        #expect(results == [5_000, 5_000])
    }
}
