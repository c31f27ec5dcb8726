import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A child process started with `posix_spawn`, with the part of Foundation's `Process` interface the tests use.
///
/// Why not `Process`: on Linux, `Process.run()` lists `/proc/self/fd` to find the descriptors to close in the child,
/// and copies each directory entry's whole 256-byte name field past the end of what `readdir` returned
/// (swift-corelibs-foundation #5472, in the Swift 6.3.1 toolchain here). When an entry sits at the end of a mapped
/// page the copy faults: the whole test process died with SIGSEGV in `Process.run()` twice in a few dozen full runs,
/// more often the more descriptors the parallel tests hold. Here the child closes every descriptor above stderr itself
/// (`posix_spawn_file_actions_addclosefrom_np`), with no listing.
public final class SpawnedProcess: Sendable {
    public enum TerminationReason: Sendable, Equatable {
        case exit
        case uncaughtSignal
    }

    /// Where a standard stream goes: `/dev/null` or the write end of a `Pipe`.
    public enum Output: Sendable {
        case null
        case pipe(Pipe)
    }

    private struct State {
        var pid: pid_t = 0
        /// The raw `waitpid` status once the child has been reaped.
        var status: Int32?
    }

    private let executable: String
    private let arguments: [String]
    private let environment: [String: String]?
    private let standardOutput: Output
    private let standardError: Output
    private let currentDirectory: String?
    private let state = Mutex(State())

    public init(
        executable: String, arguments: [String], environment: [String: String]? = nil,
        currentDirectory: String? = nil, standardOutput: Output = .null, standardError: Output = .null
    ) {
        self.executable = executable
        self.currentDirectory = currentDirectory
        self.arguments = arguments
        self.environment = environment
        self.standardOutput = standardOutput
        self.standardError = standardError
    }

    public struct SpawnError: Error, CustomStringConvertible {
        public let executable: String
        public let code: Int32
        public var description: String { "cannot start \(self.executable): \(String(cString: strerror(self.code)))" }
    }

    /// Starts the child; stdin is `/dev/null`.
    public func run() throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        if let directory = self.currentDirectory {
            typealias AddChdir = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, UnsafePointer<CChar>) -> Int32
            _ = unsafeBitCast(try Self.glibc("posix_spawn_file_actions_addchdir_np"), to: AddChdir.self)(&actions, directory)
        }
        for (fd, output) in [(Int32(1), self.standardOutput), (Int32(2), self.standardError)] {
            switch output {
            case .null: posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", O_WRONLY, 0)
            case .pipe(let pipe): posix_spawn_file_actions_adddup2(&actions, pipe.fileHandleForWriting.fileDescriptor, fd)
            }
        }
        // Nothing else of this process's reaches the child (not every library opens its descriptors close-on-exec;
        // a listening socket inherited by a child keeps its port taken after the test closed it).
        typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
        _ = unsafeBitCast(try Self.glibc("posix_spawn_file_actions_addclosefrom_np"), to: AddCloseFrom.self)(&actions, 3)
        let argv = ([self.executable] + self.arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        let variables = (self.environment ?? ProcessInfo.processInfo.environment).map { "\($0.key)=\($0.value)" }
        let envp = variables.map { strdup($0) } + [nil]
        defer { for pointer in envp { free(pointer) } }
        var pid: pid_t = 0
        let code = posix_spawn(&pid, self.executable, &actions, nil, argv, envp)
        // The child has its copy of each pipe's write end: the parent's must close, or readers never see the end.
        for output in [self.standardOutput, self.standardError] {
            if case .pipe(let pipe) = output { try? pipe.fileHandleForWriting.close() }
        }
        guard code == 0 else { throw SpawnError(executable: self.executable, code: code) }
        self.state.withLock { $0.pid = pid }
    }

    /// A glibc function Swift's Glibc module does not declare (`addchdir_np` since 2.29, `addclosefrom_np` since 2.34).
    private static func glibc(_ name: String) throws -> UnsafeMutableRawPointer {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), name) else {
            throw SpawnError(executable: name, code: ENOSYS)
        }
        return symbol
    }

    public var processIdentifier: Int32 { self.state.withLock { $0.pid } }

    /// Whether the child is still running (reaps it when it has ended).
    public var isRunning: Bool {
        self.state.withLock { state in
            guard state.status == nil, state.pid > 0 else { return false }
            var status: Int32 = 0
            if waitpid(state.pid, &status, WNOHANG) == state.pid { state.status = status }
            return state.status == nil
        }
    }

    /// SIGTERM.
    public func terminate() {
        let pid = self.processIdentifier
        if pid > 0, self.isRunning { kill(pid, SIGTERM) }
    }

    /// Blocks until the child has ended.
    public func waitUntilExit() {
        let pid = self.processIdentifier
        guard pid > 0, self.state.withLock({ $0.status == nil }) else { return }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) == -1, errno == EINTR {}
        self.state.withLock { if $0.status == nil { $0.status = status } }
    }

    /// Waits until the child has ended, on a thread of its own (`onOwnThread`): blocking one of Swift concurrency's
    /// threads (two on a two-core machine) holds up every test running beside it.
    public func exited() async {
        await onOwnThread { self.waitUntilExit() }
    }

    private var rawStatus: Int32 { self.state.withLock { $0.status ?? 0 } }

    /// The exit code, or the signal that ended the child.
    public var terminationStatus: Int32 {
        let status = self.rawStatus
        return status & 0x7F == 0 ? (status >> 8) & 0xFF : status & 0x7F
    }

    public var terminationReason: TerminationReason { self.rawStatus & 0x7F == 0 ? .exit : .uncaughtSignal }
}
