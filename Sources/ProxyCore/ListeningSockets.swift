import CProxySys
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// The kernel's listening TCP sockets (asked over netlink, or read from `/proc/net/tcp` and `/proc/net/tcp6`), counted
/// to tell whether a listener's port is shared with someone else.
///
/// Why: with `threads.accept: per_loop` every event loop listens on the listener's port with `SO_REUSEPORT`, and the
/// kernel lets any other socket of the same user join that group. A second ott-proxy started by mistake with the same
/// configuration would then bind without an error and quietly take a share of the connections. After binding, the
/// proxy counts the sockets listening on the exact address and port; more than its own means another process listens
/// there too, and the start fails with an error naming the listener (as "address already in use" does without
/// `SO_REUSEPORT`).
enum ListeningSockets {
    /// How many sockets `table` (the text of `/proc/net/tcp` or `/proc/net/tcp6`) lists as listening on exactly
    /// `address` (its IP and port); nil for an address that is not IPv4 or IPv6.
    static func count(listeningOn address: SocketAddress, in table: String) -> Int? {
        self.count(listeningOn: address, in: Array(table.utf8))
    }

    /// The same over the table's bytes. A listening row reads `<local> <no peer> 0A`: the local address, a peer of all
    /// zeros, and the state TCP_LISTEN. That whole sequence is counted with `memmem` (`cproxy_count_occurrences`), not
    /// parsed row by row: the table has a row for every socket in every state, tens of thousands on a busy host.
    static func count(listeningOn address: SocketAddress, in table: [UInt8]) -> Int? {
        guard let local = self.procAddress(address) else { return nil }
        let noPeer: String
        switch address {
        case .v4: noPeer = "00000000:0000"
        default: noPeer = String(repeating: "0", count: 32) + ":0000"
        }
        let needle = Array(" \(local) \(noPeer) 0A ".utf8)
        return table.withUnsafeBytes { haystack in
            Int(cproxy_count_occurrences(haystack.baseAddress, UInt(haystack.count), needle, UInt(needle.count)))
        }
    }

    /// The same, from the running kernel: asked over `NETLINK_SOCK_DIAG` for listening sockets only, whose cost does
    /// not grow with the connections the host has (`/proc/net/tcp` lists every socket in every state: on a busy host
    /// tens of thousands of lines to read and parse); from `/proc` when netlink is refused; nil when neither answers.
    static func count(listeningOn address: SocketAddress) -> Int? {
        let asked = address.withSockAddr { cproxy_count_listeners($0, UInt32($1)) }
        if asked >= 0 { return Int(asked) }
        return self.countFromProc(listeningOn: address)
    }

    /// From `/proc/net/tcp` or `/proc/net/tcp6`; nil when the table cannot be read.
    static func countFromProc(listeningOn address: SocketAddress) -> Int? {
        let path: String
        switch address {
        case .v4: path = "/proc/net/tcp"
        case .v6: path = "/proc/net/tcp6"
        case .unixDomainSocket: return nil
        }
        guard let table = self.read(path) else { return nil }
        return self.count(listeningOn: address, in: table)
    }

    /// `address` as the kernel prints it there: each 32-bit word of the IP as the machine stores it, in upper-case
    /// hex (`%08X`), then `:` and the port (`%04X`). 127.0.0.1:8080 is `0100007F:1F90` on a little-endian machine.
    static func procAddress(_ address: SocketAddress) -> String? {
        func hex<T: BinaryInteger>(_ value: T, digits: Int) -> String {
            let text = String(value, radix: 16, uppercase: true)
            return String(repeating: "0", count: max(0, digits - text.count)) + text
        }
        guard let port = address.port else { return nil }
        switch address {
        case .v4(let v4):
            return hex(v4.address.sin_addr.s_addr, digits: 8) + ":" + hex(port, digits: 4)
        case .v6(let v6):
            var words = ""
            withUnsafeBytes(of: v6.address.sin6_addr) { bytes in
                for i in 0..<4 { words += hex(bytes.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self), digits: 8) }
            }
            return words + ":" + hex(port, digits: 4)
        case .unixDomainSocket:
            return nil
        }
    }

    private static func read(_ path: String) -> [UInt8]? {
        guard let file = fopen(path, "r") else { return nil }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&chunk, 1, chunk.count, file)
            if n <= 0 { break }
            bytes.append(contentsOf: chunk[0..<n])
        }
        return bytes
    }
}
