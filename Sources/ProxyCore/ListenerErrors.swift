import NIOCore

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
