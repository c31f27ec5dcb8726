import NIOCore
import NIOHTTP1
import NIOWebSocket

/// Plain HTTP side of the room server: `GET /rooms/{name}` returns room JSON, anything else a
/// text line naming the backend. Responses always use Content-Length framing so keep-alive works
/// (and so a proxy's connection reuse is observable through `acceptedConnections`).
final class RoomHTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let state: RoomServerState
    private var pendingHead: HTTPRequestHead?

    init(state: RoomServerState) {
        self.state = state
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch Self.unwrapInboundIn(data) {
        case .head(let head):
            self.pendingHead = head
        case .body:
            // Request bodies carry nothing for this server; dropping them keeps the connection reusable.
            break
        case .end:
            guard let head = self.pendingHead else { return }
            self.pendingHead = nil
            self.state.requestReceived()
            self.respond(to: head, context: context)
        }
    }

    private func respond(to head: HTTPRequestHead, context: ChannelHandlerContext) {
        let (contentType, body) = self.responseBody(for: head)
        let keepAlive = head.isKeepAlive

        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: String(body.utf8.count))
        headers.add(name: "X-Backend", value: self.state.backendID)
        // HTTP/1.1 is keep-alive by default and HTTP/1.0 is not, so only the non-default needs saying.
        if !keepAlive {
            headers.add(name: "Connection", value: "close")
        } else if head.version.major == 1 && head.version.minor == 0 {
            headers.add(name: "Connection", value: "keep-alive")
        }

        let responseHead = HTTPResponseHead(version: head.version, status: .ok, headers: headers)
        context.write(Self.wrapOutboundOut(.head(responseHead)), promise: nil)
        if head.method != .HEAD {
            let buffer = context.channel.allocator.buffer(string: body)
            context.write(Self.wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        }
        let endWritten = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(Self.wrapOutboundOut(.end(nil)), promise: endWritten)
        if !keepAlive {
            let channel = context.channel
            endWritten.futureResult.whenComplete { _ in channel.close(promise: nil) }
        }
    }

    private func responseBody(for head: HTTPRequestHead) -> (contentType: String, body: String) {
        let backend = self.state.backendID
        if case .room(let name) = RoomPath(uri: head.uri) {
            let loaded = self.state.rooms.load(name)
            let info = RoomInfo(room: name, backend: backend, members: loaded.members, created: loaded.created)
            return ("application/json", RoomJSON.encode(info))
        }
        return ("text/plain; charset=utf-8", "served by backend \(backend)\n")
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // The upgrader reports a declined upgrade (not a room URL) as an error before handing the
        // request to us as plain HTTP; that request still deserves its normal 200 answer.
        if error is NIOWebSocketUpgradeError { return }
        // Anything else means a broken connection with no one left to answer; just drop it.
        context.close(promise: nil)
    }
}
