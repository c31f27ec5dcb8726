import Logging
import NIOCore
import NIOPosix
import RedisTestSupport
import Testing

@testable import RedisDirectory

enum RedisTest {
    static let group = MultiThreadedEventLoopGroup.singleton

    static let quietLogger: Logger = {
        var logger = Logger(label: "redis-test")
        logger.logLevel = .critical
        return logger
    }()

    static func configuration(_ server: RedisServerProcess, database: Int? = nil) throws -> RedisConfiguration {
        var configuration = try RedisConfiguration(url: server.url)
        if let database { configuration.database = database }
        configuration.commandTimeout = .seconds(5)
        configuration.reconnectBaseDelay = .milliseconds(20)
        configuration.reconnectMaxDelay = .milliseconds(300)
        return configuration
    }

    /// Retries `operation` until it succeeds or `timeout` passes.
    static func eventually<T: Sendable>(
        within timeout: Duration = .seconds(5), _ operation: () async throws -> T
    ) async throws -> T {
        let deadline = ContinuousClock.now + timeout
        while true {
            do {
                return try await operation()
            } catch {
                if ContinuousClock.now >= deadline { throw error }
                try await Task.sleep(for: .milliseconds(20))
            }
        }
    }

    @discardableResult
    static func withClient<T>(
        _ configuration: RedisConfiguration, _ body: (RedisClient) async throws -> T
    ) async throws -> T {
        let client = RedisClient(configuration: configuration, eventLoopGroup: Self.group, logger: Self.quietLogger)
        do {
            let result = try await body(client)
            try await client.close().get()
            return result
        } catch {
            try? await client.close().get()
            throw error
        }
    }
}
