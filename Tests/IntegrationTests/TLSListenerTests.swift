import Foundation
import NIOCore
import NIOHTTP1
import NIOConcurrencyHelpers
import NIOPosix
import NIOSSL
import ProxyCore
import DemoBackends
import RedisTestSupport
import Testing

/// A TLS listener terminates TLS and forwards plain HTTP, telling the backend the scheme was https.
@Suite struct TLSListenerTests {
    /// A throwaway self-signed certificate made with the openssl CLI (Debian's `openssl` package).
    static func makeCertificate(in directory: URL) async throws -> (cert: String, key: String) {
        let cert = directory.appendingPathComponent("cert.pem").path
        let key = directory.appendingPathComponent("key.pem").path
        let process = SpawnedProcess(
            executable: "/usr/bin/openssl",
            arguments: [
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days", "1",
                "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert,
            ])
        try process.run()
        await process.exited()
        guard process.terminationStatus == 0 else { throw CocoaError(.fileWriteUnknown) }
        return (cert, key)
    }

    /// A proxy with a TLS listener (a throwaway certificate) in front of a room server, and a way to open TLS client
    /// connections to it that collect what they receive.
    static func withTLSProxy(
        room id: String,
        _ body: (ProxyHarness, _ connect: () async throws -> (Channel, NIOLockedValueBoxBytes)) async throws -> Void
    ) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("ott-tls-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let (certPath, keyPath) = try await Self.makeCertificate(in: directory)

        let group = MultiThreadedEventLoopGroup.singleton
        let room = try await RoomServer.start(id: id, group: group)
        try await withProxy(backends: [(id: id, port: room.port)], configure: { config in
            config.listeners[0].tls = TLSConfig(certificatePath: certPath, keyPath: keyPath)
        }) { proxy in
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.trustRoots = .file(certPath)
            let sslContext = try NIOSSLContext(configuration: tls)
            try await body(proxy) {
                let collected = NIOLockedValueBoxBytes()
                let channel = try await ClientBootstrap(group: group)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(
                                try NIOSSLClientHandler(context: sslContext, serverHostname: "localhost"))
                            try channel.pipeline.syncOperations.addHandler(ByteCollector(sink: collected))
                        }
                    }
                    .connect(host: "127.0.0.1", port: proxy.port).get()
                return (channel, collected)
            }
        }
        try await room.stop()
    }

    @Test("a certificate or key that cannot be loaded fails the start, naming the listener, the file and why")
    func unloadableFilesAreNamed() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("ott-tls-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let (certPath, keyPath) = try await Self.makeCertificate(in: directory)
        let garbage = directory.appendingPathComponent("garbage.pem").path
        try "not a certificate\n".write(toFile: garbage, atomically: true, encoding: .utf8)
        let missing = directory.appendingPathComponent("missing.pem").path
        let cases: [(cert: String, key: String, expected: String)] = [
            (missing, keyPath, "listener 'test': cannot load its TLS certificate from \(missing): no such file or directory"),
            (garbage, keyPath, "listener 'test': cannot load its TLS certificate from \(garbage): not a PEM certificate"),
            (certPath, missing, "listener 'test': cannot load its TLS private key from \(missing): no such file or directory"),
            (certPath, garbage, "listener 'test': cannot load its TLS private key from \(garbage): not a PEM private key"),
        ]
        for (cert, key, expected) in cases {
            var config = ProxyConfig(
                listeners: [ListenerConfig(name: "test", address: "127.0.0.1", port: 0, pool: "main")],
                pools: [PoolConfig(name: "main")],
                logging: LoggingConfig(level: .critical, format: .logfmt, accessLog: false))
            config.listeners[0].tls = TLSConfig(certificatePath: cert, keyPath: key)
            let server = try ProxyServer(config: config, group: MultiThreadedEventLoopGroup.singleton)
            do {
                try await server.start()
                Issue.record("started with certificate \(cert) and key \(key)")
                await server.shutdown()
            } catch {
                #expect("\(error)".hasPrefix(expected), "\(error)")
            }
        }
    }

    @Test func httpsListenerForwardsToPlainBackend() async throws {
        try await Self.withTLSProxy(room: "tls-a") { proxy, connect in
            let (channel, collected) = try await connect()
            try await channel.writeAndFlush(
                ByteBuffer(string: "GET /rooms/secure HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
            try await channel.closeFuture.get()
            let text = collected.text
            #expect(text.hasPrefix("HTTP/1.1 200"))
            #expect(text.lowercased().contains("x-backend: tls-a"))
            #expect(text.contains("\"room\":\"secure\""))
        }
    }
}

extension TLSListenerTests {
    /// A WebSocket through a TLS listener works, and stays on NIO channels where its encryption is: the tunnel relay
    /// (on by default) copies raw bytes and must never take a TLS connection's socket.
    @Test func webSocketThroughATLSListenerStaysOnNIOAndWorks() async throws {
        try await Self.withTLSProxy(room: "tls-ws") { proxy, connect in
            #expect(proxy.server.runtime.config.threads.tunnelRelay)
            let (channel, collected) = try await connect()
            try await channel.writeAndFlush(ByteBuffer(string: WSSupport.upgradeRequest(path: "/rooms/secure/ws", host: "localhost")))
            let joined = await WSSupport.waitUntil(timeout: .seconds(5)) { collected.text.contains("\"event\":\"joined\"") }
            #expect(joined, "received: \(collected.text)")
            #expect(collected.text.hasPrefix("HTTP/1.1 101"))
            // Give a hand-over time to happen, were it (wrongly) attempted; then the tunnel must still carry frames.
            try await Task.sleep(for: .milliseconds(200))
            #expect(proxy.server.relayedTunnelsTotal == 0)
            let mask: [UInt8] = [1, 2, 3, 4]
            let payload = Array("over tls".utf8).enumerated().map { $0.element ^ mask[$0.offset % 4] }
            try await channel.writeAndFlush(ByteBuffer(bytes: [0x81, 0x80 | UInt8(payload.count)] + mask + payload))
            let echoed = await WSSupport.waitUntil(timeout: .seconds(5)) { collected.text.contains("\"text\":\"over tls\"") }
            #expect(echoed, "received: \(collected.text)")
            try await channel.close()
        }
    }
}

final class NIOLockedValueBoxBytes: Sendable {
    private let box = NIOLockedValueBox<[UInt8]>([])
    func append(_ buffer: ByteBuffer) { self.box.withLockedValue { $0.append(contentsOf: buffer.readableBytesView) } }
    var text: String { String(decoding: self.box.withLockedValue { $0 }, as: UTF8.self) }
}

final class ByteCollector: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let sink: NIOLockedValueBoxBytes
    init(sink: NIOLockedValueBoxBytes) { self.sink = sink }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { self.sink.append(Self.unwrapInboundIn(data)) }
    func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
}
