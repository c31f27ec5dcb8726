import NIOCore
import NIOHTTP1
import NIOPosix

struct RawHTTPResponse {
    let status: HTTPResponseStatus
    let headers: HTTPHeaders
    let body: String
}

/// A tiny HTTP/1.1 client over a bare `ClientBootstrap`: sends the given GETs one after another
/// on a single TCP connection, so tests can observe keep-alive reuse on the server.
enum RawHTTPClient {
    static func get(
        _ paths: [String],
        host: String = "127.0.0.1",
        port: Int,
        group: any EventLoopGroup
    ) async throws -> [RawHTTPResponse] {
        let channel = try await ClientBootstrap(group: group)
            .connect(host: host, port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(
                        wrappingChannelSynchronously: channel
                    )
                }
            }

        return try await channel.executeThenClose { inbound, outbound in
            var responses: [RawHTTPResponse] = []
            var parts = inbound.makeAsyncIterator()
            for path in paths {
                var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path)
                head.headers.add(name: "Host", value: "\(host):\(port)")
                try await outbound.write(contentsOf: [.head(head), .end(nil)])
                responses.append(try await Self.readResponse(from: &parts))
            }
            return responses
        }
    }

    private static func readResponse(
        from parts: inout NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator
    ) async throws -> RawHTTPResponse {
        var head: HTTPResponseHead?
        var body = ByteBuffer()
        while let part = try await parts.next() {
            switch part {
            case .head(let responseHead):
                head = responseHead
            case .body(var chunk):
                body.writeBuffer(&chunk)
            case .end:
                guard let head else { throw TestFailure(description: "response ended before its head") }
                return RawHTTPResponse(status: head.status, headers: head.headers, body: String(buffer: body))
            }
        }
        throw TestFailure(description: "connection closed mid-response")
    }
}
