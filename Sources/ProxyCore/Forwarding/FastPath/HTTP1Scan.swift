import NIOCore
import NIOHTTP1

/// The byte-level HTTP/1.1 pieces of the fast path (`FastPathHandler`): find where a head ends, parse a request or
/// response head, and follow a chunked body to its end without decoding it.
///
/// The request parser is deliberately strict and narrow: it accepts only the common, unambiguous shape (HTTP/1.1, an
/// origin-form target, token names, visible-ASCII values, no obsolete line folding) and returns `nil` for anything
/// else. `nil` is not an error: the fast path then hands the bytes to NIO's full parser (llhttp), which decides and
/// answers with the right 4xx. So this code never has to be right about an edge case, only about what it accepts.
enum HTTP1Scan {
    /// Offset just past the first `\r\n\r\n` in `bytes`, or `nil` when the head is not complete yet.
    static func headEnd(_ bytes: UnsafeRawBufferPointer, from start: Int = 0) -> Int? {
        var i = max(start, 3)
        let count = bytes.count
        while i < count {
            // Step by the last byte of the terminator: most positions are rejected by one comparison.
            let byte = bytes[i]
            if byte == lf {
                if bytes[i - 1] == cr && bytes[i - 2] == lf && bytes[i - 3] == cr { return i + 1 }
                i += 2
            } else if byte == cr {
                i += 1
            } else {
                i += 4
            }
        }
        return nil
    }

    /// Parses a complete request head (`bytes` ends with the empty line). `nil` for anything but a plain HTTP/1.1
    /// request with an origin-form target and well-formed fields.
    ///
    /// With `plainOnly`, also `nil` for a head the fast path does not forward itself, decided while its fields are
    /// read instead of by searching the parsed fields again: body framing (`Content-Length` or
    /// `Transfer-Encoding`), an `Upgrade` or `Expect` field, or anything but one `Host` field with one element (a
    /// non-empty value without a comma). Every head it lets through passes `RequestValidator.framing` as `.none`,
    /// `validateHost` and `upgradeProtocol` as nil; it may refuse a few that those would let through (an `Upgrade`
    /// without `Connection: upgrade`), which the full path then serves.
    static func parseRequestHead(_ bytes: UnsafeRawBufferPointer, plainOnly: Bool = false) -> HTTPRequestHead? {
        var cursor = 0
        // request-line = method SP request-target SP HTTP-version CRLF
        let methodStart = cursor
        while cursor < bytes.count, isUpperAlpha(bytes[cursor]) { cursor += 1 }
        guard cursor > methodStart, cursor - methodStart <= 16, cursor < bytes.count, bytes[cursor] == sp else { return nil }
        let method = HTTPMethod(rawValue: string(bytes, methodStart, cursor))
        if case .RAW = method { return nil }
        if method == .CONNECT { return nil }
        cursor += 1
        let targetStart = cursor
        guard cursor < bytes.count, bytes[cursor] == UInt8(ascii: "/") else { return nil }
        while cursor < bytes.count, bytes[cursor] > sp, bytes[cursor] < 0x7F { cursor += 1 }
        guard cursor < bytes.count, bytes[cursor] == sp else { return nil }
        let uri = string(bytes, targetStart, cursor)
        cursor += 1
        guard matches(bytes, at: cursor, "HTTP/1.1\r\n") else { return nil }
        cursor += 10
        guard let headers = parseFields(bytes, from: cursor, plainRequest: plainOnly) else { return nil }
        return HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: headers)
    }

    /// Parses a complete response head. `nil` when it is malformed (the fast path answers `502`).
    static func parseResponseHead(_ bytes: UnsafeRawBufferPointer) -> HTTPResponseHead? {
        guard let line = parseStatusLine(bytes), let headers = parseFields(bytes, from: line.end) else { return nil }
        let reason = string(bytes, line.reason.lowerBound, line.reason.upperBound)
        let status = HTTPResponseStatus(statusCode: line.code, reasonPhrase: reason)
        return HTTPResponseHead(version: HTTPVersion(major: 1, minor: line.minor), status: status, headers: headers)
    }

    /// Writes the head sent to the backend for a complete plain request head (`bytes`, already accepted by
    /// `parseRequestHead`, without body framing), byte for byte what `ProxyHandler.forwardedHead` with no rewrites,
    /// then `ForwardingHeaders.upstreamRequestHead` and `writeRequestHead` would write. `added` are fields set with
    /// replace-or-add semantics before that (the pool's key and epoch headers). Returns `false`, with `out` unchanged,
    /// when the general path must build it: `Connection` naming other fields, `Proxy-Connection`, an existing
    /// `X-Forwarded-For` or `Via` (they are merged, not replaced).
    static func rewriteRequestHead(
        _ bytes: UnsafeRawBufferPointer, method: HTTPMethod, added: [(name: String, value: String)], clientIP: String,
        scheme: String, into out: inout ByteBuffer
    ) -> Bool {
        // The request line was validated by `parseRequestHead`: copy it.
        var cursor = 0
        while cursor + 1 < bytes.count, !(bytes[cursor] == cr && bytes[cursor + 1] == lf) { cursor += 1 }
        cursor += 2
        let start = out.writerIndex
        out.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[0..<cursor]))
        var host: UnsafeRawBufferPointer?
        var writer = FieldWriter()
        let complete = forEachField(bytes, from: cursor) { name, value, line in
            switch name.count {
            case 3 where equalsLowercased(name, "via"),
                15 where equalsLowercased(name, "x-forwarded-for"),
                16 where equalsLowercased(name, "proxy-connection"):
                return false
            case 10 where equalsLowercased(name, "connection"):
                var ok = true
                forEachElement(value) { element in
                    if !equalsLowercased(element, "close") && !equalsLowercased(element, "keep-alive") { ok = false }
                }
                return ok
            case 2 where equalsLowercased(name, "te"), 7 where equalsLowercased(name, "trailer"),
                7 where equalsLowercased(name, "upgrade"), 10 where equalsLowercased(name, "keep-alive"),
                17 where equalsLowercased(name, "transfer-encoding"),
                16 where equalsLowercased(name, "x-forwarded-host"), 17 where equalsLowercased(name, "x-forwarded-proto"):
                return true
            case 4 where equalsLowercased(name, "host"):
                host = value
            default:
                if added.contains(where: { field in
                    field.name.utf8.withContiguousStorageIfAvailable { asciiCaseInsensitiveEquals(name, $0) } ?? false
                }) {
                    return true
                }
            }
            writer.keep(name, value, line: line, of: bytes, into: &out)
            return true
        }
        guard complete else {
            out.moveWriterIndex(to: start)
            return false
        }
        writer.flush(bytes, into: &out)
        for field in added {
            out.writeString(field.name)
            out.writeStaticString(": ")
            out.writeString(field.value)
            out.writeStaticString("\r\n")
        }
        if method.mayHaveRequestBody {
            out.writeStaticString("content-length: 0\r\n")
        }
        out.writeStaticString("x-forwarded-for: ")
        out.writeString(clientIP)
        out.writeStaticString("\r\nx-forwarded-proto: ")
        out.writeString(scheme)
        out.writeStaticString("\r\n")
        if let host {
            out.writeStaticString("x-forwarded-host: ")
            out.writeBytes(host)
            out.writeStaticString("\r\n")
        }
        out.writeStaticString("via: 1.1 ott-proxy\r\n\r\n")
        return true
    }

    /// status-line = HTTP-version SP 3DIGIT SP [ reason-phrase ] CRLF, HTTP/1.0 or 1.1; `end` is past its CRLF.
    private static func parseStatusLine(_ bytes: UnsafeRawBufferPointer) -> (minor: Int, code: Int, reason: Range<Int>, end: Int)? {
        guard matches(bytes, at: 0, "HTTP/1."), bytes.count > 12 else { return nil }
        let minor: Int
        switch bytes[7] {
        case UInt8(ascii: "0"): minor = 0
        case UInt8(ascii: "1"): minor = 1
        default: return nil
        }
        guard bytes[8] == sp, isDigit(bytes[9]), isDigit(bytes[10]), isDigit(bytes[11]) else { return nil }
        let code = Int(bytes[9] &- 48) * 100 + Int(bytes[10] &- 48) * 10 + Int(bytes[11] &- 48)
        guard code >= 100 else { return nil }
        var cursor = 12
        var reasonStart = 12
        if bytes[cursor] == sp {
            cursor += 1
            reasonStart = cursor
            cursor = fieldValueEnd(bytes, from: cursor)
        }
        guard matches(bytes, at: cursor, "\r\n") else { return nil }
        return (minor, code, reasonStart..<cursor, cursor + 2)
    }

    /// What `rewriteResponseHead` learned about a final response.
    struct ResponseSummary: Equatable {
        enum Framing: Equatable {
            case none
            case length(Int)
            case chunked
            case close
        }

        var status: Int
        var framing: Framing
        /// Whether the backend's connection may carry another request (`HTTPResponseHead.isKeepAlive`).
        var upstreamKeepAlive: Bool
        /// Whether the client connection closes after this response.
        var closeAfter: Bool
    }

    /// Writes the client's response head for a complete final response head (`bytes`), byte for byte what
    /// `ForwardingHeaders.downstreamResponseHead` followed by `writeResponseHead` would write, without building
    /// strings or `HTTPHeaders`. Returns `nil`, with `out` unchanged, for what the general path must handle: an
    /// interim or `101` status, a `Connection` field naming other fields, `Proxy-Connection`, `Via`, a transfer coding
    /// other than `chunked`, both framings, an invalid `Content-Length`, anything malformed.
    static func rewriteResponseHead(
        _ bytes: UnsafeRawBufferPointer, requestMethod: HTTPMethod, clientKeepAlive: Bool, into out: inout ByteBuffer
    ) -> ResponseSummary? {
        guard let line = parseStatusLine(bytes), line.code >= 200 else { return nil }
        let (minor, code) = (line.minor, line.code)
        let start = out.writerIndex
        let mayHaveBody: Bool
        if code == 200 {
            // Most responses: the line NIO's encoder writes for `.ok`, without building the status or its strings.
            out.writeStaticString("HTTP/1.1 200 OK\r\n")
            mayHaveBody = requestMethod != .HEAD
        } else {
            var status = HTTPResponseStatus(statusCode: code)
            if case .custom = status {
                status = HTTPResponseStatus(
                    statusCode: code, reasonPhrase: string(bytes, line.reason.lowerBound, line.reason.upperBound))
            }
            out.writeStaticString("HTTP/1.1 ")
            out.writeString(String(code))
            out.writeStaticString(" ")
            out.writeString(status.reasonPhrase)
            out.writeStaticString("\r\n")
            mayHaveBody = status.mayHaveResponseBody(for: requestMethod)
        }
        var length: Int?
        var chunked = false
        // NIO's `isKeepAlive`: any `close` closes, a second `keep-alive` does too ("clearly bad").
        var keepAliveState: Bool?
        func fail() -> ResponseSummary? {
            out.moveWriterIndex(to: start)
            return nil
        }
        var writer = FieldWriter()
        let complete = forEachField(bytes, from: line.end) { name, value, fieldLine in
            switch name.count {
            case 3 where equalsLowercased(name, "via"),
                16 where equalsLowercased(name, "proxy-connection"):
                return false
            case 10 where equalsLowercased(name, "connection"):
                var ok = true
                forEachElement(value) { element in
                    if equalsLowercased(element, "close") {
                        keepAliveState = false
                    } else if equalsLowercased(element, "keep-alive") {
                        keepAliveState = keepAliveState == nil
                    } else {
                        ok = false
                    }
                }
                return ok
            case 17 where equalsLowercased(name, "transfer-encoding"):
                guard !chunked, equalsLowercased(value, "chunked") else { return false }
                chunked = true
                return true
            case 14 where equalsLowercased(name, "content-length"):
                guard let parsed = parseLength(value), length == nil || length == parsed else { return false }
                length = parsed
                if code == 204 { return true }
            case 2 where equalsLowercased(name, "te"), 7 where equalsLowercased(name, "trailer"),
                7 where equalsLowercased(name, "upgrade"), 10 where equalsLowercased(name, "keep-alive"):
                return true
            default:
                break
            }
            writer.keep(name, value, line: fieldLine, of: bytes, into: &out)
            return true
        }
        guard complete else { return fail() }
        guard !(chunked && length != nil) else { return fail() }
        writer.flush(bytes, into: &out)

        let framing: ResponseSummary.Framing
        if !mayHaveBody {
            framing = .none
        } else if chunked {
            framing = .chunked
        } else if let length {
            framing = length == 0 ? .none : .length(length)
        } else {
            framing = .close
        }
        if mayHaveBody && length == nil {
            out.writeStaticString("transfer-encoding: chunked\r\n")
        }
        if !clientKeepAlive {
            out.writeStaticString("connection: close\r\n")
        }
        out.writeStaticString(minor == 0 ? "via: 1.0 ott-proxy\r\n\r\n" : "via: 1.1 ott-proxy\r\n\r\n")
        return ResponseSummary(
            status: code, framing: framing, upstreamKeepAlive: keepAliveState ?? (minor == 1),
            closeAfter: !clientKeepAlive)
    }

    /// Calls `body` with each comma-separated element of a field value, trimmed, empty ones skipped.
    private static func forEachElement(_ value: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) -> Void) {
        var start = 0
        while start <= value.count {
            var end = start
            while end < value.count, value[end] != UInt8(ascii: ",") { end += 1 }
            var low = start
            var high = end
            while low < high, value[low] == sp || value[low] == tab { low += 1 }
            while high > low, value[high - 1] == sp || value[high - 1] == tab { high -= 1 }
            if high > low { body(UnsafeRawBufferPointer(rebasing: value[low..<high])) }
            start = end + 1
        }
    }

    /// 1*DIGIT, at most 18 digits.
    private static func parseLength(_ value: UnsafeRawBufferPointer) -> Int? {
        guard !value.isEmpty, value.count <= 18 else { return nil }
        var result = 0
        for b in value {
            guard isDigit(b) else { return nil }
            result = result * 10 + Int(b &- 48)
        }
        return result
    }

    @inline(__always)
    private static func equalsLowercased(_ bytes: UnsafeRawBufferPointer, _ lower: StaticString) -> Bool {
        lower.withUTF8Buffer { asciiCaseInsensitiveEquals(bytes, $0) }
    }

    /// With `plainRequest`, also nil unless the fields are those of a plain request (`parseRequestHead(_:plainOnly:)`).
    private static func parseFields(
        _ bytes: UnsafeRawBufferPointer, from start: Int, plainRequest: Bool = false
    ) -> HTTPHeaders? {
        var fields: [(String, String)] = []
        fields.reserveCapacity(8)
        var hosts = 0
        let complete = forEachField(bytes, from: start) { name, value, _ in
            if plainRequest {
                switch name.count {
                case 4 where equalsLowercased(name, "host"):
                    hosts += 1
                    if value.isEmpty || value.contains(UInt8(ascii: ",")) { return false }
                case 6 where equalsLowercased(name, "expect"), 7 where equalsLowercased(name, "upgrade"),
                    14 where equalsLowercased(name, "content-length"),
                    17 where equalsLowercased(name, "transfer-encoding"):
                    return false
                default:
                    break
                }
            }
            fields.append((String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self)))
            return true
        }
        return complete && (!plainRequest || hosts == 1) ? HTTPHeaders(fields) : nil
    }

    /// Walks the field lines from `start` to the empty line that ends the head, which must be the end of `bytes`:
    /// field-line = field-name ":" OWS field-value OWS CRLF, with token names and visible-ASCII values (obs-text and
    /// obsolete folding are refused). `body` gets each name and trimmed value and returns `false` to stop. Returns
    /// `true` when every line was well formed and `body` never stopped.
    private static func forEachField(
        _ bytes: UnsafeRawBufferPointer, from start: Int,
        _ body: (_ name: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer, _ line: Range<Int>?) -> Bool
    ) -> Bool {
        var cursor = start
        while true {
            if matches(bytes, at: cursor, "\r\n") {
                return cursor + 2 == bytes.count
            }
            let lineStart = cursor
            let nameStart = cursor
            while cursor < bytes.count, isTokenByte(bytes[cursor]) { cursor += 1 }
            guard cursor > nameStart, cursor < bytes.count, bytes[cursor] == UInt8(ascii: ":") else { return false }
            let name = UnsafeRawBufferPointer(rebasing: bytes[nameStart..<cursor])
            cursor += 1
            while cursor < bytes.count, bytes[cursor] == sp || bytes[cursor] == tab { cursor += 1 }
            let valueStart = cursor
            cursor = fieldValueEnd(bytes, from: cursor)
            var valueEnd = cursor
            while valueEnd > valueStart, bytes[valueEnd - 1] == sp || bytes[valueEnd - 1] == tab { valueEnd -= 1 }
            guard matches(bytes, at: cursor, "\r\n") else { return false }
            // Already `name: value` CRLF (one space, nothing to trim): the line can be copied as it is.
            let normalized = valueStart == name.count + nameStart + 2 && bytes[nameStart + name.count + 1] == sp
                && valueEnd == cursor
            cursor += 2
            let value = UnsafeRawBufferPointer(rebasing: bytes[valueStart..<valueEnd])
            guard body(name, value, normalized ? lineStart..<cursor : nil) else { return false }
        }
    }

    /// Writes kept field lines in order, copying runs of consecutive lines that are already in the form
    /// `name: value` CRLF in one piece (instead of four writes per field).
    private struct FieldWriter {
        private var run: Range<Int>?

        mutating func keep(
            _ name: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer, line: Range<Int>?,
            of bytes: UnsafeRawBufferPointer, into out: inout ByteBuffer
        ) {
            if let line, let current = self.run, current.upperBound == line.lowerBound {
                self.run = current.lowerBound..<line.upperBound
                return
            }
            self.flush(bytes, into: &out)
            if let line {
                self.run = line
            } else {
                writeField(name, value, into: &out)
            }
        }

        mutating func flush(_ bytes: UnsafeRawBufferPointer, into out: inout ByteBuffer) {
            if let run = self.run {
                out.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[run]))
                self.run = nil
            }
        }
    }

    /// Writes `name: value` CRLF.
    @inline(__always)
    private static func writeField(_ name: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer, into out: inout ByteBuffer) {
        out.writeBytes(name)
        out.writeStaticString(": ")
        out.writeBytes(value)
        out.writeStaticString("\r\n")
    }

    @inline(__always)
    private static func string(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ end: Int) -> String {
        String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<end]), as: UTF8.self)
    }

    @inline(__always)
    private static func matches(_ bytes: UnsafeRawBufferPointer, at offset: Int, _ literal: StaticString) -> Bool {
        let length = literal.utf8CodeUnitCount
        guard offset + length <= bytes.count else { return false }
        return literal.withUTF8Buffer { literalBytes in
            for i in 0..<length where bytes[offset + i] != literalBytes[i] { return false }
            return true
        }
    }

    @inline(__always) private static func isUpperAlpha(_ b: UInt8) -> Bool { b &- 65 < 26 }
    @inline(__always) private static func isDigit(_ b: UInt8) -> Bool { b &- 48 < 10 }

    /// Visible ASCII, space and tab. Bytes above 0x7E (obs-text) are left to the full parser.
    @inline(__always) private static func isFieldValueByte(_ b: UInt8) -> Bool { (b >= sp && b < 0x7F) || b == tab }

    /// The offset of the first byte from `start` on that `isFieldValueByte` refuses (the CR ending the line, for a
    /// well-formed one), or `bytes.count`. Eight bytes at a time while all of them are space or visible ASCII (the
    /// usual case), then one at a time from the first word holding anything else (a tab, the CR): values make up
    /// most of a head. For nginx's head of a static file the rewrite went from 326 to 277 ns (package-benchmark
    /// `HTTP1Scan.headEnd + rewriteResponseHead`, p50).
    @inline(__always) static func fieldValueEnd(_ bytes: UnsafeRawBufferPointer, from start: Int) -> Int {
        var cursor = start
        let count = bytes.count
        while cursor &+ 8 <= count {
            let word = bytes.loadUnaligned(fromByteOffset: cursor, as: UInt64.self)
            // Some byte below 0x20 (Hacker's Delight "has less than"), some byte above 0x7E ("has more than"). Both
            // tests are exact about whether such a byte exists, which is all that is asked here.
            let below = (word &- 0x2020_2020_2020_2020) & ~word & 0x8080_8080_8080_8080
            let above = ((word &+ 0x0101_0101_0101_0101) | word) & 0x8080_8080_8080_8080
            if below | above != 0 { break }
            cursor &+= 8
        }
        while cursor < count, isFieldValueByte(bytes[cursor]) { cursor += 1 }
        return cursor
    }

    /// RFC 9110 tchar: ALPHA, DIGIT and ``!#$%&'*+-.^_`|~``, as two bit masks (bit b of `low` for byte b < 64, of
    /// `high` for 64 ≤ b < 128). Bit tests, not a table: a `static let` array is reached through its lazy
    /// initializer's accessor on every byte, which showed as 1.4 % of the proxy's user time under load.
    @inline(__always) static func isTokenByte(_ b: UInt8) -> Bool {
        let low: UInt64 = 0x03FF_6CFA_0000_0000
        let high: UInt64 = 0x57FF_FFFF_C7FF_FFFE
        return b < 64 ? (low >> UInt64(b)) & 1 == 1 : b < 128 && (high >> UInt64(b &- 64)) & 1 == 1
    }
}

private let cr = UInt8(ascii: "\r")
private let lf = UInt8(ascii: "\n")
private let sp = UInt8(ascii: " ")
private let tab = UInt8(ascii: "\t")

/// Follows a `Transfer-Encoding: chunked` body byte by byte (data skipped in bulk) to find where it ends, so the
/// fast path can relay it verbatim and know when the response is complete.
struct ChunkedBodyScanner {
    enum Malformed: Error { case invalid }

    private enum State {
        case size
        case sizeLF
        case data(Int)
        case dataCR
        case dataLF
        case trailerLineStart
        case trailerLine
        case finalLF
        case done
    }

    private var state: State = .size
    private var size = 0
    private var sizeDigits = 0
    private var inExtension = false
    private var lineLength = 0

    /// Longest size line or trailer line accepted (chunk extensions and trailers are rare and short).
    static let maxLineLength = 4096

    var isComplete: Bool {
        if case .done = self.state { return true }
        return false
    }

    /// Consumes `bytes`; returns the offset just past the body's end when it ends within them, `nil` when more is
    /// needed. Throws on a malformed body.
    mutating func scan(_ bytes: UnsafeRawBufferPointer) throws(Malformed) -> Int? {
        var i = 0
        while i < bytes.count {
            switch self.state {
            case .size:
                let b = bytes[i]
                if b == cr {
                    guard self.sizeDigits > 0 else { throw .invalid }
                    self.state = .sizeLF
                } else if self.inExtension {
                    try self.countLine()
                } else if let digit = hexValue(b) {
                    guard self.sizeDigits < 15 else { throw .invalid }
                    self.size = self.size << 4 | digit
                    self.sizeDigits += 1
                } else if b == UInt8(ascii: ";") || b == sp || b == tab {
                    guard self.sizeDigits > 0 else { throw .invalid }
                    self.inExtension = true
                    try self.countLine()
                } else {
                    throw .invalid
                }
                i += 1
            case .sizeLF:
                guard bytes[i] == lf else { throw .invalid }
                i += 1
                self.state = self.size == 0 ? .trailerLineStart : .data(self.size)
                self.size = 0
                self.sizeDigits = 0
                self.inExtension = false
                self.lineLength = 0
            case .data(let remaining):
                let take = min(remaining, bytes.count - i)
                i += take
                self.state = take == remaining ? .dataCR : .data(remaining - take)
            case .dataCR:
                guard bytes[i] == cr else { throw .invalid }
                i += 1
                self.state = .dataLF
            case .dataLF:
                guard bytes[i] == lf else { throw .invalid }
                i += 1
                self.state = .size
            case .trailerLineStart:
                if bytes[i] == cr {
                    self.state = .finalLF
                } else {
                    self.lineLength = 0
                    self.state = .trailerLine
                    try self.countLine()
                }
                i += 1
            case .trailerLine:
                if bytes[i] == lf {
                    self.state = .trailerLineStart
                } else {
                    try self.countLine()
                }
                i += 1
            case .finalLF:
                guard bytes[i] == lf else { throw .invalid }
                self.state = .done
                return i + 1
            case .done:
                return i
            }
        }
        return nil
    }

    private mutating func countLine() throws(Malformed) {
        self.lineLength += 1
        if self.lineLength > Self.maxLineLength { throw .invalid }
    }

    @inline(__always)
    private func hexValue(_ b: UInt8) -> Int? {
        switch b {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return Int(b &- 48)
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return Int(b &- 87)
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return Int(b &- 55)
        default: return nil
        }
    }
}
