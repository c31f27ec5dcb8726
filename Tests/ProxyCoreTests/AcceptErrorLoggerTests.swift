import Logging
import NIOCore
import NIOEmbedded
import Synchronization
import Testing

@testable import ProxyCore

/// The handler at the end of each listening socket's pipeline: what NIO reports there (a failed accept, a connection
/// that could not be set up) is logged, at most once per interval, with the count of the ones not logged.
@Suite struct AcceptErrorLoggerTests {
    final class Lines: Sendable {
        let lines = Mutex<[(message: String, metadata: Logger.Metadata)]>([])
    }

    struct Capture: LogHandler {
        let lines: Lines
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { self.metadata[key] }
            set { self.metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            let entry = (message: "\(event.message)", metadata: self.metadata.merging(event.metadata ?? [:]) { $1 })
            self.lines.lines.withLock { $0.append(entry) }
        }
    }

    struct Refused: Error, CustomStringConvertible {
        var description: String { "setsockopt(SO_DEBUG) failed: permission denied" }
    }

    @Test func logsTheFirstErrorThenAtMostOnePerIntervalWithTheCountInBetween() throws {
        let lines = Lines()
        let logger = Logger(label: "test") { _ in Capture(lines: lines) }
        let clock = Mutex(NIODeadline.uptimeNanoseconds(1_000_000_000))
        let handler = AcceptErrorLogger(
            listener: "public", logger: logger, interval: .seconds(10), now: { clock.withLock { $0 } })
        let channel = EmbeddedChannel(handler: handler)
        let advance = { (seconds: Int64) in clock.withLock { $0 = $0 + .seconds(seconds) } }

        channel.pipeline.fireErrorCaught(Refused())
        #expect(lines.lines.withLock { $0.count } == 1)
        advance(1)
        channel.pipeline.fireErrorCaught(Refused())
        advance(1)
        channel.pipeline.fireErrorCaught(Refused())
        #expect(lines.lines.withLock { $0.count } == 1, "within the interval nothing more is logged")
        advance(9)
        channel.pipeline.fireErrorCaught(Refused())

        let logged = lines.lines.withLock { $0 }
        try #require(logged.count == 2)
        #expect(logged[0].message == "could not accept or set up a connection")
        #expect(logged[0].metadata["listener"] == "public")
        #expect(logged[0].metadata["error"] == "setsockopt(SO_DEBUG) failed: permission denied")
        #expect(logged[0].metadata["not_logged_since"] == nil)
        #expect(logged[1].metadata["not_logged_since"] == "2")
        _ = try? channel.finish()
    }
}
