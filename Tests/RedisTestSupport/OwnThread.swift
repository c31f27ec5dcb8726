import Foundation

/// Runs a blocking `body` (a read to the end of a pipe, a `waitpid`) on a thread of its own and waits for it without
/// holding a thread that Swift concurrency needs.
///
/// Not `DispatchQueue.global()`: on Linux, Swift concurrency's global executor runs its jobs on that same queue's
/// threads (about one per core), so a block that waits there takes a thread away from every test running in
/// parallel. Three `CLITests` children's stderr reads once did exactly that, and a `Task.sleep(for: 10 ms)` in the
/// same run came back 3 s late: health checks missed their deadlines and connect timeouts fired early.
public func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        Thread { continuation.resume(returning: body()) }.start()
    }
}
