import NIOCore
import NIOEmbedded
import Testing

@testable import ProxyCore

private final class FakeTunnel: IdleSweepable {
    let name: String
    var idleSweep = IdleSweepSlot()
    var active = false
    var closes = 0
    /// Closing a real tunnel removes it from the sweeper (its close handler does).
    weak var sweeper: TunnelIdleSweeper<FakeTunnel>?

    init(_ name: String) { self.name = name }

    func takeActivity() -> Bool {
        defer { self.active = false }
        return self.active
    }

    func closeIdle() {
        self.closes += 1
        self.sweeper?.remove(self)
    }
}

@Suite struct TunnelIdleSweeperTests {
    @Test func closesOnlyTunnelsIdleForTheirWholeTimeout() {
        let loop = EmbeddedEventLoop()
        let sweeper = TunnelIdleSweeper<FakeTunnel>(eventLoop: loop)
        let quiet = FakeTunnel("quiet")
        let busy = FakeTunnel("busy")
        for tunnel in [quiet, busy] {
            tunnel.sweeper = sweeper
            sweeper.add(tunnel, timeout: .milliseconds(100))
        }
        #expect(sweeper.count == 2)

        // Before the timeout nothing closes, however quiet.
        loop.advanceTime(by: .milliseconds(75))
        #expect(quiet.closes == 0)
        // The busy one keeps passing bytes.
        for _ in 0..<8 {
            busy.active = true
            loop.advanceTime(by: .milliseconds(25))
        }
        #expect(quiet.closes == 1)
        #expect(busy.closes == 0)
        // Once quiet, the busy one closes a timeout (plus at most two sweep intervals) after its last activity.
        loop.advanceTime(by: .milliseconds(150))
        #expect(busy.closes == 1)
        #expect(sweeper.count == 0)
    }

    @Test func removingFromTheMiddleKeepsTheOthersWatched() {
        let loop = EmbeddedEventLoop()
        let sweeper = TunnelIdleSweeper<FakeTunnel>(eventLoop: loop)
        let tunnels = (0..<5).map { FakeTunnel("t\($0)") }
        for tunnel in tunnels {
            tunnel.sweeper = sweeper
            sweeper.add(tunnel, timeout: .seconds(1))
        }

        sweeper.remove(tunnels[1])
        sweeper.remove(tunnels[1])  // twice: harmless
        sweeper.remove(FakeTunnel("never added"))  // harmless
        #expect(sweeper.count == 4)
        #expect(!tunnels[1].idleSweep.isWatched)
        sweeper.remove(tunnels[4])  // the one moved into slot 1
        #expect(sweeper.count == 3)

        loop.advanceTime(by: .milliseconds(1600))
        #expect(tunnels.map(\.closes) == [1, 0, 1, 1, 0])

        for tunnel in tunnels { sweeper.remove(tunnel) }
        #expect(sweeper.count == 0)
        #expect(tunnels.allSatisfy { !$0.idleSweep.isWatched })
    }

    @Test func addingTwiceWatchesOnce() {
        let loop = EmbeddedEventLoop()
        let sweeper = TunnelIdleSweeper<FakeTunnel>(eventLoop: loop)
        let tunnel = FakeTunnel("t")
        tunnel.sweeper = sweeper
        sweeper.add(tunnel, timeout: .milliseconds(100))
        sweeper.add(tunnel, timeout: .milliseconds(100))
        #expect(sweeper.count == 1)
        loop.advanceTime(by: .milliseconds(200))
        #expect(tunnel.closes == 1)
    }
}
