import NIOHTTP1

/// Pure rewriting of request and response heads as they cross the proxy (RFC 9110 §7.6).
///
/// Hop-by-hop fields describe one connection, not the message, so they never cross: the fixed set below, plus every
/// field named in `Connection`. Framing (`Content-Length`/`Transfer-Encoding`) is re-derived for the next hop from how
/// the message was actually framed, never copied blindly.
public enum ForwardingHeaders {
    /// The value the proxy adds to `Via` (RFC 9110 §7.6.3): protocol version and a pseudonym, never a host name.
    public static let viaValue = "1.1 ott-proxy"

    /// Removes hop-by-hop fields in place: the fixed set, and every field `Connection` (or the legacy
    /// `Proxy-Connection`) names, except the fields that only travel end to end.
    ///
    /// On every request and every response, so it compares names byte by byte, case-insensitively, instead of
    /// lower-casing them into new strings and hashing them (a profile put the earlier version at 6 % of the proxy's
    /// user time), and removes fields in place rather than rebuilding the headers.
    static func stripHopByHop(_ headers: inout HTTPHeaders) {
        var connection = false
        var found = false
        for field in headers where isHopByHop(field.name) {
            found = true
            if asciiEqualsLowercased(field.name, "connection") || asciiEqualsLowercased(field.name, "proxy-connection") {
                connection = true
                break
            }
        }
        guard found else { return }
        var listed: [Substring] = []
        if connection {
            listed = headers.elements("connection") + headers.elements("proxy-connection")
        }
        var drop: [String] = []
        for field in headers {
            let name = field.name
            let remove =
                isHopByHop(name)
                || (!listed.isEmpty && !isEndToEndOnly(name)
                    && listed.contains { asciiCaseInsensitiveEquals(name.utf8, $0.utf8) })
            if remove, !drop.contains(where: { asciiCaseInsensitiveEquals($0.utf8, name.utf8) }) {
                drop.append(name)
            }
        }
        for name in drop {
            headers.remove(name: name)
        }
    }

    /// The fixed hop-by-hop set (RFC 9110 §7.6.1, plus the legacy `Proxy-Connection`), any case.
    static func isHopByHop(_ name: String) -> Bool {
        switch name.utf8.count {
        case 2: return asciiEqualsLowercased(name, "te")
        case 7: return asciiEqualsLowercased(name, "trailer") || asciiEqualsLowercased(name, "upgrade")
        case 10: return asciiEqualsLowercased(name, "connection") || asciiEqualsLowercased(name, "keep-alive")
        case 16: return asciiEqualsLowercased(name, "proxy-connection")
        case 17: return asciiEqualsLowercased(name, "transfer-encoding")
        default: return false
        }
    }

    /// Fields that `Connection` cannot make hop-by-hop: removing them would change what the request means.
    static func isEndToEndOnly(_ name: String) -> Bool {
        asciiEqualsLowercased(name, "host") || asciiEqualsLowercased(name, "content-length")
            || asciiEqualsLowercased(name, "x-forwarded-for")
    }

    /// Builds the head sent to a backend.
    ///
    /// - Parameters:
    ///   - framing: how the client framed the body (decides `Content-Length` / chunked towards the backend).
    ///   - upgrade: the `Upgrade` value to pass on when the client asked to switch protocols.
    public static func upstreamRequestHead(
        from head: HTTPRequestHead,
        framing: RequestFraming,
        upgrade: String?,
        clientIP: String,
        scheme: String
    ) -> HTTPRequestHead {
        var headers = head.headers
        stripHopByHop(&headers)

        switch framing {
        case .none:
            // A request that may carry a body but has none must say so, or the encoder would chunk it.
            if head.method.mayHaveRequestBody {
                headers.replaceOrAdd(name: "content-length", value: "0")
            }
        case .contentLength(let length):
            headers.replaceOrAdd(name: "content-length", value: String(length))
        case .chunked:
            headers.remove(name: "content-length")
            headers.add(name: "transfer-encoding", value: "chunked")
        }

        if let upgrade {
            headers.add(name: "connection", value: "upgrade")
            headers.add(name: "upgrade", value: upgrade)
        }

        let existingFor = headers.elements("x-forwarded-for")
        if existingFor.isEmpty {
            headers.add(name: "x-forwarded-for", value: clientIP)
        } else {
            // Keep what earlier proxies said; collapse to one field so the backend sees a single list.
            headers.replaceOrAdd(name: "x-forwarded-for", value: existingFor.joined(separator: ", ") + ", " + clientIP)
        }
        headers.replaceOrAdd(name: "x-forwarded-proto", value: scheme)
        if let host = headers.first(name: "host") {
            headers.replaceOrAdd(name: "x-forwarded-host", value: host)
        }
        appendVia(&headers, requestVersion: head.version)

        return HTTPRequestHead(version: .http1_1, method: head.method, uri: head.uri, headers: headers)
    }

    /// Builds the head sent back to the client from the backend's response head, with framing decided here: the
    /// client-side encoder adds no framing of its own, because only the proxy knows the request's method.
    ///
    /// - Parameter keepAlive: whether the client connection may stay open after this response.
    /// - Returns: the head, and whether the client connection must close after it (an HTTP/1.0 client cannot be
    ///   sent a body of unknown length any other way).
    public static func downstreamResponseHead(
        from head: HTTPResponseHead,
        requestMethod: HTTPMethod,
        keepAlive: Bool,
        clientVersion: HTTPVersion
    ) -> (head: HTTPResponseHead, closeAfter: Bool) {
        var headers = head.headers
        let hasLength = headers.contains(name: "content-length")
        let upgrade = head.status == .switchingProtocols ? headers.first(name: "upgrade") : nil
        stripHopByHop(&headers)
        var closeAfter = !keepAlive

        if let upgrade {
            headers.add(name: "connection", value: "upgrade")
            headers.add(name: "upgrade", value: upgrade)
            closeAfter = false
        } else if !head.status.mayHaveResponseBody(for: requestMethod) {
            // A HEAD or 304 answer may keep Content-Length (it describes the representation); 1xx and 204 may not.
            if head.status == .noContent || head.status.code < 200 {
                headers.remove(name: "content-length")
            }
        } else if !hasLength {
            // Chunked or close-delimited upstream: chunk it for HTTP/1.1 clients, delimit by close for HTTP/1.0.
            if clientVersion.major == 1 && clientVersion.minor >= 1 {
                headers.add(name: "transfer-encoding", value: "chunked")
            } else {
                closeAfter = true
            }
        }
        if upgrade == nil {
            if closeAfter {
                headers.add(name: "connection", value: "close")
            } else if clientVersion == .http1_0 {
                headers.add(name: "connection", value: "keep-alive")
            }
        }
        appendVia(&headers, requestVersion: head.version)
        let version: HTTPVersion = clientVersion == .http1_0 ? .http1_0 : .http1_1
        return (HTTPResponseHead(version: version, status: head.status, headers: headers), closeAfter)
    }

    /// RFC 9110 §7.6.3: each proxy appends the protocol version it *received* the message with.
    private static func appendVia(_ headers: inout HTTPHeaders, requestVersion: HTTPVersion) {
        let entry = requestVersion == .http1_0 ? "1.0 ott-proxy" : viaValue
        let existing = headers.elements("via")
        if existing.isEmpty {
            headers.add(name: "via", value: entry)
        } else {
            headers.replaceOrAdd(name: "via", value: existing.joined(separator: ", ") + ", " + entry)
        }
    }
}

/// How a request body is delimited on the client connection.
public enum RequestFraming: Equatable, Sendable {
    case none
    case contentLength(Int)
    case chunked
}

/// Why a request head is refused before it is routed. Each maps to a status and a short reason for the client.
public enum RequestRejection: Error, Equatable, Sendable {
    case conflictingFraming
    case invalidContentLength
    case unsupportedTransferEncoding
    case missingHost
    case multipleHosts

    public var reason: String {
        switch self {
        case .conflictingFraming: return "bad request: both Content-Length and Transfer-Encoding"
        case .invalidContentLength: return "bad request: invalid Content-Length"
        case .unsupportedTransferEncoding: return "bad request: unsupported Transfer-Encoding"
        case .missingHost: return "bad request: missing Host header"
        case .multipleHosts: return "bad request: more than one Host header"
        }
    }
}

/// Request-smuggling defences (RFC 9112 §6.3): a request whose length two parsers could read differently is refused
/// and the connection closed, rather than guessed at.
public enum RequestValidator {
    public static func framing(of head: HTTPRequestHead) throws(RequestRejection) -> RequestFraming {
        let encodings = head.headers.elements("transfer-encoding")
        let lengths = head.headers.elements("content-length")
        // `canonicalForm` drops empty list elements, so a field whose value is empty (or only commas) would look
        // absent: decide on the fields' presence, not on what is left of their values.
        let hasEncoding = head.headers.contains(name: "transfer-encoding")
        let rawLengths = head.headers["content-length"]

        if hasEncoding {
            if !rawLengths.isEmpty { throw .conflictingFraming }
            // Only plain `chunked` is understood; anything else ("gzip, chunked", "xchunked", "chunked, identity",
            // or a Transfer-Encoding on HTTP/1.0) is a classic smuggling vector.
            guard head.version.minor >= 1, encodings.count == 1, encodings[0].lowercased() == "chunked" else {
                throw .unsupportedTransferEncoding
            }
            return .chunked
        }
        if !rawLengths.isEmpty {
            if rawLengths.contains(where: { $0.allSatisfy { $0 == "," } }) { throw .invalidContentLength }
            var value: Int? = nil
            for raw in lengths {
                guard let parsed = parseContentLength(raw) else { throw .invalidContentLength }
                if let value, value != parsed { throw .invalidContentLength }
                value = parsed
            }
            return .contentLength(value!)
        }
        return .none
    }

    public static func validateHost(of head: HTTPRequestHead) throws(RequestRejection) {
        let hosts = head.headers.elementCount("host")
        if hosts > 1 { throw .multipleHosts }
        if hosts == 0 && head.version.minor >= 1 && head.version.major == 1 { throw .missingHost }
    }

    static func parseContentLength(_ raw: Substring) -> Int? {
        guard !raw.isEmpty, raw.utf8.count <= 18, raw.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
        return Int(raw)
    }

    /// The protocol the client asks to switch to, when the request is a well-formed upgrade request.
    public static func upgradeProtocol(of head: HTTPRequestHead) -> String? {
        guard head.version == .http1_1, let upgrade = head.headers.first(name: "upgrade"), !upgrade.isEmpty else {
            return nil
        }
        let tokens = head.headers.elements("connection")
        guard tokens.contains(where: { asciiCaseInsensitiveEquals($0.utf8, "upgrade".utf8) }) else { return nil }
        return upgrade
    }
}

extension HTTPMethod {
    /// Methods whose requests conventionally carry a body; the others get no `Content-Length: 0` added.
    var mayHaveRequestBody: Bool {
        switch self {
        case .GET, .HEAD, .DELETE, .OPTIONS, .TRACE, .CONNECT: return false
        default: return true
        }
    }
}

extension HTTPResponseStatus {
    /// RFC 9110 §6.4.1: 1xx, 204 and 304 responses, and any response to HEAD, have no body.
    func mayHaveResponseBody(for method: HTTPMethod) -> Bool {
        if method == .HEAD { return false }
        switch self.code {
        case 100..<200, 204, 304: return false
        default: return true
        }
    }
}

/// `name` equals `lower` (a lower-case literal) ignoring ASCII case.
@inline(__always)
func asciiEqualsLowercased(_ name: String, _ lower: StaticString) -> Bool {
    // Header names are native strings: compare their contiguous bytes. Walking `String.UTF8View` element by element
    // (zip) showed up at 1 % of the proxy's user time, called for every header of every request and response.
    guard name.utf8.count == lower.utf8CodeUnitCount else { return false }
    return name.utf8.withContiguousStorageIfAvailable { bytes in
        lower.withUTF8Buffer { asciiCaseInsensitiveEquals(bytes, $0) }
    } ?? lower.withUTF8Buffer { asciiCaseInsensitiveEquals(name.utf8, $0) }
}

/// Two byte sequences are equal ignoring ASCII case.
@inline(__always)
func asciiCaseInsensitiveEquals<A: Collection<UInt8>, B: Collection<UInt8>>(_ a: A, _ b: B) -> Bool {
    guard a.count == b.count else { return false }
    for (x, y) in zip(a, b) where x != y {
        let fx = x &- 65 < 26 ? x | 0x20 : x
        let fy = y &- 65 < 26 ? y | 0x20 : y
        if fx != fy { return false }
    }
    return true
}

extension HTTPHeaders {
    /// What `self[canonicalForm: name]` gives for these (non-`Set-Cookie`) names: every `name` field's comma-separated
    /// elements, empty ones dropped, ASCII whitespace trimmed. Computed on UTF-8 bytes: NIO's version lower-cases the
    /// name into a new string and splits by `Character`, and with eight calls per request it cost a few percent of the
    /// proxy's time (`RequestValidator.validateHost` alone showed 2.5 % of user time in a profile).
    func elements(_ name: StaticString) -> [Substring] {
        var result: [Substring] = []
        self.forEachElement(name) { result.append($0) }
        return result
    }

    /// How many elements `elements(name)` has, without building the array (`validateHost` runs on every request).
    func elementCount(_ name: StaticString) -> Int {
        var count = 0
        self.forEachElement(name) { _ in count += 1 }
        return count
    }

    /// Calls `body` with each element `elements(name)` returns, in order.
    @inline(__always)
    func forEachElement(_ name: StaticString, _ body: (Substring) -> Void) {
        for (field, value) in self where asciiEqualsLowercased(field, name) {
            // Most values are one element with nothing to trim (`keep-alive`, a host name): take them whole.
            let whole = value.utf8.withContiguousStorageIfAvailable { bytes -> Bool in
                guard let first = bytes.first, let last = bytes.last else { return true }
                return !isASCIIWhitespace(first) && !isASCIIWhitespace(last) && !bytes.contains(UInt8(ascii: ","))
            }
            if whole == true {
                if !value.isEmpty { body(value[...]) }
                continue
            }
            let utf8 = value.utf8
            var start = utf8.startIndex
            while start < utf8.endIndex {
                var end = start
                while end < utf8.endIndex && utf8[end] != UInt8(ascii: ",") {
                    end = utf8.index(after: end)
                }
                if end > start {
                    var low = start
                    var high = end
                    while low < high && isASCIIWhitespace(utf8[low]) { low = utf8.index(after: low) }
                    while high > low && isASCIIWhitespace(utf8[utf8.index(before: high)]) { high = utf8.index(before: high) }
                    body(Substring(utf8[low..<high]))
                }
                guard end < utf8.endIndex else { break }
                start = utf8.index(after: end)
            }
        }
    }
}

@inline(__always)
private func isASCIIWhitespace(_ byte: UInt8) -> Bool {
    byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") || byte == UInt8(ascii: "\r") || byte == UInt8(ascii: "\n")
}
