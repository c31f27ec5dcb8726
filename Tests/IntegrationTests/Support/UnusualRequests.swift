/// Requests the raw paths (the fast path, the HTTP relay) leave to NIO's full HTTP path, and the status each must
/// still be answered with there.
enum UnusualRequests {
    static let cases: [(request: String, status: Int)] = [
        ("GET /echo HTTP/1.0\r\nHost: test\r\n\r\n", 200),
        ("GET /echo HTTP/1.1\r\n\r\n", 400),  // no Host: the full path's answer
        ("GET /echo HTTP/1.1\r\nHost: test\r\nX: caf\u{e9}\r\n\r\n", 200),  // obs-text in a value
        ("GET /continue HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok", 100),
        // A head over `max_header_bytes` (32 KiB), sent in one write: refused as one that arrives slowly is.
        ("GET /echo HTTP/1.1\r\nHost: test\r\nX-Big: \(String(repeating: "x", count: 40_000))\r\n\r\n", 431),
        ("GARBAGE\r\n\r\n", 400),
    ]
}
