import ArgumentParser
import DemoBackends
import NIOPosix

struct WebSocketCat: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wscat",
        abstract: "A minimal WebSocket client: sends each line of standard input as a text message, prints what arrives."
    )

    @Argument(help: "A ws:// URL, e.g. ws://127.0.0.1:8080/rooms/lobby/ws")
    var url: String

    func run() async throws {
        guard self.url.hasPrefix("ws://") else {
            throw ValidationError("only ws:// URLs are supported")
        }
        let rest = self.url.dropFirst("ws://".count)
        let authority = rest.prefix { $0 != "/" }
        let path = rest.dropFirst(authority.count)
        let parts = authority.split(separator: ":")
        guard let host = parts.first, let port = parts.count > 1 ? Int(parts[1]) : 80 else {
            throw ValidationError("cannot read host and port from \(self.url)")
        }
        let client = try await WebSocketClient.connect(
            host: String(host), port: port, path: path.isEmpty ? "/" : String(path), group: MultiThreadedEventLoopGroup.singleton)
        print("connected to \(self.url); type a line to send it, Ctrl-D to close")
        let reader = Task {
            while let message = try await client.receive() {
                switch message {
                case .text(let text): print("< \(text)")
                case .binary(let bytes): print("< [\(bytes.count) bytes]")
                case .pong: print("< pong")
                case .close(let code): print("< close \(code.map(String.init) ?? "-")"); return
                }
            }
        }
        while let line = readLine() {
            try await client.sendText(line)
        }
        await client.close()
        _ = try? await reader.value
    }
}
