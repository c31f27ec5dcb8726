import Foundation
import NIOCore
import ProxyCore
import Testing

/// The errors `parse` reports for `yaml`, or none when it loads.


/// A valid file, so each error test changes one thing and expects exactly one error.
@Suite("ConfigLoader")
struct ConfigLoaderTests {
    // MARK: Valid files

    @Test("every key of a full file lands in the model")
    func fullFile() throws {
        let yaml = """
            listeners:
              - name: public
                address: 127.0.0.1
                port: 8443
                pool: rooms
                tls:
                  certificate: /etc/ott/cert.pem
                  key: /etc/ott/key.pem
              - port: 8080
                pool: api
            pools:
              rooms:
                balance: least-connections
                backends:
                  - id: room-1
                    address: 10.0.0.1:9001
                    weight: 3
                    region: eu-west
                    tags: [blue, big]
                    max_keys: 500
                    max_connections: 1000
                  - id: "room:2"
                    address: "[::1]:9002"
              api:
                backends: []
            timeouts:
              connect: 2s
              request_header: 500ms
              upstream_response_header: 1m
              idle_keep_alive: 1.5s
              upstream_idle: 30s
              tunnel_idle: 2h
              shutdown_grace: 0s
            limits:
              max_header_bytes: 16KiB
              max_connections: 100
              max_buffered_body: 2MB
              max_idle_upstream_per_backend: 0
            admin:
              address: 0.0.0.0
              port: 9000
              token_env: OTT_PROXY_ADMIN_TOKEN
              metrics_open: false
            logging:
              level: debug
              format: json
              access_log: false
            threads:
              count: 3
              cpu_affinity: auto
              tunnel_relay: false
            """
        let config = try ConfigLoader.parse(yaml: yaml, file: "full.yaml")

        let expected = ProxyConfig(
            listeners: [
                ListenerConfig(
                    name: "public",
                    address: "127.0.0.1",
                    port: 8443,
                    pool: "rooms",
                    tls: TLSConfig(certificatePath: "/etc/ott/cert.pem", keyPath: "/etc/ott/key.pem")
                ),
                ListenerConfig(name: "0.0.0.0:8080", address: "0.0.0.0", port: 8080, pool: "api"),
            ],
            pools: [
                PoolConfig(
                    name: "rooms",
                    balance: .leastConnections,
                    backends: [
                        BackendConfig(
                            id: "room-1",
                            host: "10.0.0.1",
                            port: 9001,
                            weight: 3,
                            region: "eu-west",
                            tags: ["blue", "big"],
                            maxKeys: 500,
                            maxConnections: 1000
                        ),
                        BackendConfig(id: "room:2", host: "::1", port: 9002),
                    ]
                ),
                PoolConfig(name: "api", balance: .roundRobin, backends: []),
            ],
            timeouts: TimeoutsConfig(
                connect: .seconds(2),
                requestHeader: .milliseconds(500),
                upstreamResponseHeader: .minutes(1),
                idleKeepAlive: .milliseconds(1500),
                upstreamIdle: .seconds(30),
                tunnelIdle: .hours(2),
                shutdownGrace: .zero
            ),
            limits: LimitsConfig(
                maxHeaderBytes: 16 * 1024,
                maxConnections: 100,
                maxBufferedBody: 2_000_000,
                maxIdleUpstreamPerBackend: 0
            ),
            admin: AdminConfig(
                address: "0.0.0.0",
                port: 9000,
                token: nil,
                tokenEnv: "OTT_PROXY_ADMIN_TOKEN",
                metricsOpen: false
            ),
            logging: LoggingConfig(level: .debug, format: .json, accessLog: false),
            threads: ThreadsConfig(count: 3, cpuAffinity: .auto, tunnelRelay: false)
        )
        #expect(config == expected)
    }

    @Test("omitted keys take the documented defaults")
    func defaults() throws {
        let config = try ConfigLoader.parse(yaml: minimal, file: "test.yaml")

        #expect(config.listeners == [ListenerConfig(port: 8080, pool: "rooms")])
        #expect(config.listeners[0].name == "0.0.0.0:8080")
        #expect(config.listeners[0].address == "0.0.0.0")
        #expect(config.listeners[0].tls == nil)
        let backend = BackendConfig(id: "a", host: "127.0.0.1", port: 9001)
        #expect(config.pools == [PoolConfig(name: "rooms", balance: .roundRobin, backends: [backend])])
        #expect(backend.weight == 1 && backend.tags.isEmpty && backend.maxKeys == nil)
        #expect(config.timeouts == TimeoutsConfig())
        #expect(config.timeouts.connect == .seconds(5))
        #expect(config.timeouts.tunnelIdle == .hours(1))
        #expect(config.limits == LimitsConfig())
        #expect(config.limits.maxHeaderBytes == 32 * 1024)
        #expect(config.admin == nil)
        #expect(config.logging == LoggingConfig(level: .info, format: .logfmt, accessLog: true))
        #expect(config.threads == ThreadsConfig(count: nil, cpuAffinity: .none, tunnelRelay: true))
        #expect(config.threads.resolvedCount == System.coreCount)
    }

    @Test("threads: a count out of range and an unknown affinity are reported at their values")
    func threadsErrors() {
        #expect(
            errors(in: minimal + "threads:\n  count: 0\n  cpu_affinity: pinned\n") == [
                error(line: 10, column: 10, path: "threads.count", "must be between 1 and 1024, got 0"),
                error(
                    line: 11, column: 17, path: "threads.cpu_affinity",
                    "expected one of none, auto, got 'pinned'"),
            ]
        )
    }

    @Test("threads.tunnel_relay takes a boolean, reported at its value otherwise")
    func tunnelRelayErrors() throws {
        let errors = errors(in: minimal + "threads:\n  tunnel_relay: sometimes\n")
        #expect(errors.count == 1)
        #expect(errors.first?.path == "threads.tunnel_relay")
        #expect(errors.first?.line == 10)
        let off = try ConfigLoader.parse(yaml: minimal + "threads:\n  tunnel_relay: false\n", file: "test.yaml")
        #expect(off.threads.tunnelRelay == false)
    }

    @Test("threads.accept is per_loop unless set, and an unknown value is reported at it with a suggestion")
    func acceptModes() throws {
        #expect(try ConfigLoader.parse(yaml: minimal, file: "test.yaml").threads.accept == .perLoop)
        let one = try ConfigLoader.parse(yaml: minimal + "threads:\n  accept: one_loop\n", file: "test.yaml")
        #expect(one.threads.accept == .oneLoop)
        #expect(
            errors(in: minimal + "threads:\n  accept: one-loop\n") == [
                error(
                    line: 10, column: 11, path: "threads.accept",
                    "expected one of per_loop, one_loop, got 'one-loop' (did you mean 'one_loop'?)")
            ]
        )
    }

    @Test("threads.http_relay_count is one per loop unless set, and must be in range")
    func httpRelayCount() throws {
        let unset = try ConfigLoader.parse(yaml: minimal, file: "test.yaml").threads
        #expect(unset.httpRelayCount == nil)
        #expect([1, 2, 3, 16].map { unset.resolvedHTTPRelayCount(loops: $0) } == [1, 2, 3, 16])
        let three = try ConfigLoader.parse(yaml: minimal + "threads:\n  http_relay_count: 3\n", file: "test.yaml")
        #expect(three.threads.httpRelayCount == 3)
        #expect(three.threads.resolvedHTTPRelayCount(loops: 2) == 3)
        #expect(
            errors(in: minimal + "threads:\n  http_relay_count: 0\n") == [
                error(line: 10, column: 21, path: "threads.http_relay_count", "must be between 1 and 1024, got 0")
            ]
        )
        #expect(errors(in: minimal + "threads:\n  http_relay_count: auto\n").map(\.path) == ["threads.http_relay_count"])
    }

    /// The boolean `threads` switches that are on by default, each with a value that is not a boolean.
    static let onByDefaultSwitches: [(key: String, notABoolean: String)] = [
        ("http_relay", "sometimes"), ("io_uring", "maybe"), ("yield_after_batch", "1"),
    ]

    static func threadsSwitch(_ key: String, of config: ProxyConfig) -> Bool? {
        switch key {
        case "http_relay": config.threads.httpRelay
        case "io_uring": config.threads.ioUring
        case "yield_after_batch": config.threads.yieldAfterBatch
        default: nil
        }
    }

    @Test("a threads switch is on unless set to false, and must be a boolean", arguments: onByDefaultSwitches)
    func threadsSwitches(key: String, notABoolean: String) throws {
        #expect(Self.threadsSwitch(key, of: try ConfigLoader.parse(yaml: minimal, file: "test.yaml")) == true)
        let off = try ConfigLoader.parse(yaml: minimal + "threads:\n  \(key): false\n", file: "test.yaml")
        #expect(Self.threadsSwitch(key, of: off) == false)
        #expect(
            errors(in: minimal + "threads:\n  \(key): \(notABoolean)\n") == [
                error(
                    line: 10, column: key.count + 5, path: "threads.\(key)",
                    "expected true or false, got '\(notABoolean)'")
            ]
        )
    }

    @Test("an admin section without keys enables the admin listener with its defaults")
    func emptyAdminSection() throws {
        let config = try ConfigLoader.parse(yaml: minimal + "admin: {}\n", file: "test.yaml")
        #expect(
            config.admin == AdminConfig(address: "127.0.0.1", port: 9901, token: nil, tokenEnv: nil, metricsOpen: true)
        )
    }

    @Test("a pool may have no backends, and backend addresses may be host names")
    func emptyPoolAndHostNames() throws {
        let yaml = """
            listeners: [{port: 80, pool: empty}, {port: 81, pool: named}]
            pools:
              empty:
              named:
                backends:
                  - {id: x, address: "room.internal:443"}
            """
        let config = try ConfigLoader.parse(yaml: yaml, file: "test.yaml")
        #expect(config.pool(named: "empty") == PoolConfig(name: "empty"))
        #expect(config.pool(named: "named")?.backends == [BackendConfig(id: "x", host: "room.internal", port: 443)])
    }

    // MARK: One error each

    @Test("an unknown key is reported at the key, with the closest known key")
    func unknownKeyWithSuggestion() {
        let yaml = minimal.replacingOccurrences(of: "    pool: rooms", with: "    pool: rooms\n    adress: 127.0.0.1")
        #expect(
            errors(in: yaml) == [
                error(line: 4, column: 5, path: "listeners[0].adress", "unknown key 'adress' (did you mean 'address'?)")
            ]
        )
    }

    @Test("an unknown key far from any known key lists the keys allowed there")
    func unknownKeyWithoutSuggestion() {
        #expect(
            errors(in: minimal + "logging:\n  colour: true\n") == [
                error(
                    line: 10,
                    column: 3,
                    path: "logging.colour",
                    "unknown key 'colour' (expected one of: level, format, access_log)"
                )
            ]
        )
        #expect(
            errors(in: minimal + "timeout:\n  connect: 1s\n") == [
                error(line: 9, column: 1, path: "timeout", "unknown key 'timeout' (did you mean 'timeouts'?)")
            ]
        )
    }

    @Test("a value of the wrong type is reported at the value")
    func wrongType() {
        let quotedPort = minimal.replacingOccurrences(of: "port: 8080", with: "port: \"8080\"")
        #expect(
            errors(in: quotedPort) == [
                error(line: 2, column: 11, path: "listeners[0].port", "expected an integer, got '8080'")
            ]
        )
        #expect(
            errors(in: minimal + "logging:\n  access_log: sometimes\n") == [
                error(line: 10, column: 15, path: "logging.access_log", "expected true or false, got 'sometimes'")
            ]
        )
        #expect(
            errors(in: minimal + "limits: 5\n") == [
                error(line: 9, column: 9, path: "limits", "expected a mapping of keys to values, got '5'")
            ]
        )
        let tagsAsMapping = minimal + "        tags: {a: b}\n"
        #expect(
            errors(in: tagsAsMapping) == [
                error(line: 9, column: 15, path: "pools.rooms.backends[0].tags", "expected a list, got a mapping")
            ]
        )
        #expect(
            errors(in: minimal + "admin:\n  port:\n") == [
                error(line: 10, column: 8, path: "admin.port", "expected an integer, got an empty value")
            ]
        )
    }

    @Test("a duration without a unit or with a bad unit is reported with an example")
    func badDuration() {
        #expect(
            errors(in: minimal + "timeouts:\n  connect: 5\n  tunnel_idle: 1d\n") == [
                error(line: 10, column: 12, path: "timeouts.connect", "expected a duration like 5s or 300ms, got '5'"),
                error(
                    line: 11,
                    column: 16,
                    path: "timeouts.tunnel_idle",
                    "expected a duration like 5s or 300ms, got '1d'"
                ),
            ]
        )
    }

    @Test("only shutdown_grace may be zero")
    func zeroDurations() throws {
        #expect(
            errors(in: minimal + "timeouts:\n  upstream_idle: 0s\n") == [
                error(line: 10, column: 18, path: "timeouts.upstream_idle", "must be greater than 0s, got '0s'")
            ]
        )
        let config = try ConfigLoader.parse(yaml: minimal + "timeouts:\n  shutdown_grace: 0s\n", file: "test.yaml")
        #expect(config.timeouts.shutdownGrace == .zero)
    }

    @Test("a malformed size is reported with an example")
    func badSize() {
        #expect(
            errors(in: minimal + "limits:\n  max_buffered_body: 1.5MiB\n") == [
                error(
                    line: 10,
                    column: 22,
                    path: "limits.max_buffered_body",
                    "expected a size like 64KiB or 1MiB, got '1.5MiB'"
                )
            ]
        )
    }

    @Test("a missing required key is reported at the mapping that should hold it")
    func missingRequiredKey() {
        let noPool = minimal.replacingOccurrences(of: "    pool: rooms\n", with: "")
        #expect(
            errors(in: noPool) == [
                error(line: 2, column: 5, path: "listeners[0]", "missing required key 'pool'")
            ]
        )
        let noAddress = minimal.replacingOccurrences(of: "        address: 127.0.0.1:9001\n", with: "")
        #expect(
            errors(in: noAddress) == [
                error(line: 7, column: 9, path: "pools.rooms.backends[0]", "missing required key 'address'")
            ]
        )
        let tlsWithoutKey = minimal.replacingOccurrences(
            of: "    pool: rooms\n",
            with: "    pool: rooms\n    tls:\n      certificate: c.pem\n"
        )
        #expect(
            errors(in: tlsWithoutKey) == [
                error(line: 5, column: 7, path: "listeners[0].tls", "missing required key 'key'")
            ]
        )
    }

    @Test("missing top-level sections are reported at the document root")
    func missingTopLevelKeys() {
        #expect(
            errors(in: "logging:\n  level: info\n") == [
                error(line: 1, column: 1, path: "", "missing required key 'listeners'"),
                error(line: 1, column: 1, path: "", "missing required key 'pools'"),
            ]
        )
        #expect(
            errors(in: "listeners: []\npools: {}\n") == [
                error(line: 1, column: 12, path: "listeners", "at least one listener is required"),
                error(line: 2, column: 8, path: "pools", "at least one pool is required"),
            ]
        )
    }

    @Test("numbers outside their range are reported with the range")
    func outOfRange() {
        let bigPort = minimal.replacingOccurrences(of: "port: 8080", with: "port: 70000")
        #expect(
            errors(in: bigPort) == [
                error(line: 2, column: 11, path: "listeners[0].port", "must be between 1 and 65535, got 70000")
            ]
        )
        #expect(
            errors(in: minimal + "        weight: 0\n") == [
                error(line: 9, column: 17, path: "pools.rooms.backends[0].weight", "must be at least 1, got 0")
            ]
        )
        #expect(
            errors(in: minimal + "limits:\n  max_header_bytes: 100KiB\n") == [
                error(
                    line: 10,
                    column: 21,
                    path: "limits.max_header_bytes",
                    "must be between 1KiB and 80KiB, got '100KiB'"
                )
            ]
        )
        #expect(errors(in: minimal + "limits:\n  max_header_bytes: 512B\n").map(\.path) == ["limits.max_header_bytes"])
        #expect(errors(in: minimal + "limits:\n  max_header_bytes: 80KiB\n").isEmpty)
    }

    @Test("a backend id used twice, even in another pool, is reported at the second use")
    func duplicateBackendID() {
        let yaml =
            minimal + """
                  other:
                    backends:
                      - id: a
                        address: 127.0.0.1:9002

                """
        #expect(
            errors(in: yaml) == [
                error(
                    line: 11,
                    column: 13,
                    path: "pools.other.backends[0].id",
                    "duplicate backend id 'a', first used by pools.rooms.backends[0].id (line 7)"
                )
            ]
        )
    }

    @Test("a backend id outside [A-Za-z0-9._:-] is refused")
    func backendIDCharacters() {
        let yaml = minimal.replacingOccurrences(of: "id: a", with: "id: a b")
        #expect(
            errors(in: yaml) == [
                error(
                    line: 7,
                    column: 13,
                    path: "pools.rooms.backends[0].id",
                    "backend id may only contain letters, digits, '.', '_', ':' and '-', got 'a b'"
                )
            ]
        )
    }

    @Test("a listener naming an undeclared pool is reported at the pool value")
    func unknownPool() {
        let yaml = minimal.replacingOccurrences(of: "pool: rooms", with: "pool: room")
        #expect(
            errors(in: yaml) == [
                error(line: 3, column: 11, path: "listeners[0].pool", "unknown pool 'room' (did you mean 'rooms'?)")
            ]
        )
        let unrelated = minimal.replacingOccurrences(of: "pool: rooms", with: "pool: payments")
        #expect(errors(in: unrelated).map(\.message) == ["unknown pool 'payments' (declared pools: rooms)"])
    }

    @Test("two listeners on the same address and port are refused; different addresses may share a port")
    func duplicateListenerPort() {
        let yaml = """
            listeners:
              - {port: 8080, pool: rooms}
              - {address: 127.0.0.1, port: 8080, pool: rooms}
              - {port: 8080, pool: rooms, name: again}
            pools:
              rooms:
            """
        #expect(
            errors(in: yaml) == [
                error(
                    line: 4,
                    column: 12,
                    path: "listeners[2].port",
                    "port 8080 on 0.0.0.0 is already used by listeners[0].port (line 2)"
                )
            ]
        )
    }

    @Test("backend addresses must be host:port, with IPv6 hosts in brackets")
    func badBackendAddress() {
        func problem(_ address: String) -> [String] {
            errors(in: minimal.replacingOccurrences(of: "127.0.0.1:9001", with: address)).map(\.message)
        }
        #expect(problem("127.0.0.1") == ["expected host:port like 127.0.0.1:9001 or [::1]:9001, got '127.0.0.1'"])
        #expect(problem("\"::1:9001\"") == ["an IPv6 host needs brackets, like [::1]:9001, got '::1:9001'"])
        #expect(problem("127.0.0.1:0") == ["port must be between 1 and 65535, got '127.0.0.1:0'"])
        #expect(problem("\":9001\"") == ["expected host:port like 127.0.0.1:9001 or [::1]:9001, got ':9001'"])
        #expect(problem("\"[::1]9001\"") == ["expected host:port like 127.0.0.1:9001 or [::1]:9001, got '[::1]9001'"])
    }

    @Test("an unknown choice suggests the closest allowed value")
    func badChoice() {
        #expect(
            errors(in: minimal.replacingOccurrences(of: "  rooms:\n", with: "  rooms:\n    balance: roundrobin\n")) == [
                error(
                    line: 6,
                    column: 14,
                    path: "pools.rooms.balance",
                    "expected one of round-robin, least-connections, got 'roundrobin' (did you mean 'round-robin'?)"
                )
            ]
        )
    }

    @Test("token and token_env are mutually exclusive")
    func tokenAndTokenEnv() {
        #expect(
            errors(in: minimal + "admin:\n  token: s3cret\n  token_env: TOKEN\n") == [
                error(line: 11, column: 14, path: "admin.token_env", "set either 'token' or 'token_env', not both")
            ]
        )
    }

    @Test("a YAML syntax error is one error at the position libyaml reports")
    func yamlSyntaxError() {
        let yaml = "listeners:\n  - port: 8080\n   pool: rooms\n"
        let found = errors(in: yaml)
        #expect(found.count == 1)
        #expect(found.first?.line == 3)
        #expect(found.first?.column == 4)
        #expect(found.first?.path == "")
        #expect(
            found.first?.message
                == "invalid YAML: did not find expected '-' indicator (while parsing a block collection at line 2, column 3)"
        )
    }

    @Test("a key repeated in one mapping is a YAML error")
    func duplicateYAMLKey() {
        #expect(
            errors(in: "pools:\n  a: {}\n  a: {}\n") == [
                error(line: 2, column: 3, path: "", "invalid YAML: key 'a' appears more than once in this mapping")
            ]
        )
    }

    @Test("an empty file, or one with only comments, is an error", arguments: ["", "\n", "# nothing yet\n", "~\n"])
    func emptyFile(yaml: String) {
        #expect(errors(in: yaml) == [error(line: 1, column: 1, path: "", "configuration is empty")])
    }

    @Test("a document that is not a mapping is an error at the root")
    func rootNotAMapping() {
        #expect(
            errors(in: "- a\n- b\n") == [
                error(line: 1, column: 1, path: "", "expected a mapping of keys to values, got a list")
            ]
        )
    }

    // MARK: Several errors

    @Test("every error is collected, in file order")
    func collectsAllErrors() {
        let yaml = """
            listeners:
              - port: 0
                pool: nowhere
                adress: x
            pools:
              rooms:
                backends:
                  - id: a
                    address: 127.0.0.1
                    weight: heavy
                  - address: 127.0.0.1:9002
            timeouts:
              connect: 5
            logging:
              level: loud
            """
        #expect(
            errors(in: yaml) == [
                error(line: 2, column: 11, path: "listeners[0].port", "must be between 1 and 65535, got 0"),
                error(line: 3, column: 11, path: "listeners[0].pool", "unknown pool 'nowhere' (declared pools: rooms)"),
                error(
                    line: 4,
                    column: 5,
                    path: "listeners[0].adress",
                    "unknown key 'adress' (did you mean 'address'?)"
                ),
                error(
                    line: 9,
                    column: 18,
                    path: "pools.rooms.backends[0].address",
                    "expected host:port like 127.0.0.1:9001 or [::1]:9001, got '127.0.0.1'"
                ),
                error(line: 10, column: 17, path: "pools.rooms.backends[0].weight", "expected an integer, got 'heavy'"),
                error(line: 11, column: 9, path: "pools.rooms.backends[1]", "missing required key 'id'"),
                error(line: 13, column: 12, path: "timeouts.connect", "expected a duration like 5s or 300ms, got '5'"),
                error(
                    line: 15,
                    column: 10,
                    path: "logging.level",
                    "expected one of trace, debug, info, notice, warning, error, critical, got 'loud'"
                ),
            ]
        )
    }

    @Test("the pool reference is checked even when the listener's port is wrong too")
    func unknownPoolWithOtherErrors() {
        let yaml = minimal.replacingOccurrences(
            of: "port: 8080\n    pool: rooms",
            with: "port: x\n    pool: nowhere\n    tls: {}"
        )
        #expect(
            errors(in: yaml).map(\.path) == [
                "listeners[0].port", "listeners[0].pool", "listeners[0].tls", "listeners[0].tls",
            ]
        )
    }

    // MARK: Formatting and files

    @Test("errors print as file:line:column: path: message, one per line")
    func descriptions() {
        let withPath = error(
            line: 3,
            column: 7,
            path: "timeouts.connect",
            "expected a duration like 5s or 300ms, got '5'"
        )
        let withoutPath = error(line: 1, column: 1, path: "", "configuration is empty")
        #expect(
            withPath.description == "test.yaml:3:7: timeouts.connect: expected a duration like 5s or 300ms, got '5'"
        )
        #expect(withoutPath.description == "test.yaml:1:1: configuration is empty")
        #expect(
            ConfigErrors(errors: [withPath, withoutPath]).description
                == "test.yaml:3:7: timeouts.connect: expected a duration like 5s or 300ms, got '5'\n"
                + "test.yaml:1:1: configuration is empty"
        )
    }

    @Test("a missing file is one error at line 0 naming the file")
    func missingFile() {
        let path = "/nonexistent/ott-proxy/config.yaml"
        #expect(throws: ConfigErrors.self) { try ConfigLoader.load(path: path) }
        do {
            _ = try ConfigLoader.load(path: path)
        } catch {
            #expect(
                error.errors == [
                    ConfigError(
                        file: path,
                        line: 0,
                        column: 0,
                        path: "",
                        message: "cannot read '\(path)': no such file"
                    )
                ]
            )
        }
    }

    @Test("a directory is not a configuration file")
    func directory() {
        do {
            _ = try ConfigLoader.load(path: "/tmp")
            Issue.record("loading a directory succeeded")
        } catch {
            #expect(error.errors.map(\.description) == ["/tmp:0:0: cannot read '/tmp': it is a directory"])
        }
    }

    @Test("examples/basic.yaml loads")
    func basicExample() throws {
        let config = try ConfigLoader.load(path: packageFile("examples/basic.yaml"))
        #expect(config.listeners.map(\.port) == [8080])
        #expect(config.pools.count == 1)
        #expect(config.pools.first?.backends.map(\.port) == [9001, 9002, 9003])
        #expect(config.admin?.port == 9901)
    }

    @Test("the full annotated example in docs/configuration.md loads")
    func documentedExample() throws {
        let doc = try String(contentsOfFile: packageFile("docs/configuration.md"), encoding: .utf8)
        let section = try #require(doc.range(of: "## 11. Full annotated example"))
        let start = try #require(doc.range(of: "```yaml\n", range: section.upperBound..<doc.endIndex))
        let end = try #require(doc.range(of: "```", range: start.upperBound..<doc.endIndex))
        let config = try ConfigLoader.parse(yaml: String(doc[start.upperBound..<end.lowerBound]), file: "doc")
        #expect(config.listeners.map(\.name) == ["public", "internal"])
        #expect(config.pools.map(\.name) == ["rooms", "api", "app", "maintenance"])
        #expect(config.pool(named: "rooms")?.backends.last?.host == "2001:db8::12")
        #expect(config.pool(named: "rooms")?.healthCheck?.expectStatus == StatusSet([200...299]))
        #expect(config.pool(named: "rooms")?.passive?.count5xx == true)
        #expect(config.pool(named: "app")?.discovery?.dns == DNSDiscoveryConfig(name: "app.internal", port: 3000))
    }
}

/// A file of this package, found from this source file's location so tests work from any directory.
private func packageFile(_ relativePath: String) -> String {
    URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent()  // ProxyCoreTests
        .deletingLastPathComponent()  // Tests
        .deletingLastPathComponent()  // package root
        .appendingPathComponent(relativePath)
        .path
}
