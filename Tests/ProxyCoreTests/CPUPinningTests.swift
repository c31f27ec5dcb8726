import Foundation
import ProxyCore
import Synchronization
import Testing

@Suite("CPU pinning (threads.cpu_affinity)")
struct CPUPinningTests {
    @Test("loops take the allowed CPUs in order and wrap round when there are more loops")
    func plan() {
        #expect(CPUPinning.plan(loops: 2, allowed: [0, 1]) == [0, 1])
        #expect(CPUPinning.plan(loops: 2, allowed: [3, 5, 7]) == [3, 5])
        #expect(CPUPinning.plan(loops: 5, allowed: [2, 4]) == [2, 4, 2, 4, 2])
        #expect(CPUPinning.plan(loops: 3, allowed: []) == [])
        #expect(CPUPinning.plan(loops: 0, allowed: [0]) == [])
    }

    #if os(Linux)
    @Test("a thread bound to one allowed CPU reports exactly that CPU; a CPU outside the set is refused")
    func bindsAThread() throws {
        let allowed = try #require(CPUPinning.allowedCPUs())
        #expect(!allowed.isEmpty)
        #expect(allowed == allowed.sorted())
        let target = allowed.last!
        let outside = (0..<1024).first { !allowed.contains($0) }!
        let result = Mutex<(bound: Bool, after: [Int]?, refused: Bool)?>(nil)
        // A thread of its own, so the test runner's threads keep their affinity.
        let thread = Thread {
            let bound = CPUPinning.bindCurrentThread(to: target)
            let after = CPUPinning.allowedCPUs()
            let refused = !CPUPinning.bindCurrentThread(to: outside)
            result.withLock { $0 = (bound, after, refused) }
        }
        thread.start()
        while result.withLock({ $0 == nil }) { usleep(1000) }
        let observed = try #require(result.withLock { $0 })
        #expect(observed.bound)
        #expect(observed.after == [target])
        #expect(observed.refused)
        #expect(CPUPinning.bindCurrentThread(to: -1) == false)
    }
    #endif
}
