import Foundation
import Logging
import NIOCore
import NIOHTTP1

/// Sends one request to several backends at once over this loop's upstream pool and collects complete answers.
///
/// Each backend has its own deadline; a backend that fails, times out or answers with more than `maxBody` bytes is
/// skipped (and logged), so one slow or broken backend never fails the whole fan-out.
final class FanoutExecutor {
    private let head: HTTPRequestHead
    private let backends: [Backend]
    private let pool: UpstreamPool
    private let timeout: TimeAmount
    private let maxBody: Int
    private let logger: Logger
    private var collectors: [Collector] = []
    private var remaining: Int
    private var responses: [FanoutResponse] = []
    private var completion: (([FanoutResponse]) -> Void)?

    init(head: HTTPRequestHead, backends: [Backend], pool: UpstreamPool, timeout: TimeAmount, maxBody: Int, logger: Logger) {
        self.head = head
        self.backends = backends
        self.pool = pool
        self.timeout = timeout
        self.maxBody = maxBody
        self.logger = logger
        self.remaining = backends.count
    }

    /// Starts every request; `completion` runs once on this loop with the answers that arrived (in backend order).
    func run(completion: @escaping ([FanoutResponse]) -> Void) {
        self.completion = completion
        guard !self.backends.isEmpty else {
            self.finish()
            return
        }
        for backend in self.backends {
            let collector = Collector(backend: backend, executor: self)
            self.collectors.append(collector)
            collector.start()
        }
    }

    /// Abandons the fan-out (the client went away): open requests are closed, the completion never runs.
    func cancel() {
        self.completion = nil
        for collector in self.collectors { collector.abandon() }
    }

    fileprivate func collected(_ response: FanoutResponse?, from backend: Backend, failure: String?) {
        if let response {
            self.responses.append(response)
        } else if let failure {
            self.logger.warning("fan-out: backend skipped", metadata: ["backend": "\(backend.id)", "reason": "\(failure)"])
        }
        self.remaining -= 1
        if self.remaining == 0 { self.finish() }
    }

    private func finish() {
        let order = Dictionary(uniqueKeysWithValues: self.backends.enumerated().map { ($1.id, $0) })
        let sorted = self.responses.sorted { order[$0.backend, default: 0] < order[$1.backend, default: 0] }
        let completion = self.completion
        self.completion = nil
        self.collectors.removeAll()
        completion?(sorted)
    }

    /// One backend's request and answer.
    private final class Collector: UpstreamResponseSink {
        let backend: Backend
        unowned let executor: FanoutExecutor
        private var connection: UpstreamConnection?
        private var head: HTTPResponseHead?
        private var body: ByteBuffer?
        private var timer: Scheduled<Void>?
        private var done = false

        init(backend: Backend, executor: FanoutExecutor) {
            self.backend = backend
            self.executor = executor
        }

        func start() {
            self.backend.acquire()
            self.timer = self.executor.pool.eventLoop.assumeIsolated().scheduleTask(in: self.executor.timeout) { [self] in
                self.fail("no complete answer within \(self.executor.timeout)")
            }
            self.executor.pool.lease(self.backend) { [self] result in
                switch result {
                case .failure(let error):
                    self.fail("connect failed: \(error)")
                case .success(let connection):
                    guard !self.done else {
                        self.executor.pool.release(connection)
                        return
                    }
                    self.connection = connection
                    connection.sink = self
                    connection.hasBeenUsed = true
                    connection.write(.head(self.executor.head))
                    connection.write(.end(nil))
                    connection.flush()
                }
            }
        }

        func abandon() {
            guard !self.done else { return }
            self.done = true
            self.timer?.cancel()
            self.backend.release()
            if let connection = self.connection {
                connection.sink = nil
                connection.channel.close(promise: nil)
            }
        }

        func upstreamReceived(_ part: HTTPClientResponsePart) {
            guard !self.done else { return }
            switch part {
            case .head(let head):
                guard head.status.code >= 200 else { return }
                self.head = head
                self.body = self.connection?.channel.allocator.buffer(capacity: 0)
            case .body(var buffer):
                guard self.body != nil else { return }
                guard self.body!.readableBytes + buffer.readableBytes <= self.executor.maxBody else {
                    self.fail("answer larger than \(self.executor.maxBody) bytes")
                    return
                }
                self.body!.writeBuffer(&buffer)
            case .end:
                guard let head = self.head, let body = self.body, let connection = self.connection else { return }
                self.done = true
                self.timer?.cancel()
                self.backend.release()
                self.connection = nil
                if head.isKeepAlive {
                    self.executor.pool.release(connection)
                } else {
                    connection.sink = nil
                    connection.channel.close(promise: nil)
                }
                let response = FanoutResponse(backend: self.backend.id, status: Int(head.status.code), headers: head.headers, body: body)
                self.executor.collected(response, from: self.backend, failure: nil)
            }
        }

        func upstreamReadComplete() {}
        func upstreamWritabilityChanged(isWritable: Bool) {}

        func upstreamClosed(error: Error?) {
            self.connection = nil
            self.fail("connection closed before a complete answer\(error.map { ": \($0)" } ?? "")")
        }

        private func fail(_ reason: String) {
            guard !self.done else { return }
            self.done = true
            self.timer?.cancel()
            self.backend.release()
            if let connection = self.connection {
                self.connection = nil
                connection.sink = nil
                connection.channel.close(promise: nil)
            }
            self.executor.collected(nil, from: self.backend, failure: reason)
        }
    }
}

enum FanoutMerge {
    /// The built-in merge: the elements of every 2xx answer that is a JSON array, in backend order. Answers that are
    /// not arrays are skipped, so the result is always a valid array.
    static func jsonArray(_ responses: [FanoutResponse], logger: Logger) -> LocalResponse {
        var merged: [Any] = []
        for response in responses {
            guard (200..<300).contains(response.status) else {
                logger.warning("fan-out: answer skipped", metadata: ["backend": "\(response.backend)", "status": "\(response.status)"])
                continue
            }
            let bytes = Data(response.body.readableBytesView)
            guard let array = (try? JSONSerialization.jsonObject(with: bytes, options: [.fragmentsAllowed])) as? [Any] else {
                logger.warning("fan-out: answer is not a JSON array", metadata: ["backend": "\(response.backend)"])
                continue
            }
            merged.append(contentsOf: array)
        }
        let data = (try? JSONSerialization.data(withJSONObject: merged)) ?? Data("[]".utf8)
        return LocalResponse(
            status: .ok, headers: [Header("content-type", "application/json; charset=utf-8")],
            body: String(decoding: data, as: UTF8.self))
    }
}
