import Foundation
import ProxyCore
import Testing

/// `ott-proxy route` (dry run of a script) and `ott-proxy check` on scripts, through the built executable.
@Suite struct RouteCommandTests {
    /// A configuration with three backends (nothing needs to listen: `route` and `check` do no I/O) and `script`.
    static func setUp(script: String) throws -> (ScriptDirectory, config: String, script: String) {
        let directory = try ScriptDirectory()
        let scriptPath = try directory.write("rooms.lua", script)
        let config = try directory.write(
            "proxy.yaml",
            """
            listeners:
              - name: public
                address: 127.0.0.1
                port: 8080
                pool: rooms
                routing:
                  script: rooms.lua
            pools:
              rooms:
                backends:
                  - id: r1
                    address: 127.0.0.1:9001
                  - id: r2
                    address: 127.0.0.1:9002
                  - id: r3
                    address: 127.0.0.1:9003

            """)
        return (directory, config, scriptPath)
    }

    static let roomsScript = """
        function route(req)
            local tenant = req.headers["x-tenant"]
            if tenant then return { backend = tenant, set_headers = { ["x-seen"] = tenant } } end
            local room = req.path:match("^/rooms/([^/]+)")
            if room then return { key = "room:" .. room, pool = "rooms", place = "rendezvous" } end
            return { pool = "rooms" }
        end
        """

    @Test func routePrintsTheKeyedDecisionAndItsBackend() async throws {
        let (directory, config, _) = try Self.setUp(script: Self.roomsScript)
        defer { directory.remove() }
        let outcome = try await CLITests.run(["route", "--config", config, "GET", "http://h/rooms/x"])
        #expect(outcome.status == 0, "stderr: \(outcome.stderr)")
        #expect(outcome.stdout.contains("decision: key 'room:x' in pool 'rooms', place rendezvous"), "\(outcome.stdout)")
        let expected = ConsistentHashing.rendezvous(key: "room:x", backends: [("r1", 1), ("r2", 1), ("r3", 1)])!
        #expect(outcome.stdout.contains("backend: \(expected) ("), "\(outcome.stdout)")
    }

    @Test func headersGivenWithDashHReachTheScript() async throws {
        let (directory, config, _) = try Self.setUp(script: Self.roomsScript)
        defer { directory.remove() }
        for tenant in ["r2", "r3"] {
            let outcome = try await CLITests.run(
                ["route", "--config", config, "GET", "http://h/rooms/x", "-H", "X-Tenant: \(tenant)"])
            #expect(outcome.status == 0, "stderr: \(outcome.stderr)")
            #expect(outcome.stdout.contains("decision: backend '\(tenant)'"), "\(outcome.stdout)")
            #expect(outcome.stdout.contains("set header: x-seen: \(tenant)"), "\(outcome.stdout)")
            #expect(outcome.stdout.contains("backend: \(tenant) (127.0.0.1:900"), "\(outcome.stdout)")
        }
    }

    @Test func bodyFileFeedsANeedBodyScript() async throws {
        let script = """
            function route(req)
                if req.body == nil then return { need_body = true } end
                local doc = proxy.json.decode(req.body)
                return { backend = doc.backend }
            end
            """
        let (directory, config, _) = try Self.setUp(script: script)
        defer { directory.remove() }
        let body = try directory.write("body.json", #"{"backend":"r3","more":[1,2,3]}"#)
        let outcome = try await CLITests.run(["route", "--config", config, "POST", "/upload", "--body", body])
        #expect(outcome.status == 0, "stderr: \(outcome.stderr)")
        #expect(outcome.stdout.contains("need_body"), "\(outcome.stdout)")
        #expect(outcome.stdout.contains("decision: backend 'r3'"), "\(outcome.stdout)")
        #expect(outcome.stdout.contains("backend: r3 (127.0.0.1:9003)"), "\(outcome.stdout)")
    }

    @Test func checkRejectsAScriptWithASyntaxErrorNamingItsLine() async throws {
        let script = """
            function route(req)
                return { pool = "rooms" }
            end end
            """
        let (directory, config, scriptPath) = try Self.setUp(script: script)
        defer { directory.remove() }
        let outcome = try await CLITests.run(["check", "--config", config])
        #expect(outcome.status == 1)
        #expect(outcome.reason == .exit)
        #expect(outcome.stderr.contains("\(scriptPath):3:"), "stderr: \(outcome.stderr)")
        #expect(!outcome.stdout.contains("is valid"))

        // The same configuration with a good script passes.
        try directory.write("rooms.lua", Self.roomsScript)
        let fixed = try await CLITests.run(["check", "--config", config])
        #expect(fixed.status == 0, "stderr: \(fixed.stderr)")
    }

    @Test func routeWithARuntimeErrorExitsTwo() async throws {
        let script = """
            function route(req)
                local m = nil
                return m.field
            end
            """
        let (directory, config, scriptPath) = try Self.setUp(script: script)
        defer { directory.remove() }
        let outcome = try await CLITests.run(["route", "--config", config, "GET", "/rooms/x"])
        #expect(outcome.status == 2, "stdout: \(outcome.stdout) stderr: \(outcome.stderr)")
        #expect(outcome.reason == .exit)
        #expect(outcome.stdout.contains("routing error"), "\(outcome.stdout)")
        #expect(outcome.stdout.contains("\(scriptPath):3:"), "\(outcome.stdout)")
        #expect(outcome.stdout.contains("500"), "\(outcome.stdout)")
    }
}
