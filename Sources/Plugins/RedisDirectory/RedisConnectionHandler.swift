import NIOCore

/// The last handler of a Redis channel: writes commands and matches replies to them in order (pipelining).
///
/// Lives on its channel's event loop. One timer watches the oldest outstanding command (replies come in order, so
/// it is always the first to be late); when it fires, that command fails with `RedisError.timeout` and the channel is
/// closed, because a late reply could otherwise be matched to the next command.
final class RedisConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = RESPValue
    typealias OutboundOut = ByteBuffer

    private struct Pending {
        let promise: EventLoopPromise<RESPValue>
        let name: String
        let timeout: TimeAmount
        let deadline: NIODeadline
        /// Replies this command gets (SUBSCRIBE a b c gets three confirmations); the last completes it.
        var replies: Int
    }

    private var pending = CircularBuffer<Pending>(initialCapacity: 16)
    private var context: ChannelHandlerContext?
    private var timer: Scheduled<Void>?
    /// Set once the connection is unusable; later commands fail with it.
    private var failure: RedisError?
    /// Pub/sub mode: `message`/`pmessage` arrays are pushes, not replies.
    private let onPush: (@Sendable (RESPValue) -> Void)?

    init(onPush: (@Sendable (RESPValue) -> Void)?) {
        self.onPush = onPush
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.failAll(self.failure ?? .connectionClosed("connection closed"))
        self.context = nil
    }

    /// Sends one encoded command; `promise` completes with its reply (or fails).
    func enqueue(
        _ encoded: ByteBuffer, name: String, replies: Int, timeout: TimeAmount, promise: EventLoopPromise<RESPValue>
    ) {
        guard let context = self.context, self.failure == nil else {
            promise.fail(self.failure ?? RedisError.connectionClosed("connection closed"))
            return
        }
        let entry = Pending(
            promise: promise, name: name, timeout: timeout, deadline: .now() + timeout, replies: max(1, replies)
        )
        self.pending.append(entry)
        if self.pending.count == 1 { self.armTimer() }
        context.writeAndFlush(self.wrapOutboundOut(encoded), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let value = self.unwrapInboundIn(data)
        if let onPush = self.onPush, Self.isPush(value) {
            onPush(value)
            return
        }
        guard var head = self.pending.first else {
            self.fail(.connectionClosed("reply without a command: \(value)"), context: context)
            return
        }
        if head.replies > 1 {
            head.replies -= 1
            self.pending[self.pending.startIndex] = head
            return
        }
        self.pending.removeFirst()
        self.armTimer()
        if case .error(let message) = value {
            head.promise.fail(RedisError.server(message))
        } else {
            head.promise.succeed(value)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.failAll(self.failure ?? .connectionClosed("closed by the server"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        let redisError = (error as? RedisError) ?? .connectionClosed("\(error)")
        self.fail(redisError, context: context)
    }

    private func fail(_ error: RedisError, context: ChannelHandlerContext) {
        self.failAll(error)
        context.close(promise: nil)
    }

    private func failAll(_ error: RedisError) {
        if self.failure == nil { self.failure = error }
        self.timer?.cancel()
        self.timer = nil
        while let entry = self.pending.popFirst() {
            entry.promise.fail(error)
        }
    }

    private func armTimer() {
        self.timer?.cancel()
        self.timer = nil
        guard let head = self.pending.first, let context = self.context else { return }
        self.timer = context.eventLoop.assumeIsolated().scheduleTask(deadline: head.deadline) { [self] in
            self.timer = nil
            self.timeOutHead()
        }
    }

    private func timeOutHead() {
        guard let head = self.pending.popFirst() else { return }
        head.promise.fail(RedisError.timeout(command: head.name, after: head.timeout))
        self.failAll(.connectionClosed("an earlier command (\(head.name)) timed out"))
        self.context?.close(promise: nil)
    }

    static func isPush(_ value: RESPValue) -> Bool {
        guard case .array(let elements?) = value, let kind = elements.first?.string else { return false }
        return kind == "message" || kind == "pmessage" || kind == "smessage"
    }
}
