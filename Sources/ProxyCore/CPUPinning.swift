import CProxySys
import NIOCore

/// Binding event loop threads to CPUs (`threads.cpu_affinity: auto`, docs/configuration.md).
///
/// Why: on a busy host two unbound loops can land on the same CPU while the other CPU runs something else; both are
/// always runnable, so the kernel time-slices them against each other and every connection of the waiting loop
/// stalls for a whole slice (4–8 ms here). Bound one per CPU, a loop only ever waits behind short-lived I/O-bound
/// processes. Measured in docs/benchmarks.md ("Fifth session"): p99 through the benchmark's keyed script went from
/// 4.8 to 2.2–2.5 ms at the same throughput. It stays off by default, as in nginx (`worker_cpu_affinity`) and
/// HAProxy 2.6 (`cpu-map`): a bound loop cannot move away from a CPU another process hogs.
public enum CPUPinning {
    /// The CPUs the calling thread may run on, ascending; nil where the platform cannot say.
    public static func allowedCPUs() -> [Int]? {
        var cpus = [Int32](repeating: 0, count: 1024)
        let count = cpus.withUnsafeMutableBufferPointer { cproxy_allowed_cpus($0.baseAddress, Int32($0.count)) }
        guard count >= 0 else { return nil }
        return cpus.prefix(Int(count)).map(Int.init)
    }

    /// The CPU for each of `loops` loops: the allowed CPUs in order, wrapping round when there are more loops than
    /// CPUs (two loops then share a CPU, as they would if they were not bound). Empty when no CPU is allowed.
    public static func plan(loops: Int, allowed: [Int]) -> [Int] {
        guard !allowed.isEmpty, loops > 0 else { return [] }
        return (0..<loops).map { allowed[$0 % allowed.count] }
    }

    /// Binds the calling thread to `cpu`; false when the kernel refuses (a CPU outside the cpuset, for one).
    public static func bindCurrentThread(to cpu: Int) -> Bool {
        guard let cpu = Int32(exactly: cpu) else { return false }
        return cproxy_bind_current_thread(cpu) == 0
    }

    /// Binds each loop's thread to its CPU from `plan`, on the loop itself. Returns the CPU per loop, nil for a loop
    /// the kernel refused to bind (it keeps running unbound).
    public static func pin(_ loops: [EventLoop]) async -> [Int?] {
        let cpus = Self.plan(loops: loops.count, allowed: Self.allowedCPUs() ?? [])
        var result: [Int?] = []
        for (index, loop) in loops.enumerated() {
            guard index < cpus.count else {
                result.append(nil)
                continue
            }
            let cpu = cpus[index]
            let bound = (try? await loop.submit { Self.bindCurrentThread(to: cpu) }.get()) ?? false
            result.append(bound ? cpu : nil)
        }
        return result
    }
}
