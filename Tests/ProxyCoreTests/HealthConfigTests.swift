import NIOCore
import ProxyCore
import Testing



/// Eight lines; text appended to it continues the pool `rooms` (indent pool keys by 4 spaces), from line 9 on.
private func pool(_ yaml: String) throws -> PoolConfig {
    try #require(try ConfigLoader.parse(yaml: yaml, file: "test.yaml").pool(named: "rooms"))
}

@Suite("Health, passive and discovery configuration")
struct HealthConfigTests {
    // MARK: Valid

    @Test("every key lands in the model")
    func fullPool() throws {
        let yaml = minimal + """
                health_check:
                  path: /ready?deep=1
                  interval: 500ms
                  timeout: 200ms
                  rise: 1
                  fall: 4
                  expect_status: [200, 3xx]
                passive:
                  consecutive_failures: 2
                  count_5xx: true
                  ejection_time: 1s
                  max_ejection_time: 30s
                discovery:
                  dns:
                    name: app.internal
                    port: 3000
                    interval: 2s

            """
        let rooms = try pool(yaml)
        #expect(
            rooms.healthCheck
                == HealthCheckConfig(
                    path: "/ready?deep=1", interval: .milliseconds(500), timeout: .milliseconds(200), rise: 1, fall: 4,
                    expectStatus: StatusSet([200...200, 300...399])))
        #expect(
            rooms.passive
                == PassiveConfig(consecutiveFailures: 2, count5xx: true, ejectionTime: .seconds(1), maxEjectionTime: .seconds(30)))
        #expect(rooms.discovery == DiscoveryConfig(dns: DNSDiscoveryConfig(name: "app.internal", port: 3000, interval: .seconds(2))))
        #expect(rooms.backends.map(\.id) == ["a"])
    }

    @Test("absent sections are off; empty sections take the documented defaults")
    func defaults() throws {
        let absent = try pool(minimal)
        #expect(absent.healthCheck == nil && absent.passive == nil && absent.discovery == nil)

        let empty = try pool(minimal + "    health_check: {}\n    passive:\n")
        #expect(empty.healthCheck == HealthCheckConfig())
        #expect(
            empty.healthCheck
                == HealthCheckConfig(
                    path: "/healthz", interval: .seconds(5), timeout: .seconds(2), rise: 2, fall: 3,
                    expectStatus: StatusSet([200...200])))
        #expect(empty.passive == PassiveConfig(consecutiveFailures: 5, count5xx: false, ejectionTime: .seconds(10), maxEjectionTime: .minutes(5)))

        let dns = try pool(minimal + "    discovery: {dns: {name: localhost, port: 3000}}\n")
        #expect(dns.discovery?.dns.interval == .seconds(5))
    }

    @Test("a pool may have discovery and no static backends")
    func discoveryOnly() throws {
        let yaml = """
            listeners: [{port: 80, pool: app}]
            pools:
              app:
                discovery: {dns: {name: app.internal, port: 3000}}
            """
        let app = try #require(try ConfigLoader.parse(yaml: yaml, file: "test.yaml").pool(named: "app"))
        #expect(app.backends.isEmpty)
        #expect(app.discovery?.dns.name == "app.internal")
    }

    @Test("expect_status takes a code, a class or a list of both")
    func expectStatusForms() throws {
        func statuses(_ value: String) throws -> StatusSet? {
            try pool(minimal + "    health_check: {expect_status: \(value)}\n").healthCheck?.expectStatus
        }
        #expect(try statuses("204") == StatusSet([204...204]))
        #expect(try statuses("2xx") == StatusSet([200...299]))
        #expect(try statuses("\"5XX\"") == StatusSet([500...599]))
        #expect(try statuses("[200, 204, 3xx]") == StatusSet([200...200, 204...204, 300...399]))
        let set = try #require(try statuses("[2xx, 404]"))
        #expect(set.contains(200) && set.contains(299) && set.contains(404))
        #expect(!set.contains(300) && !set.contains(403))
    }

    @Test("a shorter interval shrinks the default timeout with it")
    func defaultTimeoutFollowsInterval() throws {
        let check = try pool(minimal + "    health_check: {interval: 1s}\n").healthCheck
        #expect(check?.timeout == .seconds(1))
        let explicit = try pool(minimal + "    health_check: {interval: 1s, timeout: 1s}\n").healthCheck
        #expect(explicit?.timeout == .seconds(1))
    }

    @Test("max_ejection_time defaults to at least ejection_time")
    func maxEjectionDefault() throws {
        #expect(try pool(minimal + "    passive: {ejection_time: 10m}\n").passive?.maxEjectionTime == .minutes(10))
        #expect(try pool(minimal + "    passive: {ejection_time: 1s}\n").passive?.maxEjectionTime == .minutes(5))
    }

    // MARK: Errors

    @Test("an unknown key in each new section suggests the known one")
    func unknownKeys() {
        #expect(
            errors(in: minimal + "    helth_check: {}\n") == [
                error(line: 9, column: 5, path: "pools.rooms.helth_check", "unknown key 'helth_check' (did you mean 'health_check'?)")
            ])
        #expect(
            errors(in: minimal + "    health_check:\n      intervall: 5s\n") == [
                error(line: 10, column: 7, path: "pools.rooms.health_check.intervall", "unknown key 'intervall' (did you mean 'interval'?)")
            ])
        #expect(
            errors(in: minimal + "    passive:\n      count5xx: true\n") == [
                error(line: 10, column: 7, path: "pools.rooms.passive.count5xx", "unknown key 'count5xx' (did you mean 'count_5xx'?)")
            ])
        #expect(
            errors(in: minimal + "    discovery:\n      srv: x\n") == [
                error(line: 10, column: 7, path: "pools.rooms.discovery.srv", "unknown key 'srv' (expected one of: dns)"),
                error(line: 10, column: 7, path: "pools.rooms.discovery", "missing required key 'dns'"),
            ])
    }

    @Test("bad health_check values are reported at the value")
    func badHealthCheckValues() {
        let cases: [(String, ConfigError)] = [
            ("interval: 5", error(line: 10, column: 17, path: "pools.rooms.health_check.interval", "expected a duration like 5s or 300ms, got '5'")),
            ("interval: 0s", error(line: 10, column: 17, path: "pools.rooms.health_check.interval", "must be greater than 0s, got '0s'")),
            ("timeout: 10s", error(line: 10, column: 16, path: "pools.rooms.health_check.timeout", "must not be longer than interval (5s), got '10s'")),
            ("rise: 0", error(line: 10, column: 13, path: "pools.rooms.health_check.rise", "must be at least 1, got 0")),
            ("fall: two", error(line: 10, column: 13, path: "pools.rooms.health_check.fall", "expected an integer, got 'two'")),
            ("path: healthz", error(line: 10, column: 13, path: "pools.rooms.health_check.path", "expected a request path starting with '/', got 'healthz'")),
            ("expect_status: 700", error(line: 10, column: 22, path: "pools.rooms.health_check.expect_status", "expected a status code (100 to 599) or a class like 2xx, got '700'")),
            ("expect_status: 6xx", error(line: 10, column: 22, path: "pools.rooms.health_check.expect_status", "expected a status code (100 to 599) or a class like 2xx, got '6xx'")),
            ("expect_status: ok", error(line: 10, column: 22, path: "pools.rooms.health_check.expect_status", "expected a status code (100 to 599) or a class like 2xx, got 'ok'")),
            ("expect_status: []", error(line: 10, column: 22, path: "pools.rooms.health_check.expect_status", "expected at least one status code or class")),
            ("expect_status: [200, 20]", error(line: 10, column: 28, path: "pools.rooms.health_check.expect_status[1]", "expected a status code (100 to 599) or a class like 2xx, got '20'")),
            ("expect_status: {a: 1}", error(line: 10, column: 22, path: "pools.rooms.health_check.expect_status", "expected a status code (100 to 599) or a class like 2xx, got a mapping")),
        ]
        for (line, expected) in cases {
            #expect(errors(in: minimal + "    health_check:\n      \(line)\n") == [expected], "\(line)")
        }
        #expect(
            errors(in: minimal + "    health_check: 5s\n") == [
                error(line: 9, column: 19, path: "pools.rooms.health_check", "expected a mapping of keys to values, got '5s'")
            ])
    }

    @Test("bad passive values are reported at the value")
    func badPassiveValues() {
        let cases: [(String, ConfigError)] = [
            ("consecutive_failures: -1", error(line: 10, column: 29, path: "pools.rooms.passive.consecutive_failures", "must be at least 0, got -1")),
            ("count_5xx: maybe", error(line: 10, column: 18, path: "pools.rooms.passive.count_5xx", "expected true or false, got 'maybe'")),
            ("ejection_time: 0s", error(line: 10, column: 22, path: "pools.rooms.passive.ejection_time", "must be greater than 0s, got '0s'")),
            ("max_ejection_time: 1s", error(line: 10, column: 26, path: "pools.rooms.passive.max_ejection_time", "must not be shorter than ejection_time (10s), got '1s'")),
            ("max_ejection_time: 1", error(line: 10, column: 26, path: "pools.rooms.passive.max_ejection_time", "expected a duration like 5s or 300ms, got '1'")),
        ]
        for (line, expected) in cases {
            #expect(errors(in: minimal + "    passive:\n      \(line)\n") == [expected], "\(line)")
        }
        #expect(errors(in: minimal + "    passive: {consecutive_failures: 0}\n").isEmpty)
    }

    @Test("bad discovery values are reported at the value")
    func badDiscoveryValues() {
        #expect(
            errors(in: minimal + "    discovery:\n      dns:\n        name: app.internal\n") == [
                error(line: 11, column: 9, path: "pools.rooms.discovery.dns", "missing required key 'port'")
            ])
        #expect(
            errors(in: minimal + "    discovery:\n      dns:\n        name: app.internal:80\n        port: 80\n") == [
                error(line: 11, column: 15, path: "pools.rooms.discovery.dns.name", "expected a DNS name such as app.internal, got 'app.internal:80'")
            ])
        #expect(
            errors(in: minimal + "    discovery:\n      dns:\n        name: app\n        port: 0\n") == [
                error(line: 12, column: 15, path: "pools.rooms.discovery.dns.port", "must be between 1 and 65535, got 0")
            ])
        #expect(
            errors(in: minimal + "    discovery:\n      dns:\n        name: app\n        port: 80\n        interval: soon\n") == [
                error(line: 13, column: 19, path: "pools.rooms.discovery.dns.interval", "expected a duration like 5s or 300ms, got 'soon'")
            ])
    }

    @Test("a pool with discovery needs a name usable in backend ids")
    func discoveryPoolName() {
        let yaml = """
            listeners: [{port: 80, pool: my app}]
            pools:
              my app:
                discovery: {dns: {name: app, port: 80}}
            """
        #expect(
            errors(in: yaml) == [
                error(
                    line: 4, column: 16, path: "pools.my app.discovery",
                    "a pool with discovery needs a name of letters, digits, '.', '_', ':' and '-' (it prefixes the ids of discovered backends), got 'my app'"
                )
            ])
    }
}
