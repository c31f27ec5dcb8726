// ws-echo-origin: a small, fast WebSocket echo origin for the side-by-side load benchmarks
// (scripts/bench-compare.sh). Every text/binary frame is sent straight back; pings get pongs; a close is answered
// and the connection closed. Requests without an upgrade get no answer (the scripts probe the port with TCP).
//
//   ws-echo-origin [--host 127.0.0.1] --port 18091 [--port 18092 ...] [--threads 1]
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

#if canImport(Glibc)
import Glibc
#endif

/// Echoes data frames unchanged (server frames are never masked).
final class EchoHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    private var sentClose = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = Self.unwrapInboundIn(data)
        switch frame.opcode {
        case .binary, .text, .continuation:
            let reply = WebSocketFrame(fin: frame.fin, opcode: frame.opcode, data: frame.unmaskedData)
            context.write(Self.wrapOutboundOut(reply), promise: nil)
        case .ping:
            let reply = WebSocketFrame(fin: true, opcode: .pong, data: frame.unmaskedData)
            context.write(Self.wrapOutboundOut(reply), promise: nil)
        case .connectionClose:
            if !self.sentClose {
                self.sentClose = true
                var data = frame.unmaskedData
                let code = data.readSlice(length: min(2, data.readableBytes)) ?? context.channel.allocator.buffer(capacity: 0)
                let reply = WebSocketFrame(fin: true, opcode: .connectionClose, data: code)
                context.writeAndFlush(Self.wrapOutboundOut(reply)).whenComplete { _ in context.close(promise: nil) }
            }
        default:
            break
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

func configure(_ channel: any Channel) throws {
    let upgrader = NIOWebSocketServerUpgrader(
        maxFrameSize: 1 << 20,
        automaticErrorHandling: true,
        shouldUpgrade: { channel, _ in channel.eventLoop.makeSucceededFuture(HTTPHeaders()) },
        upgradePipelineHandler: { channel, _ in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(EchoHandler())
            }
        }
    )
    // No handler after the HTTP codec: a plain HTTP handler there could see the first frame's raw bytes when a client
    // sends it right after the 101 (before the upgrade has finished rearranging the pipeline). Only upgrades count.
    let upgrade: NIOHTTPServerUpgradeConfiguration = (upgraders: [upgrader], completionHandler: { _ in })
    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withServerUpgrade: upgrade)
}

var host = "127.0.0.1"
var ports: [Int] = []
var threads = 1
var args = CommandLine.arguments.dropFirst().makeIterator()
while let arg = args.next() {
    switch arg {
    case "--host": host = args.next() ?? host
    case "--port": if let p = args.next().flatMap(Int.init) { ports.append(p) }
    case "--threads": threads = args.next().flatMap(Int.init) ?? threads
    default:
        print("usage: ws-echo-origin [--host H] --port P [--port P2 ...] [--threads N]")
        exit(2)
    }
}
if ports.isEmpty { ports = [18091] }

let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
var channels: [any Channel] = []
for port in ports {
    let channel = try ServerBootstrap(group: group)
        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        .serverChannelOption(.backlog, value: 4096)
        .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
        .childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try configure(channel) }
        }
        .bind(host: host, port: port)
        .wait()
    channels.append(channel)
    print("ws-echo-origin listening on \(host):\(port)")
}
for channel in channels {
    try channel.closeFuture.wait()
}
