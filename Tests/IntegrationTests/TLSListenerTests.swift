import Foundation
import NIOCore
import NIOHTTP1
import NIOConcurrencyHelpers
import NIOPosix
import NIOSSL
import ProxyCore
import DemoBackends
import Testing

/// A TLS listener terminates TLS and forwards plain HTTP, telling the backend the scheme was https.
@Suite struct TLSListenerTests {
    /// A throwaway self-signed certificate made with the openssl CLI (Debian's `openssl` package).
    static func makeCertificate(in directory: URL) throws -> (cert: String, key: String) {
        let cert = directory.appendingPathComponent("cert.pem").path
        let key = directory.appendingPathComponent("key.pem").path
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        process.arguments = [
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days", "1",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert,
        ]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw CocoaError(.fileWriteUnknown) }
        return (cert, key)
    }

    @Test func httpsListenerForwardsToPlainBackend() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("ott-tls-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let (certPath, keyPath) = try Self.makeCertificate(in: directory)

        let group = MultiThreadedEventLoopGroup.singleton
        let room = try await RoomServer.start(id: "tls-a", group: group)
        try await withProxy(backends: [(id: "tls-a", port: room.port)], configure: { config in
            config.listeners[0].tls = TLSConfig(certificatePath: certPath, keyPath: keyPath)
        }) { proxy in
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.trustRoots = .file(certPath)
            let sslContext = try NIOSSLContext(configuration: tls)
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
            try await channel.writeAndFlush(
                ByteBuffer(string: "GET /rooms/secure HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
            try await channel.closeFuture.get()
            let text = collected.text
            #expect(text.hasPrefix("HTTP/1.1 200"))
            #expect(text.lowercased().contains("x-backend: tls-a"))
            #expect(text.contains("\"room\":\"secure\""))
        }
        try await room.stop()
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
