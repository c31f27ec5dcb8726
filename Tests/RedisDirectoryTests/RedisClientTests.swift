import NIOCore
import NIOPosix
import RedisTestSupport
import Testing

@testable import RedisDirectory

@Suite("RedisClient against redis-server", .timeLimit(.minutes(1)))
struct RedisClientTests {
    @Test func setAndGet() async throws {
        try await RedisServerProcess.with { server in
            try await RedisTest.withClient(try RedisTest.configuration(server)) { client throws in
                #expect(try await client.get("missing").get() == nil)
                #expect(try await client.set("k", to: "value").get())
                #expect(try await client.get("k").get() == ByteBuffer(string: "value"))
                // NX refuses an existing key; PX sets a TTL.
                #expect(try await !client.set("k", to: "other", onlyIfAbsent: true).get())
                #expect(try await client.set("ttl", to: ByteBuffer(bytes: [0, 13, 10, 255]), expireAfter: .milliseconds(5_000)).get())
                #expect(try await client.get("ttl").get() == ByteBuffer(bytes: [0, 13, 10, 255]))
                let ttl = try await client.execute(["PTTL", "ttl"]).int ?? -1
                #expect(ttl > 0 && ttl <= 5_000)
                #expect(try await client.del(["k", "ttl", "missing"]).get() == 2)
                // A server error is thrown with its code.
                await #expect(throws: RedisError.self) { try await client.execute(["INCR", "k", "extra"]) }
                _ = try await client.set("text", to: "abc").get()
                do {
                    _ = try await client.incr("text").get()
                    Issue.record("INCR on a string succeeded")
                } catch let error as RedisError {
                    #expect(error.serverCode == "ERR")
                }
            }
        }
    }

    @Test func pipelinesAThousandCommandsInFIFOOrder() async throws {
        try await RedisServerProcess.with { server in
            var configuration = try RedisTest.configuration(server)
            configuration.poolSize = 1
            let connection = try await RedisConnection.connect(
                configuration: configuration, on: RedisTest.group.next()
            ).get()
            // All 1,000 are written before any reply is read; each reply must go to its own command.
            let futures = (0..<1_000).map { index in
                index % 2 == 0 ? connection.incr("counter") : connection.send(["INCRBY", "other", index]).map { $0.int ?? -1 }
            }
            let results = try await EventLoopFuture.whenAllSucceed(futures, on: connection.eventLoop).get()
            var counter: Int64 = 0
            var other: Int64 = 0
            for (index, result) in results.enumerated() {
                if index % 2 == 0 {
                    counter += 1
                    #expect(result == counter)
                } else {
                    other += Int64(index)
                    #expect(result == other)
                }
            }
            try await connection.close().get()

            // Through the pool too, from many tasks at once.
            configuration.poolSize = 3
            try await RedisTest.withClient(configuration) { client throws in
                let values = try await withThrowingTaskGroup(of: Int64.self) { group in
                    for _ in 0..<1_000 { group.addTask { try await client.incr("pooled").get() } }
                    return try await group.reduce(into: [Int64]()) { $0.append($1) }
                }
                #expect(Set(values) == Set(1...1_000))
            }
        }
    }

    @Test func evalAndEvalshaFallBackOnNoscript() async throws {
        try await RedisServerProcess.with { server in
            try await RedisTest.withClient(try RedisTest.configuration(server)) { client throws in
                let source = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"
                let value = try await client.eval(source, keys: ["n"], args: ["a"]).get()
                #expect(value == .array([.bulkString(ByteBuffer(string: "n")), .bulkString(ByteBuffer(string: "a")), .integer(1)]))

                let script = RedisScript(source)
                #expect(script.sha == nil)
                let first = try await client.evalsha(script, keys: ["n"], args: ["b"]).get()
                #expect(first.array?.last == .integer(2))
                let sha = try #require(script.sha)
                #expect(sha.count == 40)

                // The server forgets the script: EVALSHA gets NOSCRIPT, the helper falls back to EVAL.
                _ = try await client.execute(["SCRIPT", "FLUSH"])
                do {
                    _ = try await client.evalsha(sha, keys: ["n"], args: ["c"]).get()
                    Issue.record("EVALSHA after SCRIPT FLUSH succeeded")
                } catch let error as RedisError {
                    #expect(error.serverCode == "NOSCRIPT")
                }
                let afterFlush = try await client.evalsha(script, keys: ["n"], args: ["c"]).get()
                #expect(afterFlush.array?.last == .integer(3))
                // EVAL cached it again on the server, so plain EVALSHA works once more.
                let exists = try await client.execute(["SCRIPT", "EXISTS", sha])
                #expect(exists == .array([.integer(1)]))
                #expect(try await client.evalsha(sha, keys: ["n"], args: ["d"]).get().array?.last == .integer(4))
            }
        }
    }

    @Test func authenticatesWithRequirepassAndReportsAWrongPassword() async throws {
        try await RedisServerProcess.with(password: "s3cret") { server in
            // Password only.
            try await RedisTest.withClient(try RedisTest.configuration(server)) { client throws in
                #expect(try await client.execute(["PING"]) == .simpleString("PONG"))
            }
            // User and password (the default user has requirepass's password).
            var named = try RedisTest.configuration(server)
            named.username = "default"
            let connection = try await RedisConnection.connect(configuration: named, on: RedisTest.group.next()).get()
            #expect(try await connection.execute(["PING"]) == .simpleString("PONG"))
            try await connection.close().get()

            // A wrong password: a clear authentication error, from the connect and from the pool.
            var wrong = try RedisTest.configuration(server)
            wrong.password = "nope"
            do {
                _ = try await RedisConnection.connect(configuration: wrong, on: RedisTest.group.next()).get()
                Issue.record("connected with a wrong password")
            } catch let error as RedisError {
                guard case .authenticationFailed(let message) = error else {
                    Issue.record("unexpected error \(error)")
                    return
                }
                #expect(message.hasPrefix("WRONGPASS"))
                #expect(error.description.contains("authentication failed"))
            }
            try await RedisTest.withClient(wrong) { client in
                await #expect(throws: RedisError.authenticationFailed("WRONGPASS invalid username-password pair or user is disabled.")) {
                    try await client.execute(["PING"])
                }
            }
            // No password at all: NOAUTH from the command.
            var none = try RedisTest.configuration(server)
            none.password = nil
            try await RedisTest.withClient(none) { client in
                do {
                    _ = try await client.execute(["GET", "x"])
                    Issue.record("GET without AUTH succeeded")
                } catch let error as RedisError {
                    #expect(error.serverCode == "NOAUTH")
                }
            }
        }
    }

    @Test func selectIsolatesDatabases() async throws {
        try await RedisServerProcess.with { server in
            try await RedisTest.withClient(try RedisTest.configuration(server, database: 2)) { db2 in
                try await RedisTest.withClient(try RedisTest.configuration(server)) { db0 in
                    _ = try await db2.set("shared-name", to: "in-2").get()
                    _ = try await db0.set("shared-name", to: "in-0").get()
                    #expect(try await db2.get("shared-name").get() == ByteBuffer(string: "in-2"))
                    #expect(try await db0.get("shared-name").get() == ByteBuffer(string: "in-0"))
                    #expect(try await db2.execute(["DBSIZE"]) == .integer(1))
                }
            }
            // Via the URL, and a database the server does not have.
            var viaURL = try RedisConfiguration(url: server.url + "/2")
            #expect(viaURL.database == 2)
            try await RedisTest.withClient(viaURL) { client throws in
                #expect(try await client.get("shared-name").get() == ByteBuffer(string: "in-2"))
            }
            viaURL.database = 99
            await #expect(throws: RedisError.selectFailed(database: 99, "ERR DB index is out of range")) {
                _ = try await RedisConnection.connect(configuration: viaURL, on: RedisTest.group.next()).get()
            }
        }
    }

    @Test func commandTimeoutFailsTheCommandAndClosesTheConnection() async throws {
        try await RedisServerProcess.with { server in
            var configuration = try RedisTest.configuration(server)
            configuration.poolSize = 1
            try await RedisTest.withClient(configuration) { client throws in
                #expect(try await client.execute(["PING"]) == .simpleString("PONG"))
                let clock = ContinuousClock()
                let start = clock.now
                // The server answers after 2 s: the timeout error (not the answer) shows the timeout came first; the
                // time bound, well below 2 s, that it came near its 200 ms (a parallel run's load once delayed it,
                // or this task's resumption, to 1.05 s, past an earlier bound of 900 ms).
                let slow = client.send(["DEBUG", "SLEEP", "2"], timeout: .milliseconds(200))
                let behind = client.send(["PING"])
                await #expect(throws: RedisError.timeout(command: "DEBUG", after: .milliseconds(200))) {
                    try await slow.get()
                }
                #expect(clock.now - start < .milliseconds(1500))
                // The command queued behind it cannot be matched any more: it fails with the connection.
                await #expect(throws: RedisError.connectionClosed("an earlier command (DEBUG) timed out")) {
                    try await behind.get()
                }
                // The pool reconnects (after the server finishes sleeping).
                let pong = try await RedisTest.eventually { try await client.execute(["PING"]) }
                #expect(pong == .simpleString("PONG"))
            }
        }
    }

    @Test func reconnectsAfterTheServerRestarts() async throws {
        try await RedisServerProcess.with { server in
            try await RedisTest.withClient(try RedisTest.configuration(server)) { client throws in
                // Every pool connection up first (a connect still in flight when the server dies would be waited for).
                try await RedisTest.eventually { if client.connectedCount < 2 { throw RedisError.unavailable("pool") } }
                _ = try await client.set("before", to: "1").get()

                await server.stop()
                // Down: commands fail fast with a clear error instead of queueing.
                let clock = ContinuousClock()
                try await RedisTest.eventually {
                    if client.connectedCount > 0 { throw RedisError.unavailable("still connected") }
                }
                let start = clock.now
                do {
                    _ = try await client.execute(["PING"])
                    Issue.record("PING succeeded while the server was down")
                } catch let error as RedisError {
                    guard case .unavailable = error else {
                        Issue.record("unexpected error \(error)")
                        return
                    }
                    #expect(error.description.hasPrefix("redis unavailable"))
                }
                // "Fast": well under the 2 s connect timeout a queued command would wait for. (100 ms flaked on a
                // loaded 2-core machine: 139 ms.)
                #expect(clock.now - start < .milliseconds(1000))

                try await server.start()
                let restarted = clock.now
                let pong = try await RedisTest.eventually(within: .seconds(5)) { try await client.execute(["PING"]) }
                #expect(pong == .simpleString("PONG"))
                #expect(clock.now - restarted < .seconds(3))
                // No persistence: the restarted server is empty.
                #expect(try await client.get("before").get() == nil)
                try await RedisTest.eventually { if client.connectedCount < 2 { throw RedisError.unavailable("pool") } }
            }
        }
    }

    @Test func failsFastWhenNoServerWasEverReachable() async throws {
        let port = try await RedisServerProcess.freePort()
        var configuration = RedisConfiguration(host: "127.0.0.1", port: port)
        configuration.reconnectBaseDelay = .seconds(10)
        try await RedisTest.withClient(configuration) { client throws in
            // The first connect is refused; the command waiting for it gets an error, then later ones fail at once.
            await #expect(throws: RedisError.self) { try await client.execute(["PING"]) }
            do {
                _ = try await client.execute(["PING"])
                Issue.record("PING succeeded")
            } catch let error as RedisError {
                guard case .unavailable(let why) = error else {
                    Issue.record("unexpected error \(error)")
                    return
                }
                #expect(why.contains("cannot connect"))
            }
        }
    }

    @Test func closeStopsTheClient() async throws {
        try await RedisServerProcess.with { server in
            let client = RedisClient(configuration: try RedisTest.configuration(server), eventLoopGroup: RedisTest.group)
            #expect(try await client.execute(["PING"]) == .simpleString("PONG"))
            try await client.close().get()
            await #expect(throws: RedisError.closed) { try await client.execute(["PING"]) }
            #expect(client.connectedCount == 0)
        }
    }
}

@Suite("RedisConnection over TLS", .timeLimit(.minutes(1)))
struct RedisTLSTests {
    @Test func connectsWithRediss() async throws {
        try await RedisServerProcess.with(tls: true) { server in
            // Verified against the server's own (self-signed) certificate as the trust root.
            var trusted = try RedisTest.configuration(server)
            #expect(trusted.tls && trusted.verifyCertificate && trusted.host == "localhost")
            trusted.trustRoots = .file(server.certificateFile.path)
            try await RedisTest.withClient(trusted) { client throws in
                #expect(try await client.set("k", to: "over tls").get())
                #expect(try await client.get("k").get() == ByteBuffer(string: "over tls"))
            }

            // Not trusted: the connect fails (verification is on by default)...
            let untrusted = try RedisTest.configuration(server)
            await #expect(throws: RedisError.self) {
                _ = try await RedisConnection.connect(configuration: untrusted, on: RedisTest.group.next()).get()
            }
            // ...unless the URL says insecure=true.
            let insecure = try RedisConfiguration(url: server.url + "?insecure=true")
            let connection = try await RedisConnection.connect(configuration: insecure, on: RedisTest.group.next()).get()
            #expect(try await connection.execute(["GET", "k"]) == .bulkString(ByteBuffer(string: "over tls")))
            try await connection.close().get()

            // A plain-text client against the TLS port does not get a Redis connection.
            var plain = try RedisTest.configuration(server)
            plain.tls = false
            plain.commandTimeout = .milliseconds(500)
            await #expect(throws: RedisError.self) {
                _ = try await RedisConnection.connect(configuration: plain, on: RedisTest.group.next()).get()
            }
        }
    }
}
