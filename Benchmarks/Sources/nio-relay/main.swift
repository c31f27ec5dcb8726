// nio-relay: the least a SwiftNIO proxy can do per connection, as a reference row for scripts/bench-compare.sh.
//
// Every accepted connection gets its own connection to one fixed origin, and bytes are glued both ways: one
// `channelRead` → `write` on the partner, one `flush` per read burst, nothing parsed, no routing, no pooling. It is
// not a proxy anyone should run; it measures the SwiftNIO floor (event loop, channels, pipelines, system calls) that
// any NIO-based proxy pays, so ott-proxy's own share of the cost can be read off as the difference.
// NIO defaults throughout (receive allocator, buffers, 16 reads per wake-up), `TCP_NODELAY` on both sides.
//
//   nio-relay [--host 127.0.0.1] --port 18140 --to 18081 [--threads 2]
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Forwards what one side reads to its partner and closes the partner when its own side closes.
final class GlueHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// The other side's handler; both live on the same event loop. Cleared on removal to break the cycle.
    var partner: GlueHandler?
    private var context: ChannelHandlerContext?

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.partner = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.partner?.context?.write(data, promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.partner?.context?.flush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.partner?.context?.close(promise: nil)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}

/// On a client connection: connects to the origin, glues the two, then starts reading the client.
final class ConnectHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    let host: String
    let originPort: Int

    init(host: String, originPort: Int) {
        self.host = host
        self.originPort = originPort
    }

    func channelActive(context: ChannelHandlerContext) {
        let client = context.channel
        let clientGlue = GlueHandler()
        // The origin connection is made on the client's own event loop, so the two handlers can point at each other.
        let boundGlue = NIOLoopBound(clientGlue, eventLoop: context.eventLoop)
        let origin = ClientBootstrap(group: client.eventLoop)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let originGlue = GlueHandler()
                    originGlue.partner = boundGlue.value
                    boundGlue.value.partner = originGlue
                    try channel.pipeline.syncOperations.addHandler(originGlue)
                }
            }
            .connect(host: self.host, port: self.originPort)
        let loopBound = NIOLoopBound((context, self, clientGlue), eventLoop: context.eventLoop)
        origin.whenComplete { result in
            let (context, handler, clientGlue) = loopBound.value
            switch result {
            case .success:
                do {
                    let sync = context.pipeline.syncOperations
                    try sync.addHandler(clientGlue)
                    sync.removeHandler(handler, promise: nil)
                } catch {
                    context.close(promise: nil)
                    return
                }
                client.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in client.read() }
            case .failure:
                context.close(promise: nil)
            }
        }
        context.fireChannelActive()
    }
}

// ------------------------------------------------------------------------------------------------------ arguments
var host = "127.0.0.1"
var port = 0
var originPort = 0
var threads = 2
var arguments = CommandLine.arguments.dropFirst()
func usage() -> Never {
    print("usage: nio-relay [--host 127.0.0.1] --port PORT --to ORIGIN_PORT [--threads 2]")
    exit(2)
}
while let flag = arguments.popFirst() {
    guard let value = arguments.popFirst() else { usage() }
    switch flag {
    case "--host": host = value
    case "--port": port = Int(value) ?? 0
    case "--to": originPort = Int(value) ?? 0
    case "--threads": threads = Int(value) ?? 0
    default: usage()
    }
}
guard port > 0, originPort > 0, threads > 0 else { usage() }

let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
let listenHost = host
let listenOriginPort = originPort
let server = try await ServerBootstrap(group: group)
    .serverChannelOption(.backlog, value: 1024)
    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
    .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
    // Nothing is read from a client before its origin connection exists.
    .childChannelOption(.autoRead, value: false)
    .childChannelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(ConnectHandler(host: listenHost, originPort: listenOriginPort))
        }
    }
    .bind(host: host, port: port)
    .get()
print("nio-relay: 127.0.0.1:\(port) -> \(host):\(originPort), \(threads) threads")
try await server.closeFuture.get()
