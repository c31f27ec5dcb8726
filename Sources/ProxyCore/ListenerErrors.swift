import CProxySys
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

/// One descriptor (`/dev/null`) the process keeps in reserve, so that a listener whose `accept` fails for want of
/// descriptors (`EMFILE`, `ENFILE`) can still take its waiting connections off the queue and close them.
///
/// Why: SwiftNIO keeps a listening socket's read pending after such an error, and the kernel keeps reporting it
/// readable while connections wait, so NIO retries the `accept` at once, forever: a whole CPU until a descriptor
/// frees up, and the waiting clients hang. `limits.max_connections` is lowered to what the open-file limit holds
/// (`OpenFilesLimit`), but descriptors can still run out for other reasons (idle pooled backend connections, more
/// backends than planned, descriptors inherited from the parent). With the reserve, the listener closes the reserve,
/// accepts and closes every waiting connection, and opens the reserve again, as libuv does (`uv__emfile_trick`):
/// a client beyond the descriptors is closed at once, as one beyond `max_connections` is, and nothing spins.
/// Best effort: when another thread takes the freed descriptor first, nothing is shed this time.
enum ListenerShedding {
    private static let reserve = Mutex<Int32>(-1)

    /// Opens the reserve if it is not open (when a listener starts, and again after each use).
    static func prepare() {
        Self.reserve.withLock { reserve in
            if reserve < 0 { reserve = open("/dev/null", O_RDONLY | O_CLOEXEC) }
        }
    }

    /// Whether the reserve is open now (for tests).
    static var isPrepared: Bool { Self.reserve.withLock { $0 >= 0 } }

    /// Frees the reserve, closes the connections waiting on the listening socket `fd`, and takes the reserve back:
    /// how many connections it closed, and whether it emptied the queue (`accept` found nothing more) rather than
    /// stopping at an error (out of descriptors still, when the reserve was gone).
    static func shedWaiting(on fd: Int32) -> (closed: Int, emptied: Bool) {
        Self.reserve.withLock { reserve in
            if reserve >= 0 {
                close(reserve)
                reserve = -1
            }
            var stoppedBy: Int32 = 0
            let closed = Int(cproxy_shed_waiting(fd, &stoppedBy))
            reserve = open("/dev/null", O_RDONLY | O_CLOEXEC)
            return (closed, stoppedBy == EAGAIN || stoppedBy == EWOULDBLOCK)
        }
    }

    /// The descriptor of a listening channel: NIO has no accessor for it, so it is read from the channel's description
    /// (`fd=N`, as `TunnelHandler.descriptor(of:)` does) and confirmed to be a listening TCP socket on the channel's
    /// address; nil when it cannot be confirmed.
    static func descriptor(ofListening channel: Channel) -> Int32? {
        guard let fd = TunnelHandler.describedDescriptor(of: channel), let local = channel.localAddress else { return nil }
        let listening = local.withSockAddr { address, length in cproxy_is_listening_on(fd, address, UInt32(length)) }
        return listening == 1 ? fd : nil
    }

    /// Whether `error` says the process or the system is out of descriptors.
    static func isOutOfDescriptors(_ error: Error) -> Bool {
        guard let io = error as? IOError else { return false }
        return io.errnoCode == EMFILE || io.errnoCode == ENFILE
    }
}

/// The last handler of a listening socket's pipeline: logs what NIO reports there and nobody else would, at warning:
/// a failed `accept` (out of descriptors, say) and an accepted connection that could not be set up (a socket option
/// the kernel refused, a pipeline that failed); NIO closes such a connection at once and, without this, silently.
/// At most one line per `interval`, with how many were not logged since the last one. When `accept` failed for want
/// of descriptors and the listening socket's descriptor is known, it also closes the connections waiting there
/// (`ListenerShedding`), and the line says how many it closed since the last one; such a failure with no connection
/// waiting is not logged.
final class AcceptErrorHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = Never

    private struct State {
        var lastLogged: NIODeadline?
        var suppressed = 0
        var shed = 0
    }

    private let listener: String
    private let listeningFD: Int32?
    private let logger: Logger
    private let interval: TimeAmount
    private let now: @Sendable () -> NIODeadline
    private let state = Mutex(State())

    init(
        listener: String, listeningFD: Int32?, logger: Logger, interval: TimeAmount = .seconds(10),
        now: @escaping @Sendable () -> NIODeadline = { .now() }
    ) {
        self.listener = listener
        self.listeningFD = listeningFD
        self.logger = logger
        self.interval = interval
        self.now = now
        if listeningFD != nil { ListenerShedding.prepare() }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        var shed = 0
        if let fd = self.listeningFD, ListenerShedding.isOutOfDescriptors(error) {
            let result = ListenerShedding.shedWaiting(on: fd)
            shed = result.closed
            // Nothing was waiting: NIO's accept loop tried once more after taking the last connection that fit (the
            // kernel fails `accept` for want of a descriptor before it looks at the queue). No client was turned
            // away, so there is nothing to say yet. (Without the reserve nothing can be shed: that is logged.)
            if shed == 0, result.emptied { return }
        }
        let now = self.now()
        let counts: (suppressed: Int, shed: Int)? = self.state.withLock { state in
            state.shed += shed
            if let last = state.lastLogged, now - last < self.interval {
                state.suppressed += 1
                return nil
            }
            defer {
                state.suppressed = 0
                state.shed = 0
            }
            state.lastLogged = now
            return (state.suppressed, state.shed)
        }
        guard let counts else { return }
        var metadata: Logger.Metadata = ["listener": "\(self.listener)", "error": "\(error)"]
        if counts.suppressed > 0 { metadata["not_logged_since"] = "\(counts.suppressed)" }
        if counts.shed > 0 { metadata["waiting_connections_closed"] = "\(counts.shed)" }
        self.logger.warning("could not accept or set up a connection", metadata: metadata)
    }
}
