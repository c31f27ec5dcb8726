import CProxySys
import NIOCore
import NIOPosix
import Testing

#if canImport(Glibc)
import Glibc
#endif

@testable import ProxyCore

/// `ListeningSockets`: the census of the kernel's listening sockets that tells a shared `SO_REUSEPORT` port.
/// The netlink answer alone (no `/proc` fallback): -errno when the kernel refuses.
private func cproxy_count_listeners_for(_ address: SocketAddress) -> Int {
    Int(address.withSockAddr { cproxy_count_listeners($0, UInt32($1)) })
}

@Suite struct ListeningSocketsTests {
    /// The head and three rows of a real `/proc/net/tcp` (one listener on 127.0.0.1:8080, one on 0.0.0.0:8080, one
    /// established connection from 127.0.0.1:8080), trimmed after the inode.
    static let table = """
          sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
           0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1
           1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31338 1
           2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 31339 1
           3: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31340 1
        """

    @Test("addresses are written as the kernel prints them")
    func procAddress() throws {
        #if _endian(little)
        #expect(ListeningSockets.procAddress(try SocketAddress(ipAddress: "127.0.0.1", port: 8080)) == "0100007F:1F90")
        #expect(ListeningSockets.procAddress(try SocketAddress(ipAddress: "10.1.2.3", port: 443)) == "0302010A:01BB")
        #expect(
            ListeningSockets.procAddress(try SocketAddress(ipAddress: "::1", port: 8080))
                == "00000000000000000000000001000000:1F90")
        #endif
        #expect(ListeningSockets.procAddress(try SocketAddress(unixDomainSocketPath: "/tmp/x")) == nil)
    }

    @Test("only listening rows on exactly that address and port are counted")
    func countsListeners() throws {
        #if _endian(little)
        #expect(ListeningSockets.count(listeningOn: try SocketAddress(ipAddress: "127.0.0.1", port: 8080), in: Self.table) == 2)
        #expect(ListeningSockets.count(listeningOn: try SocketAddress(ipAddress: "0.0.0.0", port: 8080), in: Self.table) == 1)
        #expect(ListeningSockets.count(listeningOn: try SocketAddress(ipAddress: "127.0.0.1", port: 8081), in: Self.table) == 0)
        #endif
        #expect(ListeningSockets.count(listeningOn: try SocketAddress(ipAddress: "127.0.0.1", port: 8080), in: "") == 0)
    }

    @Test("the running kernel's table lists a socket this test binds, once")
    func readsTheKernel() async throws {
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .bind(host: "127.0.0.1", port: 0).get()
        let address = try #require(channel.localAddress)
        // Both ways of asking: netlink (what the proxy uses) and /proc (its fallback) must agree.
        #expect(cproxy_count_listeners_for(address) == 1)
        #expect(ListeningSockets.countFromProc(listeningOn: address) == 1)
        #expect(ListeningSockets.count(listeningOn: address) == 1)
        // A second socket on the port (SO_REUSEPORT on both, as per-loop listeners bind) is counted too.
        let reusePort = ChannelOptions.Types.SocketOption(level: .socket, name: .init(rawValue: SO_REUSEPORT))
        let first = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(reusePort, value: 1).bind(host: "127.0.0.1", port: 0).get()
        let second = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(reusePort, value: 1).bind(host: "127.0.0.1", port: first.localAddress!.port!).get()
        #expect(cproxy_count_listeners_for(first.localAddress!) == 2)
        #expect(ListeningSockets.countFromProc(listeningOn: first.localAddress!) == 2)
        try await second.close()
        try await first.close()
        try await channel.close()
        #expect(cproxy_count_listeners_for(address) == 0)
        #expect(ListeningSockets.count(listeningOn: address) == 0)
    }
}
