import DemoBackends
import Foundation
import NIOCore
import NIOPosix
import RedisTestSupport
import Testing

/// The built `ott-proxy` executable, run as a subprocess.
@Suite struct CLITests {
    /// The package root, from this file's location (`Tests/IntegrationTests/CLITests.swift`).
    static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// `ott-proxy` sits next to the test bundle in the build directory.
    static func executable() throws -> URL {
        var candidates: [URL] = []
        if let bundle = Bundle.main.executableURL {
            candidates.append(bundle.deletingLastPathComponent().appendingPathComponent("ott-proxy"))
        }
        let argument0 = URL(fileURLWithPath: CommandLine.arguments[0])
        candidates.append(argument0.deletingLastPathComponent().appendingPathComponent("ott-proxy"))
        // The .xctest bundle itself may be a directory (macOS): look beside it too.
        for url in Array(candidates) {
            candidates.append(url.deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("ott-proxy"))
        }
        candidates.append(Self.packageRoot.appendingPathComponent(".build-ws/debug/ott-proxy"))
        candidates.append(Self.packageRoot.appendingPathComponent(".build/debug/ott-proxy"))
        guard let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0.path) }) else {
            throw CLIError.executableNotFound(candidates.map(\.path))
        }
        return found
    }

    enum CLIError: Error { case executableNotFound([String]), didNotExit }

    struct Outcome {
        var status: Int32
        var reason: SpawnedProcess.TerminationReason
        var stdout: String
        var stderr: String
    }

    /// Runs the executable to completion (killing it after `timeout`).
    static func run(_ arguments: [String], timeout: Duration = .seconds(20)) async throws -> Outcome {
        let out = Pipe()
        let err = Pipe()
        let process = SpawnedProcess(
            executable: try self.executable().path, arguments: arguments, currentDirectory: self.packageRoot.path,
            standardOutput: .pipe(out), standardError: .pipe(err))
        try process.run()
        // Drain both pipes concurrently so a chatty child cannot block on a full pipe.
        async let stdout = Self.readToEnd(out)
        async let stderr = Self.readToEnd(err)
        let exited = await WSSupport.waitUntil(timeout: timeout) { !process.isRunning }
        if !exited {
            process.terminate()
            throw CLIError.didNotExit
        }
        process.waitUntilExit()
        return Outcome(
            status: process.terminationStatus,
            reason: process.terminationReason,
            stdout: String(decoding: await stdout, as: UTF8.self),
            stderr: String(decoding: await stderr, as: UTF8.self)
        )
    }

    /// Reads a pipe to its end on a thread of its own (`onOwnThread`; not a Dispatch global queue's, which on Linux
    /// are Swift concurrency's too): a blocking read there stalls every other test running in parallel.
    static func readToEnd(_ pipe: Pipe) async -> Data {
        await onOwnThread { pipe.fileHandleForReading.readDataToEndOfFile() }
    }

    static func temporaryFile(_ contents: String, name: String) throws -> URL {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("ott-proxy-cli-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let url = directory.appendingPathComponent(name)
        try contents.write(to: url, atomically: true, encoding: .utf8)
        return url
    }

    /// A port nothing listens on right now (bound and released), for a child process to listen on.
    ///
    /// Taken at random from 20000-32767, below Linux's ephemeral range (32768-60999 by default): a port the kernel
    /// picks for `bind(0)` comes from that range, where the parallel tests' thousands of outgoing connections also
    /// take their local ports, and one of them could hold it by the time the child binds (a rare failure seen as the
    /// child exiting 1, "address already in use"). Here only another caller of this function could collide.
    static func freePort() async throws -> Int {
        var lastError: (any Error)?
        for _ in 0..<50 {
            let candidate = Int.random(in: 20000...32767)
            do {
                let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                    .bind(host: "127.0.0.1", port: candidate).get()
                try await channel.close()
                return candidate
            } catch {
                lastError = error
            }
        }
        throw lastError!
    }

    @Test func checkAcceptsTheBasicExample() async throws {
        let outcome = try await Self.run(["check", "--config", "examples/basic.yaml"])
        #expect(outcome.status == 0, "stderr: \(outcome.stderr)")
        #expect(outcome.stdout.contains("is valid"))
    }

    @Test func checkReportsEveryErrorWithItsLocation() async throws {
        let file = try Self.temporaryFile(
            """
            listeners:
              - name: public
                port: 8080
                pool: rooms
            pools:
              rooms:
                backends:
                  - id: a
                    address: 127.0.0.1:9001
            timeouts:
              connect: 5 parsecs
            bogus_key: 1

            """,
            name: "two-errors.yaml"
        )
        defer { try? FileManager.default.removeItem(at: file.deletingLastPathComponent()) }
        let outcome = try await Self.run(["check", "--config", file.path])
        #expect(outcome.status == 1)
        #expect(outcome.reason == .exit)
        #expect(outcome.stderr.contains("\(file.path):11:12:"), "stderr: \(outcome.stderr)")
        #expect(outcome.stderr.contains("timeouts.connect"), "stderr: \(outcome.stderr)")
        #expect(outcome.stderr.contains("\(file.path):12:1:"), "stderr: \(outcome.stderr)")
        #expect(outcome.stderr.contains("bogus_key"), "stderr: \(outcome.stderr)")
        #expect(outcome.stderr.contains("2 errors"), "stderr: \(outcome.stderr)")
        #expect(!outcome.stdout.contains("is valid"))
    }

    @Test func versionPrintsTheVersion() async throws {
        // The version the source declares, so this test need not change with every release.
        let source = try String(
            contentsOf: Self.packageRoot.appendingPathComponent("Sources/ott-proxy/OttProxy.swift"), encoding: .utf8)
        let declared = try #require(
            source.split(separator: "\n").first { $0.contains("static let version") }?
                .split(separator: "\"").dropFirst().first.map(String.init))
        let outcome = try await Self.run(["--version"])
        #expect(outcome.status == 0)
        #expect(outcome.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == declared)
    }

    @Test func runHelpExitsZero() async throws {
        let outcome = try await Self.run(["run", "--help"])
        #expect(outcome.status == 0)
        #expect(outcome.stdout.contains("--config"))
    }

    /// A configuration for `ott-proxy run`: one listener on `port` and a backend nobody listens on, then `rest`.
    /// Waits (up to 10 s) until `process` accepts connections on `port`; false when it ended or never did.
    static func waitUntilListening(_ process: SpawnedProcess, port: Int) async -> Bool {
        await WSSupport.waitUntil(timeout: .seconds(10)) {
            guard process.isRunning else { return false }
            guard let connection = try? await RawHTTPConnection.connect(port: port) else { return false }
            await connection.close()
            return true
        }
    }

    static func runConfig(port: Int, backend: String = "127.0.0.1:9", _ rest: String) -> String {
        """
        listeners:
          - name: public
            address: 127.0.0.1
            port: \(port)
            pool: rooms
        pools:
          rooms:
            backends:
              - id: a
                address: \(backend)

        """ + rest
    }

    /// `runConfig` with one loop, room for 1,000 connections and info logging: the open-file limit tests' setup.
    static func limitedRunConfig(port: Int, backend: String = "127.0.0.1:9") -> String {
        Self.runConfig(
            port: port, backend: backend,
            """
            limits:
              max_connections: 1000
            threads:
              count: 1
            logging:
              level: info

            """)
    }

    /// `ott-proxy run --config FILE` under `/bin/bash -c "ULIMIT_COMMAND && exec ott-proxy ..."`, its standard error
    /// to `err`. (bash, not sh: dash cannot redirect descriptors above 9, which a test opens for the proxy to inherit.)
    static func spawnUnderLimit(_ ulimitCommand: String, config file: URL, err: Pipe) throws -> SpawnedProcess {
        let process = SpawnedProcess(
            executable: "/bin/bash",
            arguments: ["-c", "\(ulimitCommand) && exec \"$0\" run --config \"$1\"", try Self.executable().path, file.path],
            standardError: .pipe(err))
        try process.run()
        return process
    }

    /// SIGTERM, SIGKILL if it still runs 5 s later, then reaped.
    static func stop(_ process: SpawnedProcess) async {
        process.terminate()
        if !(await WSSupport.waitUntil(timeout: .seconds(5)) { !process.isRunning }) {
            kill(process.processIdentifier, SIGKILL)
        }
        process.waitUntilExit()
    }

    @Test func runStopsGracefullyOnSIGTERM() async throws {
        let port = try await Self.freePort()
        let file = try Self.temporaryFile(
            Self.runConfig(
                port: port,
                """
                timeouts:
                  shutdown_grace: 2s
                logging:
                  level: info

                """),
            name: "run.yaml"
        )
        defer { try? FileManager.default.removeItem(at: file.deletingLastPathComponent()) }

        let err = Pipe()
        let process = SpawnedProcess(
            executable: try Self.executable().path, arguments: ["run", "--config", file.path], standardError: .pipe(err))
        try process.run()
        async let stderr = Self.readToEnd(err)

        let listening = await Self.waitUntilListening(process, port: port)
        #expect(listening, "ott-proxy run never listened on \(port)")

        let signalled = ContinuousClock.now
        process.terminate()  // SIGTERM
        let exited = await WSSupport.waitUntil(timeout: .seconds(5)) { !process.isRunning }
        if !exited {
            kill(process.processIdentifier, SIGKILL)
        }
        process.waitUntilExit()
        let log = String(decoding: await stderr, as: UTF8.self)
        #expect(exited, "still running 5 s after SIGTERM; log: \(log)")
        #expect(process.terminationReason == .exit, "killed by signal \(process.terminationStatus); log: \(log)")
        #expect(process.terminationStatus == 0, "log: \(log)")
        #expect(ContinuousClock.now - signalled < .seconds(5))
        #expect(log.contains("shutting down"), "log: \(log)")
        // The thread layout is logged at start: by default a tunnel relay thread and an HTTP relay thread per loop.
        let loops = System.coreCount
        #expect(
            log.contains("event_loops=\(loops) http_relay_threads=\(loops) tunnel_relay_threads=\(loops)"),
            "log: \(log)")
        // And the port is free again.
        await #expect(throws: (any Error).self) {
            let connection = try await RawHTTPConnection.connect(port: port)
            await connection.close()
        }
    }

    /// `ott-proxy run` under the shell's `ulimitCommand`: the "Max open files" line of its /proc/PID/limits while it
    /// runs, and its log. One loop and 1,000 connections: it may need 2 × 1,000 + 64 pooled + 256 = 2,320 descriptors.
    private func runUnderOpenFilesLimit(_ ulimitCommand: String) async throws -> (limits: String, log: String) {
        let port = try await Self.freePort()
        let file = try Self.temporaryFile(Self.limitedRunConfig(port: port), name: "run.yaml")
        defer { try? FileManager.default.removeItem(at: file.deletingLastPathComponent()) }
        let err = Pipe()
        let process = try Self.spawnUnderLimit(ulimitCommand, config: file, err: err)
        async let stderr = Self.readToEnd(err)
        let listening = await Self.waitUntilListening(process, port: port)
        let limits = (try? String(contentsOfFile: "/proc/\(process.processIdentifier)/limits", encoding: .utf8)) ?? ""
        await Self.stop(process)
        let log = String(decoding: await stderr, as: UTF8.self)
        #expect(listening, "ott-proxy run never listened; log: \(log)")
        let line = limits.split(separator: "\n").first { $0.hasPrefix("Max open files") }.map(String.init) ?? ""
        return (line, log)
    }

    /// A soft limit below what the configuration needs is raised to it (the hard limit allows it), and logged.
    @Test func runRaisesTheOpenFilesLimitToWhatItNeeds() async throws {
        let hard = Self.hardOpenFiles()
        try #require(hard >= 2320, "the test needs a hard open-file limit of at least 2,320 (it is \(hard))")
        let (limits, log) = try await self.runUnderOpenFilesLimit("ulimit -Sn 512")
        let fields = limits.split(separator: " ", omittingEmptySubsequences: true)
        // "Max open files <soft> <hard> files"
        #expect(fields.count >= 5 && fields[3] == "2320", "limits: \(limits); log: \(log)")
        #expect(log.contains("open-file limit raised"), "log: \(log)")
        #expect(log.contains("from=512"), "log: \(log)")
        #expect(!log.contains("is below the"), "log: \(log)")
    }

    /// A hard limit below what the configuration needs cannot be raised: the proxy runs, and says what fits.
    @Test func runWarnsWhenTheHardOpenFilesLimitIsShort() async throws {
        let (limits, log) = try await self.runUnderOpenFilesLimit("ulimit -n 600")
        let fields = limits.split(separator: " ", omittingEmptySubsequences: true)
        #expect(fields.count >= 5 && fields[3] == "600", "limits: \(limits); log: \(log)")
        #expect(log.contains("the open-file limit (600) is below the 2320 descriptors"), "log: \(log)")
        #expect(log.contains("about 172 connections fit"), "log: \(log)")
    }

    /// With a hard open-file limit short of `limits.max_connections`, the proxy lowers it to what fits, so it turns
    /// surplus clients away (accepted and closed) instead of running out of descriptors: out of them, `accept` fails
    /// with `EMFILE` and NIO retries it at once, at full CPU (200 clock ticks in 2 s before the change). Under a hard
    /// limit of 300 (22 connections fit) 350 idle clients connect; once they leave, a request goes through.
    @Test func runKeepsClientsWithinTheOpenFilesLimit() async throws {
        let run = try await Self.crowd(350, setup: "ulimit -n 300")
        let log = run.log
        #expect(run.listening, "log: \(log)")
        #expect(run.connected == 350, "only \(run.connected) clients connected; log: \(log)")
        #expect(run.ticks >= 0 && run.ticks < 40, "the proxy used \(run.ticks) clock ticks in 2 s with 350 clients; log: \(log)")
        #expect(log.contains("limits.max_connections is lowered to 22 for this run"), "log: \(log)")
        #expect(!log.contains("could not accept or set up a connection"), "log: \(log)")
        #expect(run.served, "no answer once the clients left (last status \(run.lastStatus)); log: \(log)")
    }

    /// Descriptors can run out with fewer clients than `max_connections` was lowered to (here: 270 inherited from the
    /// shell, of a limit of 300). `accept` then fails with `EMFILE`; NIO would retry it at full CPU while connections
    /// wait, and they would hang. The listener instead closes the waiting connections (`ListenerShedding`), says so in
    /// its warning, and serves again once descriptors are free.
    @Test func runClosesWaitingConnectionsWhenDescriptorsRunOut() async throws {
        let run = try await Self.crowd(60, setup: "ulimit -n 300 && for i in $(seq 10 279); do eval \"exec $i</dev/null\"; done")
        let log = run.log
        #expect(run.listening, "log: \(log)")
        #expect(run.connected == 60, "only \(run.connected) clients connected; log: \(log)")
        #expect(run.ticks >= 0 && run.ticks < 40, "the proxy used \(run.ticks) clock ticks in 2 s; log: \(log)")
        #expect(log.contains("waiting_connections_closed="), "log: \(log)")
        #expect(run.closedByProxy > 0, "no client was closed; log: \(log)")
        #expect(run.served, "no answer once the clients left (last status \(run.lastStatus)); log: \(log)")
    }

    /// What a crowd of idle clients did to a proxy started under `setup` (shell commands: limits, descriptors to
    /// inherit) with `limitedRunConfig`: the clock ticks it used in 2 s with them connected (100 a second), how many
    /// of them it had closed by then, and whether it served a request once they left.
    struct CrowdRun {
        var listening: Bool
        var connected: Int
        var ticks: Int
        var closedByProxy: Int
        var served: Bool
        var lastStatus: Int
        var log: String
    }

    static func crowd(_ count: Int, setup: String) async throws -> CrowdRun {
        let room = try await RoomServer.start(id: "a", group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { try? await room.stop() } }
        let port = try await Self.freePort()
        let file = try Self.temporaryFile(
            Self.limitedRunConfig(port: port, backend: "127.0.0.1:\(room.port)"), name: "run.yaml")
        defer { try? FileManager.default.removeItem(at: file.deletingLastPathComponent()) }
        let err = Pipe()
        let process = try Self.spawnUnderLimit(setup, config: file, err: err)
        async let stderr = Self.readToEnd(err)
        let listening = await Self.waitUntilListening(process, port: port)

        var clients: [RawHTTPConnection] = []
        for _ in 0..<count {
            guard let client = try? await RawHTTPConnection.connect(port: port) else { break }
            clients.append(client)
        }
        try await Task.sleep(for: .milliseconds(500))
        let ticks = { () -> Int in
            let stat = (try? String(contentsOfFile: "/proc/\(process.processIdentifier)/stat", encoding: .utf8)) ?? ""
            // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th of them.
            let fields = stat.split(separator: ")").last.map { $0.split(separator: " ") } ?? []
            return fields.count > 12 ? (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0) : -1
        }
        let before = ticks()
        try await Task.sleep(for: .seconds(2))
        let used = ticks() - before
        let closedByProxy = clients.filter(\.isClosed).count
        for client in clients { await client.close() }

        // Descriptors free again: a request goes through.
        var status = 0
        let served = await WSSupport.waitUntil(timeout: .seconds(10)) {
            guard let connection = try? await RawHTTPConnection.connect(port: port) else { return false }
            defer { Task { await connection.close() } }
            try? await connection.send("GET /rooms/lobby HTTP/1.1\r\nHost: example\r\n\r\n")
            status = (try? await connection.readResponse())?.status ?? 0
            return status == 200
        }
        await Self.stop(process)
        return CrowdRun(
            listening: listening, connected: clients.count, ticks: used, closedByProxy: closedByProxy, served: served,
            lastStatus: status, log: String(decoding: await stderr, as: UTF8.self))
    }

    /// The hard open-file limit of this (test) process.
    private static func hardOpenFiles() -> Int {
        var limit = rlimit()
        guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 0 }
        return Int(clamping: limit.rlim_max)
    }

    /// `admin.token_env` reads the process environment of `ott-proxy run` (the unit tests use a stand-in for it).
    /// Run by a user without privileges, the proxy serves requests. Every socket option it sets must be one such a
    /// process may set: `TCP_NODELAY` set at the socket level (`ChannelOptions.socketOption(.tcp_nodelay)`) is
    /// `SO_DEBUG`, which needs `CAP_NET_ADMIN`, and every accepted connection was closed at once, without a word in the
    /// log; as root it silently set `SO_DEBUG` instead, so no other test saw it. As root this test runs the binary as
    /// `nobody` (`setpriv`, from a copy in a directory `nobody` can read); as any other user it runs it as that user.
    @Test func runServesAsAnUnprivilegedUser() async throws {
        let room = try await RoomServer.start(id: "a", group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { try? await room.stop() } }
        let port = try await Self.freePort()
        let file = try Self.temporaryFile(Self.runConfig(port: port, backend: "127.0.0.1:\(room.port)", ""), name: "run.yaml")
        let directory = file.deletingLastPathComponent()
        defer { try? FileManager.default.removeItem(at: directory) }

        var executable = try Self.executable().path
        var arguments = ["run", "--config", file.path]
        if getuid() == 0 {
            let setpriv = "/usr/bin/setpriv"
            try #require(FileManager.default.isExecutableFile(atPath: setpriv), "\(setpriv) (util-linux) is needed to drop root")
            try #require(getpwnam("nobody") != nil, "the user nobody is needed")
            // The build directory may sit where nobody cannot reach it (under /root, say): run a copy.
            let copy = directory.appendingPathComponent("ott-proxy")
            try FileManager.default.copyItem(atPath: executable, toPath: copy.path)
            for path in [directory.path, copy.path, file.path] {
                try FileManager.default.setAttributes([.posixPermissions: path == file.path ? 0o644 : 0o755], ofItemAtPath: path)
            }
            arguments = ["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", copy.path] + arguments
            executable = setpriv
        }
        let err = Pipe()
        let process = SpawnedProcess(executable: executable, arguments: arguments, standardError: .pipe(err))
        try process.run()
        async let stderr = Self.readToEnd(err)
        let listening = await Self.waitUntilListening(process, port: port)
        var status = 0
        var backend: String?
        if listening, let connection = try? await RawHTTPConnection.connect(port: port) {
            try? await connection.send("GET /rooms/lobby HTTP/1.1\r\nHost: example\r\n\r\n")
            let response = try? await connection.readResponse()
            status = response?.status ?? 0
            backend = response?.header("x-backend")
            await connection.close()
        }
        await Self.stop(process)
        let log = String(decoding: await stderr, as: UTF8.self)
        #expect(listening, "ott-proxy run never listened on \(port); log: \(log)")
        #expect(status == 200, "status \(status) (0: closed without an answer); log: \(log)")
        #expect(backend == "a", "log: \(log)")
    }

    @Test func adminTokenComesFromTheEnvironmentVariableNamed() async throws {
        let port = try await Self.freePort()
        let adminPort = try await Self.freePort()
        let file = try Self.temporaryFile(
            Self.runConfig(
                port: port,
                """
                admin:
                  port: \(adminPort)
                  token_env: OTT_PROXY_TEST_ADMIN_TOKEN
                  metrics_open: false

                """),
            name: "token.yaml"
        )
        defer { try? FileManager.default.removeItem(at: file.deletingLastPathComponent()) }
        var environment = ProcessInfo.processInfo.environment
        environment["OTT_PROXY_TEST_ADMIN_TOKEN"] = "from-env"
        let process = SpawnedProcess(
            executable: try Self.executable().path, arguments: ["run", "--config", file.path], environment: environment)
        try process.run()
        defer {
            process.terminate()
            process.waitUntilExit()
        }
        func metricsStatus(_ headers: [(String, String)]) async -> Int? {
            guard let connection = try? await RawHTTPConnection.connect(port: adminPort) else { return nil }
            defer { Task { await connection.close() } }
            return try? await connection.request("GET", "/metrics", headers: headers + [("Connection", "close")]).status
        }
        #expect(await WSSupport.waitUntil(timeout: .seconds(10)) { await metricsStatus([]) != nil })
        #expect(await metricsStatus([]) == 401)
        #expect(await metricsStatus([("Authorization", "Bearer wrong")]) == 401)
        #expect(await metricsStatus([("Authorization", "Bearer from-env")]) == 200)
    }
}
