import NIOCore
import NIOHTTP1

/// Entry points into the fast path's byte scanners for the package-benchmark suite (`Benchmarks/`), which is a
/// separate package and cannot see internal symbols. Not API: `@_spi(Benchmarks) import ProxyCore` to use it.
@_spi(Benchmarks)
public enum HTTP1ScanBenchmarks {
    /// `HTTP1Scan.parseRequestHead`: the parsed head, nil when it needs the general path.
    public static func requestHead(_ bytes: UnsafeRawBufferPointer) -> HTTPRequestHead? {
        HTTP1Scan.parseRequestHead(bytes)
    }

    /// `HTTP1Scan.rewriteRequestHead` for a head `requestHead` accepted, adding `added` (as the pool's key fields are
    /// added): `false`, with `out` unchanged, when the general path must build it.
    public static func rewriteRequestHead(
        _ bytes: UnsafeRawBufferPointer, method: HTTPMethod, added: [(name: String, value: String)], clientIP: String,
        into out: inout ByteBuffer
    ) -> Bool {
        HTTP1Scan.rewriteRequestHead(bytes, method: method, added: added, clientIP: clientIP, scheme: "http", into: &out)
    }

    /// `HTTP1Scan.rewriteResponseHead` for a keep-alive client connection, with the summary: the status and the body length that follows the head (nil
    /// when the response is not length-delimited), or nil overall when the head needs the general path.
    public static func rewriteResponseHead(
        _ bytes: UnsafeRawBufferPointer, requestMethod: HTTPMethod, into out: inout ByteBuffer
    ) -> (status: Int, bodyLength: Int?, upstreamKeepAlive: Bool)? {
        guard let summary = HTTP1Scan.rewriteResponseHead(
            bytes, requestMethod: requestMethod, clientKeepAlive: true, into: &out)
        else { return nil }
        switch summary.framing {
        case .none: return (summary.status, 0, summary.upstreamKeepAlive)
        case .length(let length): return (summary.status, length, summary.upstreamKeepAlive)
        case .chunked, .close: return (summary.status, nil, summary.upstreamKeepAlive)
        }
    }

    /// `HTTP1Scan.headEnd`.
    public static func headEnd(_ bytes: UnsafeRawBufferPointer) -> Int? {
        HTTP1Scan.headEnd(bytes)
    }
}

@_spi(Benchmarks)
extension ProxyMetrics {
    /// What the fast path records at a response's end (`requests_total` by status class and the duration histogram),
    /// as one call a measurement tool can make per request; `nil` for an unknown listener.
    public func requestRecorder(listener: String) -> ((_ status: Int, _ nanoseconds: Int64) -> Void)? {
        guard let counters = self.requestCounters(listener: listener) else { return nil }
        let duration = self.requestDuration
        return { status, nanoseconds in
            counters.count(status: status)
            duration.recordNanoseconds(nanoseconds)
        }
    }
}
