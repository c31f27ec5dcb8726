import NIOCore
import NIOHTTP1

/// Entry points into the fast path's byte scanners for the package-benchmark suite (`Benchmarks/`), which is a
/// separate package and cannot see internal symbols. Not API: `@_spi(Benchmarks) import ProxyCore` to use it.
@_spi(Benchmarks)
public enum HTTP1ScanBenchmarks {
    /// `HTTP1Scan.parseRequestHead`: `true` when the complete head in `bytes` takes the fast path.
    public static func parseRequestHead(_ bytes: UnsafeRawBufferPointer) -> Bool {
        HTTP1Scan.parseRequestHead(bytes) != nil
    }

    /// `HTTP1Scan.rewriteResponseHead` for a `GET` on a keep-alive client connection: the bytes written to `out`,
    /// or `nil` when the head needs the general path.
    public static func rewriteResponseHead(_ bytes: UnsafeRawBufferPointer, into out: inout ByteBuffer) -> Int? {
        let start = out.writerIndex
        guard HTTP1Scan.rewriteResponseHead(bytes, requestMethod: .GET, clientKeepAlive: true, into: &out) != nil
        else { return nil }
        return out.writerIndex - start
    }

    /// `HTTP1Scan.headEnd`.
    public static func headEnd(_ bytes: UnsafeRawBufferPointer) -> Int? {
        HTTP1Scan.headEnd(bytes)
    }
}
