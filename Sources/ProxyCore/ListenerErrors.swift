import Logging
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

// Why a listener could not start: each names the listener first, as config errors name their file and key.

/// Another process listens on a listener's address and port (`threads.accept: per_loop`; `ListeningSockets`).
struct ListenerPortSharedError: Error, CustomStringConvertible {
    let listener: String
    let address: String
    let sockets: Int
    let own: Int

    var description: String {
        "listener '\(listener)': \(address) is already in use: another process listens there with SO_REUSEPORT "
            + "(\(sockets) listening sockets, \(own) of them this proxy's); stop it, or use another port"
    }
}

/// A listener's socket could not be bound or set up: names the listener and the address, then the system's reason.
struct ListenerBindError: Error, CustomStringConvertible {
    let listener: String
    let address: String
    let error: Error

    var description: String {
        let reason: String
        if let io = self.error as? IOError {
            reason = systemErrorText(io.errnoCode) + " (errno \(io.errnoCode))"
        } else {
            reason = "\(self.error)"
        }
        return "listener '\(self.listener)': cannot listen on \(self.address): \(reason)"
    }
}

/// A TLS listener's certificate or key could not be loaded: names the listener and the file.
struct ListenerTLSError: Error, CustomStringConvertible {
    let listener: String
    let message: String

    var description: String { "listener '\(self.listener)': \(self.message)" }
}

/// The C library's text for an `errno` value, lower-cased to sit inside a sentence ("address already in use").
func systemErrorText(_ code: Int32) -> String {
    String(cString: strerror(code)).lowercased()
}

/// The last handler of a listening socket's pipeline: logs what NIO reports there and nobody else would, at warning:
/// a failed `accept` (out of descriptors, say) and an accepted connection that could not be set up (a socket option
/// the kernel refused, a pipeline that failed); NIO closes such a connection at once and, without this, silently.
/// At most one line per `interval`, with how many were not logged since the last one.
final class AcceptErrorLogger: ChannelInboundHandler, Sendable {
    typealias InboundIn = Never

    private struct State {
        var lastLogged: NIODeadline?
        var suppressed = 0
    }

    private let listener: String
    private let logger: Logger
    private let interval: TimeAmount
    private let now: @Sendable () -> NIODeadline
    private let state = Mutex(State())

    init(
        listener: String, logger: Logger, interval: TimeAmount = .seconds(10),
        now: @escaping @Sendable () -> NIODeadline = { .now() }
    ) {
        self.listener = listener
        self.logger = logger
        self.interval = interval
        self.now = now
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        let now = self.now()
        let suppressed: Int? = self.state.withLock { state in
            if let last = state.lastLogged, now - last < self.interval {
                state.suppressed += 1
                return nil
            }
            defer { state.suppressed = 0 }
            state.lastLogged = now
            return state.suppressed
        }
        guard let suppressed else { return }
        var metadata: Logger.Metadata = ["listener": "\(self.listener)", "error": "\(error)"]
        if suppressed > 0 { metadata["not_logged_since"] = "\(suppressed)" }
        self.logger.warning("could not accept or set up a connection", metadata: metadata)
    }
}
