import Foundation
import LuaRouting
import NIOCore
import NIOHTTP1
import ProxyCore
import Testing

@Suite struct DecisionTests {
    @Test func keyed() throws {
        let p = try policy(#"function route(req) return { key = "room:" .. req.path:sub(2), pool = "rooms", place = "rendezvous" } end"#)
        #expect(try p.route(request(.GET, "/abc")) == RouteDecision(action: .forward(.keyed(key: "room:abc", pool: "rooms", placement: "rendezvous"))))
        let q = try policy(#"function route(req) return { key = "k", pool = "rooms" } end"#)
        #expect(try q.route(request()) == RouteDecision(action: .forward(.keyed(key: "k", pool: "rooms", placement: nil))))
    }

    @Test func backendAndPool() throws {
        let p = try policy(#"function route(req) if req.path == "/b" then return { backend = "r1" } end return { pool = "web" } end"#)
        #expect(try p.route(request(.GET, "/b")) == .backend("r1"))
        #expect(try p.route(request(.GET, "/")) == .pool("web"))
    }

    @Test func respond() throws {
        let p = try policy(#"""
            function route(req)
                return { respond = { status = 403, headers = { ["content-type"] = "text/plain", ["retry-after"] = 5 }, body = "no" } }
            end
            """#)
        let expected = LocalResponse(
            status: .forbidden,
            headers: [Header("content-type", "text/plain"), Header("retry-after", "5")],
            body: "no"
        )
        #expect(try p.route(request()) == .respond(expected))
        let minimal = try policy(#"function route(req) return { respond = { status = 204 } } end"#)
        #expect(try minimal.route(request()) == .respond(LocalResponse(status: .noContent)))
    }

    @Test func needBodyThenBody() throws {
        let p = try policy(#"""
            function route(req)
                if req.body == nil then return { need_body = true } end
                local doc = proxy.json.decode(req.body)
                return { key = doc.room, pool = "rooms" }
            end
            """#)
        #expect(try p.route(request(.POST, "/join")).action == .needBody)
        #expect(try p.route(request(.POST, "/join", body: #"{"room":"r-7"}"#)).action == .forward(.keyed(key: "r-7", pool: "rooms", placement: nil)))
    }

    @Test func rewritesAndExtras() throws {
        let p = try policy(#"""
            function route(req)
                return { pool = "web", set_headers = { ["x-b"] = "2", ["x-a"] = "1" },
                         remove_headers = { "Cookie", "x-debug" }, path = "/v2" .. req.path, response_body = true }
            end
            """#)
        let result = try p.decide(request(.GET, "/items"))
        #expect(result.decision == RouteDecision(
            action: .forward(.pool("web")),
            setHeaders: [Header("x-a", "1"), Header("x-b", "2")],
            removeHeaders: ["cookie", "x-debug"],
            path: "/v2/items"
        ))
        #expect(result.extras.wantsResponseBody)
        #expect(p.lastExtras.wantsResponseBody)
        let plain = try policy(#"function route(req) return { pool = "web" } end"#)
        #expect(try plain.decide(request()).extras == LuaDecisionExtras(wantsResponseBody: false))
    }
}

@Suite struct RequestTableTests {
    @Test func fields() throws {
        let p = try policy(#"""
            function route(req)
                local parts = { req.method, req.path, req.query, req.host, req.scheme, req.client_ip,
                                tostring(req.is_upgrade), req.listener, tostring(req.body) }
                return { respond = { status = 200, body = table.concat(parts, "|") } }
            end
            """#)
        #expect(try p.body(request(.PUT, "/a/b?x=1&y", upgrade: true)) == "PUT|/a/b|x=1&y|example.test|https|203.0.113.9|true|public|nil")
        #expect(try p.body(request(.POST, "/", body: "hello")) == "POST|/||example.test|https|203.0.113.9|false|public|hello")
    }

    @Test func args() throws {
        let p = try policy(#"""
            function route(req)
                local a, all = req.args, req.args_all
                local out = a.name .. "|" .. a.tag .. "|" .. #all.tag .. ":" .. all.tag[1] .. "," .. all.tag[2]
                    .. "|" .. a.flag .. "|" .. tostring(a.missing) .. "|" .. a["sp ace"]
                return { respond = { status = 200, body = out } }
            end
            """#)
        #expect(try p.body(request(.GET, "/?name=J%C3%BCrgen+M&tag=a&tag=b&flag&sp%20ace=%2F")) == "Jürgen M|b|2:a,b||nil|/")
        // Malformed escapes stay as they are; empty pairs are skipped.
        #expect(try p.body(request(.GET, "/?name=%zz%4&tag=%41&&tag=%&flag=1&sp%20ace=x%")) == "%zz%4|%|2:A,%|1|nil|x%")
        let empty = try policy(#"function route(req) return { respond = { status = 200, body = tostring(next(req.args)) } } end"#)
        #expect(try empty.body(request(.GET, "/")) == "nil")
    }

    @Test func headers() throws {
        let p = try policy(#"""
            function route(req)
                local h = req.headers
                local list = req.header_list("X-Multi")
                local cookies = req.header_list("set-cookie")
                local out = table.concat({ h["x-tenant"], h["x-multi"], #list, tostring(list[2]), tostring(h["set-cookie"]),
                    #cookies, tostring(cookies[2]), #req.headers_all["x-tenant"], #req.header_list("absent"),
                    tostring(h["X-Tenant"]) }, "|")
                return { respond = { status = 200, body = out } }
            end
            """#)
        let headers = [("X-Tenant", "acme"), ("x-multi", "1"), ("X-Multi", "2"), ("Set-Cookie", "a=1"), ("set-cookie", "b=2")]
        #expect(try p.body(request(headers: headers)) == "acme|1, 2|2|2|a=1|2|b=2|1|0|nil")
        // Without repeated names, headers_all is derived lazily.
        #expect(try p.body(request(headers: [("X-Tenant", "acme"), ("X-Multi", "1")])) == "acme|1|1|nil|nil|0|nil|1|0|nil")
    }

    @Test func requestTableIsFreshEachCall() throws {
        let p = try policy(#"""
            local previous
            function route(req)
                local seen = previous and previous.args.n or "none"
                previous = req
                return { respond = { status = 200, body = seen .. "/" .. req.args.n } }
            end
            """#)
        #expect(try p.body(request(.GET, "/?n=1")) == "none/1")
        #expect(try p.body(request(.GET, "/?n=2")) == "1/2")
    }

    @Test func pairsListsEveryFieldAlthoughMostAreFilledOnFirstRead() throws {
        let p = try policy(#"""
            function route(req)
                local names = {}
                for k, v in pairs(req) do
                    if type(v) ~= "function" then names[#names + 1] = k end
                end
                table.sort(names)
                return { respond = { status = 200, body = table.concat(names, ",") .. "|" .. req.headers["x-tenant"] } }
            end
            """#)
        #expect(try p.body(request(headers: [("X-Tenant", "acme")]))
            == "client_ip,headers,host,is_upgrade,listener,method,path,query,scheme|acme")
    }

    @Test func aRequestKeptPastItsCallKeepsWhatWasReadAndRefusesTheRest() throws {
        let p = try policy(#"""
            local previous
            function route(req)
                local out = "none"
                if previous then
                    out = previous.path .. " " .. previous.host
                    if req.path == "/late" then out = previous.scheme end
                end
                previous = req
                local _ = req.host
                return { respond = { status = 200, body = out } }
            end
            """#)
        #expect(try p.body(request(.GET, "/one")) == "none")
        #expect(try p.body(request(.GET, "/two")) == "/one example.test")
        // `scheme` of the kept request was never read during its call: an error naming the field, not another
        // request's value.
        #expect {
            try p.body(request(.GET, "/late"))
        } throws: { error in
            guard case .runtime(let message) = error as? LuaScriptError else { return false }
            return message.contains("req.scheme was first read after the call")
        }
    }
}

@Suite struct ErrorTests {
    @Test func syntaxErrorNamesFileAndLine() throws {
        let path = scriptFile("function route(req)\n  return {\nend\n", name: "broken.lua")
        #expect {
            _ = try LuaRoutingPolicy(scriptPath: path, environment: testEnvironment, logger: CapturedLog().logger)
        } throws: { error in
            guard case .syntax(let message) = error as? LuaScriptError else { return false }
            return message.hasPrefix("\(path):3:") && (error as! LuaScriptError).description == message
        }
    }

    @Test func unreadableAndMissingRoute() throws {
        #expect(throws: LuaScriptError.unreadable("/nonexistent/x.lua: No such file or directory")) {
            _ = try LuaRoutingPolicy(scriptPath: "/nonexistent/x.lua", environment: testEnvironment, logger: CapturedLog().logger)
        }
        let path = scriptFile("function rout(req) end")
        #expect(throws: LuaScriptError.missingFunction("\(path): no global function 'route'")) {
            _ = try LuaRoutingPolicy(scriptPath: path, environment: testEnvironment, logger: CapturedLog().logger)
        }
        // An error in the main chunk fails the load.
        #expect(throws: LuaScriptError.self) { _ = try policy("error('boom')\nfunction route() end") }
    }

    @Test func runtimeErrorNamesFileAndLine() throws {
        let path = scriptFile("function route(req)\n  local t = nil\n  return t.x\nend\n", name: "oops.lua")
        let p = try LuaRoutingPolicy(scriptPath: path, environment: testEnvironment, logger: CapturedLog().logger)
        #expect {
            _ = try p.route(request())
        } throws: { error in
            guard case .runtime(let message) = error as? LuaScriptError else { return false }
            return message.hasPrefix("\(path):3: attempt to index a nil value")
        }
        let q = try policy("function route(req) error({}) end")
        #expect(throws: LuaScriptError.runtime("(error object is a table value)")) { try q.route(request()) }
        // Errors from proxy.* carry the caller's position.
        let path2 = scriptFile("function route(req)\n  proxy.owner(42)\nend\n", name: "callback.lua")
        let r = try LuaRoutingPolicy(scriptPath: path2, environment: testEnvironment, logger: CapturedLog().logger)
        #expect(throws: LuaScriptError.runtime("\(path2):2: proxy.owner: key must be a string, got number")) {
            try r.route(request())
        }
    }

    @Test(arguments: [
        ("return nil", "route must return a table, got nil"),
        ("return 'web'", "route must return a table, got string"),
        ("return {}", "the decision names no action (expected key+pool, backend, pool, respond or need_body)"),
        ("return { pool = 'web', pol = 'x' }", "unknown field 'pol'"),
        ("return { 'web' }", "decision fields are named, found a number key (1)"),
        ("return { key = 'k', backend = 'b', pool = 'p' }", "key and backend are exclusive"),
        ("return { key = 'k' }", "key needs a pool to place it on"),
        ("return { key = 1, pool = 'p' }", "key must be a string, got number"),
        ("return { key = '', pool = 'p' }", "key must not be empty"),
        ("return { key = 'k', pool = 'p', place = 'nearest' }", "unknown place 'nearest' (known: bounded-load, jump, ketama, least-connections, least-keys, maglev, power-of-two-choices, random, rendezvous, weighted-round-robin)"),
        ("return { pool = 'p', place = 'jump' }", "place applies only with key"),
        ("return { backend = 'b', pool = 'p' }", "backend and pool are exclusive (a backend id names one backend)"),
        ("return { respond = { status = 700 } }", "respond.status must be in 100...599, got 700"),
        ("return { respond = { status = 200.5 } }", "respond.status must be an integer, got number"),
        ("return { respond = { body = 'x' } }", "respond needs a status"),
        ("return { respond = { status = 200, bdy = 'x' } }", "unknown field respond.'bdy'"),
        ("return { respond = 404 }", "respond must be a table, got number"),
        ("return { respond = { status = 200 }, pool = 'web' }", "respond cannot be combined with pool"),
        ("return { respond = { status = 200 }, path = '/x' }", "set_headers, remove_headers and path apply to forwarded requests, not to respond"),
        ("return { respond = { status = 200, headers = { ['x-a'] = 'a\\r\\nx-b: b' } } }", "respond.headers.x-a holds a CR, LF or NUL"),
        ("return { pool = 'web', set_headers = { ['bad name'] = 'v' } }", "set_headers: 'bad name' is not a valid header name"),
        ("return { pool = 'web', set_headers = { ['x-a'] = true } }", "set_headers.x-a must be a string or a number, got boolean"),
        ("return { pool = 'web', remove_headers = { a = 'x' } }", "remove_headers must be a list (keys 1...n)"),
        ("return { pool = 'web', remove_headers = { 1 } }", "remove_headers[1] is not a valid header name"),
        ("return { pool = 'web', path = 'x' }", "path must start with '/' and hold no spaces, control characters, '?' or '#'"),
        ("return { pool = 'web', path = '/a?b' }", "path must start with '/' and hold no spaces, control characters, '?' or '#'"),
        ("return { need_body = 'yes' }", "need_body must be a boolean, got string"),
        ("return { need_body = true, pool = 'web' }", "need_body cannot be combined with key, backend or pool"),
        ("return { pool = 'web', response_body = 1 }", "response_body must be a boolean, got number"),
    ])
    func badDecision(_ body: String, _ reason: String) throws {
        let p = try policy("function route(req) \(body) end")
        #expect(throws: LuaScriptError.badDecision(reason)) { try p.route(request()) }
        // The state stays usable.
        #expect(throws: LuaScriptError.badDecision(reason)) { try p.route(request()) }
    }

    /// `pool` and `place` are cached by the Lua string they came from. Whatever the script returns next (another
    /// constant, a string built at run time, a string made after the cached one was collected, an invalid value), the
    /// decision must be that call's.
    @Test func repeatedPoolAndPlaceStringsAreReadAfreshWhenTheyChange() throws {
        let p = try policy(#"""
            local places = { "rendezvous", "jump", "maglev" }
            function route(req)
                local n = tonumber(req.path:sub(2))
                if n % 7 == 6 then return { key = "k", pool = "p", place = "near" .. "est" } end
                -- Three pool names in turn, each built at run time (a new string object per call, the last
                -- call's collected here), with the place changing with them.
                collectgarbage()
                local pool = "pool-" .. (n % 3)
                return { key = "k" .. n, pool = pool, place = places[n % 3 + 1] }
            end
            """#)
        for n in 0..<60 {
            if n % 7 == 6 {
                #expect(throws: LuaScriptError.self) { try p.route(request(.GET, "/\(n)")) }
                continue
            }
            let expected = RouteDecision(action: .forward(.keyed(
                key: "k\(n)", pool: "pool-\(n % 3)", placement: ["rendezvous", "jump", "maglev"][n % 3])))
            #expect(try p.route(request(.GET, "/\(n)")) == expected, "call \(n)")
        }
        // A new string on every call, made after a full collection freed the previous call's: its memory is reused
        // (the allocator hands back the chunk just freed), so an address alone would often name the wrong string.
        let r = try policy(#"""
            local n = -1
            function route(req)
                collectgarbage()
                n = n + 1
                -- Several strings of the pool's size, made right after the collection: which one gets the last
                -- pool's memory depends on the allocator, so the pool is each of them in turn.
                local made = {}
                for i = 1, 4 do made[i] = string.format("p%05d", n * 4 + i) end
                return { key = "k", pool = made[n % 4 + 1] }
            end
            """#)
        for n in 0..<300 {
            let number = String(n * 4 + n % 4 + 1)
            let pool = "p" + String(repeating: "0", count: 5 - number.count) + number
            #expect(try r.route(request(.GET, "/\(n)")) == RouteDecision(action: .forward(.keyed(key: "k", pool: pool, placement: nil))), "call \(n)")
        }
        // The same constant every time: served from the cache, still right.
        let q = try policy(#"function route(req) return { key = req.path, pool = "rooms", place = "jump" } end"#)
        for n in 0..<3 {
            #expect(try q.route(request(.GET, "/\(n)")) == RouteDecision(action: .forward(.keyed(key: "/\(n)", pool: "rooms", placement: "jump"))))
        }
    }

    @Test func needBodyWhenBodyIsPresent() throws {
        let p = try policy("function route(req) return { need_body = true } end")
        #expect(throws: LuaScriptError.badDecision("need_body returned although req.body is already present")) {
            try p.route(request(.POST, "/", body: "x"))
        }
    }
}

@Suite struct OnResponseTests {
    @Test func claim() throws {
        let p = try policy(#"""
            function route(req) return { pool = "rooms", response_body = true } end
            function on_response(req, res)
                if res.status == 201 and res.headers["x-room"] then
                    return { claim = "room:" .. res.headers["x-room"] .. ":" .. req.path .. ":" .. (res.body or "") .. ":" .. #res.header_list("set-cookie") }
                end
                if res.status == 500 then return 42 end
                if res.status == 501 then return { clam = "x" } end
                return nil
            end
            """#)
        #expect(p.hasOnResponse)
        var headers = HTTPHeaders([("X-Room", "blue"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
        #expect(try p.onResponse(request: request(.POST, "/rooms"), status: 201, headers: headers, body: "made") == "room:blue:/rooms:made:2")
        headers = HTTPHeaders()
        #expect(try p.onResponse(request: request(), status: 200, headers: headers, body: nil) == nil)
        #expect(throws: LuaScriptError.badDecision("on_response must return nil or a table, got number")) {
            try p.onResponse(request: request(), status: 500, headers: headers, body: nil)
        }
        #expect(throws: LuaScriptError.badDecision("on_response: unknown field 'clam'")) {
            try p.onResponse(request: request(), status: 501, headers: headers, body: nil)
        }
    }

    @Test func theRequestHasItsLazyFieldsAndTheResponseDoesNot() throws {
        let p = try policy(#"""
            function route(req) return { pool = "rooms" } end
            function on_response(req, res)
                return { claim = req.host .. "|" .. req.headers["x-tenant"] .. "|" .. tostring(res.host) .. "|" .. tostring(res.query) }
            end
            """#)
        #expect(try p.onResponse(request: request(headers: [("X-Tenant", "acme")]), status: 200, headers: HTTPHeaders(), body: nil)
            == "example.test|acme|nil|nil")
    }

    @Test func absent() throws {
        let p = try policy(#"function route(req) return { pool = "web" } end"#)
        #expect(!p.hasOnResponse)
        #expect(try p.onResponse(request: request(), status: 200, headers: HTTPHeaders(), body: nil) == nil)
    }
}
