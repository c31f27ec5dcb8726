import NIOCore
import NIOHTTP1

/// How a response body is delimited, for the paths that relay responses from raw bytes: the fast path
/// (`FastPathHandler`) and the HTTP relay threads (`HTTPRelayShard`).
enum ResponseBodyFraming {
    case none
    case length(Int)
    case chunked(ChunkedBodyScanner)
    /// Until the backend closes; re-chunked for the client.
    case close

    init(_ framing: HTTP1Scan.ResponseSummary.Framing) {
        switch framing {
        case .none: self = .none
        case .length(let length): self = .length(length)
        case .chunked: self = .chunked(ChunkedBodyScanner())
        case .close: self = .close
        }
    }

    /// The framing of a final response head parsed by the general path (`HTTP1Scan.parseResponseHead`), or why it
    /// cannot be relayed (the `502`'s log message).
    static func of(_ head: HTTPResponseHead, requestMethod: HTTPMethod) -> Result<ResponseBodyFraming, ResponseFramingError> {
        if !head.status.mayHaveResponseBody(for: requestMethod) {
            return .success(.none)
        }
        if head.headers.contains(name: "transfer-encoding") {
            // Chunked must be the last (and here: the only) coding; anything else is for the full path to reject.
            let codings = head.headers.elements("transfer-encoding")
            guard codings.count == 1, asciiCaseInsensitiveEquals(codings[0].utf8, "chunked".utf8) else {
                return .failure(ResponseFramingError(message: "unsupported transfer-encoding from backend"))
            }
            return .success(.chunked(ChunkedBodyScanner()))
        }
        if head.headers.contains(name: "content-length") {
            let lengths = head.headers.elements("content-length")
            guard let first = lengths.first, let length = RequestValidator.parseContentLength(first),
                lengths.allSatisfy({ RequestValidator.parseContentLength($0) == length })
            else {
                return .failure(ResponseFramingError(message: "invalid content-length from backend"))
            }
            return .success(length == 0 ? .none : .length(length))
        }
        return .success(.close)
    }

    /// Takes the part of `bytes` (what the backend sent next) that belongs to the body: how many bytes, and whether
    /// the body ends with them. Bytes past the end are the caller's to treat as garbage. `.close` takes everything
    /// and never ends here (the backend's close ends it). Throws on a malformed chunked body.
    mutating func take(_ bytes: UnsafeRawBufferPointer) throws(ChunkedBodyScanner.Malformed) -> (count: Int, ended: Bool) {
        switch self {
        case .none:
            return (0, true)
        case .length(let remaining):
            let count = min(remaining, bytes.count)
            self = .length(remaining - count)
            return (count, count == remaining)
        case .chunked(var scanner):
            let end = try scanner.scan(bytes)
            self = .chunked(scanner)
            return (end ?? bytes.count, end != nil)
        case .close:
            return (bytes.count, false)
        }
    }
}

struct ResponseFramingError: Error {
    let message: String
}

/// The proxy's own short answers on the raw paths (a `502` or `504` for a failed exchange, a `408` for a slow head),
/// the same bytes from `FastPathHandler` and `HTTPRelayShard`.
enum LocalAnswer {
    static func write(
        status: HTTPResponseStatus, reason: String, keepAlive: Bool, into bytes: inout ByteBuffer
    ) {
        let body = reason + "\n"
        bytes.writeString("HTTP/1.1 \(status.code) \(status.reasonPhrase)\r\n")
        bytes.writeStaticString("content-type: text/plain; charset=utf-8\r\n")
        bytes.writeString("content-length: \(body.utf8.count)\r\n")
        bytes.writeStaticString(keepAlive ? "connection: keep-alive\r\n\r\n" : "connection: close\r\n\r\n")
        bytes.writeString(body)
    }

    /// An interim (1xx) response head as it goes to the client: hop-by-hop fields removed, as on the full path.
    static func writeInterim(_ head: HTTPResponseHead, into bytes: inout ByteBuffer) {
        var interim = HTTPResponseHead(version: .http1_1, status: head.status, headers: head.headers)
        ForwardingHeaders.stripHopByHop(&interim.headers)
        bytes.writeResponseHead(interim)
    }

    /// One chunk of a close-delimited body, re-chunked for the client.
    static func writeChunk(_ body: UnsafeRawBufferPointer, into bytes: inout ByteBuffer) {
        bytes.writeString(String(body.count, radix: 16))
        bytes.writeStaticString("\r\n")
        bytes.writeBytes(body)
        bytes.writeStaticString("\r\n")
    }
}

/// The request head as it goes to the backend on the raw paths (`FastPathHandler`, `HTTPRelayShard`): rewritten from
/// the client's bytes when the byte-level rewrite takes them (`HTTP1Scan.rewriteRequestHead`), otherwise written from
/// the parsed head through `ForwardingHeaders`, which produce the same head.
enum ForwardedRequestHead {
    static func write(
        raw: UnsafeRawBufferPointer?, head: HTTPRequestHead, added: [(name: String, value: String)], clientIP: String,
        scheme: String, into out: inout ByteBuffer
    ) {
        if let raw,
            HTTP1Scan.rewriteRequestHead(raw, method: head.method, added: added, clientIP: clientIP, scheme: scheme, into: &out)
        {
            return
        }
        let upstreamHead = ForwardingHeaders.upstreamRequestHead(
            from: ProxyHandler.adding(added, to: head), framing: .none, upgrade: nil, clientIP: clientIP, scheme: scheme)
        out.writeRequestHead(upstreamHead)
    }
}
