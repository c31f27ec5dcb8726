import Foundation
import NIOCore
import NIOPosix

/// A throwaway `redis-server` for tests: bound to 127.0.0.1 on a free port, no persistence (`--save ''`,
/// `--appendonly no`), DEBUG enabled (for `DEBUG SLEEP`), its files in a temporary directory.
///
/// ```swift
/// try await RedisServerProcess.with(password: "secret") { server in
///     let configuration = try RedisConfiguration(url: server.url)
///     ...
/// }
/// ```
/// With `tls: true` it serves TLS only (`--tls-port`), with a self-signed certificate for `localhost` and 127.0.0.1
/// made by `openssl` (`certificateFile`); `url` is then `rediss://localhost:<port>`.
/// `stop()` kills it (SIGKILL) and waits for it to exit; `start()` starts it again on the same port (a restart).
/// Any test target can use it: depend on the `RedisTestSupport` target. Needs the `redis-server` binary
/// (the Debian `redis-server` package, which `scripts/lib.sh` installs).
public final class RedisServerProcess: @unchecked Sendable {
    public enum Failure: Error, CustomStringConvertible {
        case executableNotFound
        case didNotStart(String)

        public var description: String {
            switch self {
            case .executableNotFound: return "redis-server not found on PATH (install the redis-server package)"
            case .didNotStart(let why): return "redis-server did not start: \(why)"
            }
        }
    }

    public let port: Int
    public let password: String?
    public let extraArguments: [String]
    public let tls: Bool
    public let directory: URL
    private let lock = NSLock()
    private var process: SpawnedProcess?

    /// Sends `signal` to the server (`SIGSTOP` and `SIGCONT` make it stop answering for a while); false when it is
    /// not running.
    @discardableResult
    public func signal(_ signal: Int32) -> Bool {
        guard let process = self.lock.withLock({ self.process }), process.isRunning else { return false }
        return kill(process.processIdentifier, signal) == 0
    }

    /// `redis://[:password@]127.0.0.1:<port>`
    public var url: String {
        let scheme = self.tls ? "rediss" : "redis"
        let host = self.tls ? "localhost" : "127.0.0.1"
        if let password { return "\(scheme)://:\(password)@\(host):\(self.port)" }
        return "\(scheme)://\(host):\(self.port)"
    }

    /// The self-signed certificate (PEM) of a TLS server.
    public var certificateFile: URL { self.directory.appendingPathComponent("cert.pem") }

    public var logFile: URL { self.directory.appendingPathComponent("redis.log") }

    private init(port: Int, password: String?, extraArguments: [String], tls: Bool) throws {
        self.port = port
        self.tls = tls
        self.password = password
        self.extraArguments = extraArguments
        self.directory = FileManager.default.temporaryDirectory.appendingPathComponent("ott-redis-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: self.directory, withIntermediateDirectories: true)
    }

    deinit {
        if let process, process.isRunning {
            kill(process.processIdentifier, SIGKILL)
        }
        try? FileManager.default.removeItem(at: self.directory)
    }

    /// Starts a server on a free port (retrying on another port if the chosen one was taken meanwhile).
    public static func start(
        password: String? = nil, tls: Bool = false, arguments: [String] = []
    ) async throws -> RedisServerProcess {
        var lastError: Error = Failure.didNotStart("no attempt")
        for _ in 0..<3 {
            let server = try RedisServerProcess(
                port: try await Self.freePort(), password: password, extraArguments: arguments, tls: tls
            )
            do {
                try await server.start()
                return server
            } catch {
                lastError = error
                await server.stop()
            }
        }
        throw lastError
    }

    /// Runs `body` with a started server and always stops it afterwards.
    public static func with<T>(
        password: String? = nil, tls: Bool = false, arguments: [String] = [],
        _ body: (RedisServerProcess) async throws -> T
    ) async throws -> T {
        let server = try await Self.start(password: password, tls: tls, arguments: arguments)
        do {
            let result = try await body(server)
            await server.stop()
            return result
        } catch {
            await server.stop()
            throw error
        }
    }

    /// Starts (or restarts after `stop()`) the server on this port and waits until it answers PING.
    public func start() async throws {
        guard let executable = Self.executable() else { throw Failure.executableNotFound }
        var arguments = self.tls ? try await self.tlsArguments() : ["--port", String(self.port)]
        arguments += [
            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self.directory.path, "--logfile", self.logFile.path, "--daemonize", "no",
            "--enable-debug-command", "yes",
        ]
        if let password { arguments += ["--requirepass", password] }
        arguments += self.extraArguments
        // The log is appended to by every start: only what this start writes counts.
        let logStart = (try? FileManager.default.attributesOfItem(atPath: self.logFile.path)[.size] as? Int) ?? 0
        let process = SpawnedProcess(executable: executable, arguments: arguments)
        try process.run()
        self.lock.withLock { self.process = process }

        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline {
            guard process.isRunning else {
                throw Failure.didNotStart("exited with \(process.terminationStatus): \(self.logTail())")
            }
            // Over TLS a plain PING cannot be sent, and a port that accepts may be someone else's: another test can
            // bind the port between `freePort()` and this server's bind (this server then fails to bind and exits,
            // but a connection made first reached the other listener, and a TLS client failed its handshake with
            // WRONG_VERSION_NUMBER). Redis logs that it is ready only once its own sockets listen.
            if self.tls {
                if self.log(from: logStart).contains("Ready to accept connections"), await Self.accepts(port: self.port) { return }
            } else if await Self.answersPing(port: self.port) {
                return
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw Failure.didNotStart("no PONG on port \(self.port) within 10 s: \(self.logTail())")
    }

    private func tlsArguments() async throws -> [String] {
        let key = self.directory.appendingPathComponent("key.pem")
        if !FileManager.default.fileExists(atPath: self.certificateFile.path) {
            let openssl = SpawnedProcess(
                executable: "/usr/bin/env",
                arguments: [
                    "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", key.path, "-out", self.certificateFile.path,
                ])
            try openssl.run()
            await openssl.exited()
            guard openssl.terminationStatus == 0 else { throw Failure.didNotStart("openssl could not make a certificate") }
        }
        return [
            "--port", "0", "--tls-port", String(self.port), "--tls-cert-file", self.certificateFile.path,
            "--tls-key-file", key.path, "--tls-auth-clients", "no",
        ]
    }

    /// Whether the port accepts TCP connections.
    static func accepts(port: Int) async -> Bool {
        do {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(.milliseconds(500))
                .connect(host: "127.0.0.1", port: port).get()
            try? await channel.close()
            return true
        } catch {
            return false
        }
    }

    /// Kills the server (SIGKILL) and waits until it has exited.
    public func stop() async {
        guard let process = self.lock.withLock({ () -> SpawnedProcess? in
            defer { self.process = nil }
            return self.process
        }) else { return }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
        }
        while process.isRunning {
            try? await Task.sleep(for: .milliseconds(5))
        }
    }

    public var isRunning: Bool { self.lock.withLock { self.process?.isRunning ?? false } }

    /// The log from byte `offset` on.
    private func log(from offset: Int) -> String {
        guard let data = try? Data(contentsOf: self.logFile), data.count > offset else { return "" }
        return String(decoding: data[offset...], as: UTF8.self)
    }

    private func logTail() -> String {
        let text = (try? String(contentsOf: self.logFile, encoding: .utf8)) ?? ""
        return String(text.suffix(2000))
    }

    public static func executable() -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let candidates = path.split(separator: ":").map { "\($0)/redis-server" } + ["/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server"]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// A loopback port that was free a moment ago (bound to port 0, then released).
    public static func freePort() async throws -> Int {
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .bind(host: "127.0.0.1", port: 0).get()
        let port = channel.localAddress?.port ?? 0
        try await channel.close()
        guard port > 0 else { throw Failure.didNotStart("could not find a free port") }
        return port
    }

    /// Whether something on the port answers `PING` like Redis (`+PONG`, or `-NOAUTH` with a password).
    public static func answersPing(port: Int, timeout: TimeAmount = .milliseconds(500)) async -> Bool {
        let group = MultiThreadedEventLoopGroup.singleton
        let reply = group.next().makePromise(of: String.self)
        do {
            let channel = try await ClientBootstrap(group: group)
                .connectTimeout(timeout)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(FirstLineHandler(promise: reply))
                    }
                }
                .connect(host: "127.0.0.1", port: port).get()
            defer { channel.close(promise: nil) }
            channel.eventLoop.scheduleTask(in: timeout) { reply.fail(ChannelError.connectTimeout(timeout)) }
            try await channel.writeAndFlush(ByteBuffer(string: "PING\r\n"))
            let line = try await reply.futureResult.get()
            return line.hasPrefix("+PONG") || line.hasPrefix("-NOAUTH")
        } catch {
            reply.fail(error)
            return false
        }
    }
}

private final class FirstLineHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private let promise: EventLoopPromise<String>
    private var received = ""

    init(promise: EventLoopPromise<String>) {
        self.promise = promise
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.received += String(buffer: self.unwrapInboundIn(data))
        if let end = self.received.range(of: "\r\n") {
            self.promise.succeed(String(self.received[..<end.lowerBound]))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.promise.fail(ChannelError.eof)
    }
}
