import Foundation
import LuaRouting
import NIOCore
import NIOHTTP1
import ProxyCore
import Testing

/// A script whose `route` runs the Lua code in the `x-code` header and answers with its result.
private let probe = #"""
    function route(req)
        local f = assert(load(req.headers["x-code"]))
        return { respond = { status = 200, body = tostring(f()) } }
    end
    """#

private func run(_ policy: LuaRoutingPolicy, _ code: String) throws -> String? {
    try policy.body(request(headers: [("x-code", code)]))
}

/// The state answers a plain call after a failure.
private func expectUsable(_ policy: LuaRoutingPolicy) throws {
    #expect(try run(policy, "return 1 + 1") == "2")
}

@Suite struct SandboxTests {
    @Test func missingLibrariesAndFunctions() throws {
        let p = try policy(probe)
        for name in [
            "io", "package", "require", "debug", "dofile", "loadfile", "string.dump", "os.execute", "os.exit",
            "os.getenv", "os.remove", "os.rename", "os.tmpname", "os.date", "module", "setfenv",
        ] {
            #expect(try run(p, "return \(name)") == "nil", "\(name) should be absent")
        }
        for name in ["os.time", "os.clock", "string.format", "table.sort", "math.floor", "utf8.char", "coroutine.wrap", "pcall", "load"] {
            #expect(try run(p, "return type(\(name))") == "function", "\(name) should be present")
        }
    }

    @Test(arguments: [
        "os.execute('true')",
        "io.open('/etc/passwd')",
        "require('os')",
        "dofile('/etc/passwd')",
        "debug.getregistry()",
        "string.dump(print)",
    ])
    func escapesFail(_ code: String) throws {
        let p = try policy(probe)
        #expect {
            try run(p, code)
        } throws: { error in
            guard case .runtime(let message) = error as? LuaScriptError else { return false }
            return message.contains("attempt to call a nil value") || message.contains("attempt to index a nil value")
        }
        try expectUsable(p)
    }

    @Test func binaryChunksAreRefused() throws {
        let p = try policy(probe)
        // A binary chunk starts with ESC "Lua"; `load` only accepts text, whatever mode the script asks for.
        #expect(try run(p, #"local f, err = load("\27Lua\84\0\25\147\r\n\26\n", "x", "b"); return err"#)?.contains("attempt to load a binary chunk") == true)
        #expect(try run(p, #"local f, err = load("\27LuaT"); return tostring(f) .. " " .. err"#)?.hasPrefix("nil ") == true)
        // With a reader function too.
        #expect(try run(p, #"local done; local f, err = load(function() if done then return nil end done = true return "\27Lua" end); return err"#)?.contains("binary chunk") == true)
        // Text chunks load, with the sandbox's globals by default or a given env.
        #expect(try run(p, #"return load("return os.execute")()"#) == "nil")
        #expect(try run(p, #"return load("return x", "c", "t", { x = 5 })()"#) == "5")
        try expectUsable(p)
    }

    @Test func memoryBombHitsTheMemoryLimit() throws {
        let p = try policy(probe, limits: LuaLimits(instructionLimit: 0, memoryLimit: 2 << 20))
        #expect(throws: LuaScriptError.memoryLimit) { try run(p, #"return #string.rep("x", 1 << 30)"#) }
        #expect(throws: LuaScriptError.memoryLimit) {
            try run(p, #"local t = {} for i = 1, 1e9 do t[i] = ("x"):rep(64) .. i end"#)
        }
        // Caught by the script itself, the error is still a memory limit for the host when it surfaces.
        try expectUsable(p)
        #expect(p.memoryInUse < 1 << 20)
        // A global keeping memory stays charged, but the rest of the budget remains usable.
        #expect(try run(p, #"big = ("y"):rep(1 << 19) return #big"#) == "524288")
        try expectUsable(p)
    }

    @Test func endlessLoopHitsTheInstructionLimit() throws {
        let p = try policy(probe, limits: LuaLimits(instructionLimit: 100_000, memoryLimit: 4 << 20))
        #expect(throws: LuaScriptError.instructionLimit) { try run(p, "while true do end") }
        try expectUsable(p)
        // pcall cannot swallow the limit.
        #expect(throws: LuaScriptError.instructionLimit) {
            try run(p, "while true do pcall(function() while true do end end) end")
        }
        // Nor can short coroutines that each stay under one hook period.
        #expect(throws: LuaScriptError.instructionLimit) {
            try run(p, "while true do coroutine.wrap(function() for i = 1, 50 do end end)() end")
        }
        // The budget is per call.
        for _ in 0..<5 {
            #expect(try run(p, "local n = 0 for i = 1, 20000 do n = n + i end return n") == "200010000")
        }
        try expectUsable(p)
    }

    @Test func collectorCannotBeSubverted() throws {
        let p = try policy(probe)
        #expect {
            try run(p, "setmetatable({}, { __gc = function() while true do end end })")
        } throws: { error in
            (error as? LuaScriptError).map { "\($0)".contains("__gc metamethods are not available") } ?? false
        }
        #expect {
            try run(p, "collectgarbage('stop')")
        } throws: { error in
            (error as? LuaScriptError).map { "\($0)".contains("collectgarbage option 'stop'") } ?? false
        }
        #expect(try run(p, "return type(collectgarbage('count'))") == "number")
        #expect(try run(p, "return getmetatable(setmetatable({}, { __index = {} })) ~= nil") == "true")
        try expectUsable(p)
    }

    @Test func printGoesToTheLog() throws {
        let log = CapturedLog()
        let p = try policy(probe, log: log)
        _ = try run(p, "print('hello', 1, nil, true) return 1")
        #expect(log.messages.contains { $0.0 == .info && $0.1 == "hello\t1\tnil\ttrue" })
    }

    @Test func luaScriptEval() throws {
        let script = try LuaScript(path: scriptFile("x = 40"), limits: LuaLimits())
        try script.run()
        #expect(try script.eval("return x + 2") == "42")
        #expect(try script.eval("return io") == nil)
        #expect(throws: LuaScriptError.self) { try script.eval("return (") }
    }
}
