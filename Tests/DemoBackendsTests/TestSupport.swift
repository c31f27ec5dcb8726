import Foundation
import NIOCore
import NIOPosix

/// Runs `body` with a fresh event loop group and always shuts it down, so no test leaks threads.
func withEventLoopGroup<Result>(
    _ body: (MultiThreadedEventLoopGroup) async throws -> Result
) async throws -> Result {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    do {
        let result = try await body(group)
        try await group.shutdownGracefully()
        return result
    } catch {
        try? await group.shutdownGracefully()
        throw error
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
}

/// Decodes a JSON object text into a dictionary for field-by-field checks.
func jsonObject(_ text: String) throws -> [String: Any] {
    guard let object = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else {
        throw TestFailure(description: "not a JSON object: \(text)")
    }
    return object
}
