import NIOCore
import RedisTestSupport
import Testing

@testable import RedisDirectory

/// The next event from the stream, failing after `timeout`.
private func nextEvent(
    _ iterator: inout AsyncStream<RedisSubscriberEvent>.Iterator, timeout: Duration = .seconds(5)
) async throws -> RedisSubscriberEvent {
    let box = IteratorBox(iterator)
    let event = try await withThrowingTaskGroup(of: RedisSubscriberEvent?.self) { group in
        group.addTask { await box.next() }
        group.addTask {
            try await Task.sleep(for: timeout)
            return nil
        }
        let first = try await group.next()!
        group.cancelAll()
        return first
    }
    iterator = box.iterator
    guard let event else { throw RedisError.unavailable("no event within \(timeout)") }
    return event
}

private final class IteratorBox: @unchecked Sendable {
    var iterator: AsyncStream<RedisSubscriberEvent>.Iterator
    init(_ iterator: AsyncStream<RedisSubscriberEvent>.Iterator) { self.iterator = iterator }
    func next() async -> RedisSubscriberEvent? { await self.iterator.next() }
}

@Suite("RedisSubscriber against redis-server", .timeLimit(.minutes(1)))
struct RedisSubscriberTests {
    @Test func publishAndSubscribeDeliverMessages() async throws {
        try await RedisServerProcess.with { server in
            let configuration = try RedisTest.configuration(server)
            let subscriber = RedisSubscriber(
                configuration: configuration, eventLoopGroup: RedisTest.group, logger: RedisTest.quietLogger
            )
            var events = subscriber.events.makeAsyncIterator()
            #expect(try await nextEvent(&events) == .connected(afterReconnect: false))
            try await subscriber.subscribe(["owners", "other"])
            #expect(subscriber.subscribedChannels == ["owners", "other"])

            try await RedisTest.withClient(configuration) { client throws in
                #expect(try await client.publish("room-1 moved", to: "owners").get() == 1)
                #expect(try await client.publish(ByteBuffer(bytes: [0, 1, 2]), to: "other").get() == 1)
                #expect(try await client.publish("nobody listens", to: "unsubscribed").get() == 0)
                #expect(
                    try await nextEvent(&events)
                        == .message(RedisMessage(channel: "owners", payload: ByteBuffer(string: "room-1 moved")))
                )
                #expect(
                    try await nextEvent(&events)
                        == .message(RedisMessage(channel: "other", payload: ByteBuffer(bytes: [0, 1, 2])))
                )

                try await subscriber.unsubscribe(["other"])
                #expect(try await client.publish("gone", to: "other").get() == 0)
                // Many messages arrive in order.
                for index in 0..<100 { _ = try await client.publish("m\(index)", to: "owners").get() }
                for index in 0..<100 {
                    #expect(
                        try await nextEvent(&events)
                            == .message(RedisMessage(channel: "owners", payload: ByteBuffer(string: "m\(index)")))
                    )
                }
            }
            try await subscriber.close().get()
            #expect(await events.next() == nil)
        }
    }

    @Test func resubscribesAfterTheServerRestarts() async throws {
        try await RedisServerProcess.with { server in
            let configuration = try RedisTest.configuration(server)
            let subscriber = RedisSubscriber(
                configuration: configuration, eventLoopGroup: RedisTest.group, logger: RedisTest.quietLogger
            )
            var events = subscriber.events.makeAsyncIterator()
            #expect(try await nextEvent(&events) == .connected(afterReconnect: false))
            try await subscriber.subscribe(["owners"])

            await server.stop()
            try await server.start()
            // Reconnected and subscribed again before this event.
            #expect(try await nextEvent(&events) == .connected(afterReconnect: true))
            try await RedisTest.withClient(configuration) { client throws in
                #expect(try await client.publish("after restart", to: "owners").get() == 1)
            }
            #expect(
                try await nextEvent(&events)
                    == .message(RedisMessage(channel: "owners", payload: ByteBuffer(string: "after restart")))
            )
            try await subscriber.close().get()
        }
    }
}
