import NIOCore

/// The state of a lazily re-armed deadline timer (see `ResponseDeadlineWatcher`).
struct LazyDeadlineTimer {
    fileprivate var scheduled: Scheduled<Void>?
    fileprivate var firesAt: NIODeadline = .distantFuture
}

/// A client-side handler with one timer per connection for the response-head deadline of whichever exchange is
/// current (`ProxyHandler`, `FastPathHandler`). The timer re-arms itself for a later deadline when it fires early
/// instead of being cancelled and rescheduled for every request.
protocol ResponseDeadlineWatcher: AnyObject {
    var deadlineTimer: LazyDeadlineTimer { get set }
    /// The current exchange's deadline, while its response head is still awaited.
    var pendingResponseDeadline: NIODeadline? { get }
    /// The pending deadline passed.
    func responseDeadlinePassed()
}

extension ResponseDeadlineWatcher {
    func watchResponseDeadline(_ deadline: NIODeadline, on eventLoop: EventLoop) {
        if self.deadlineTimer.scheduled == nil || self.deadlineTimer.firesAt > deadline {
            self.deadlineTimer.scheduled?.cancel()
            self.scheduleDeadlineCheck(at: deadline, on: eventLoop)
        }
    }

    func cancelDeadlineTimer() {
        self.deadlineTimer.scheduled?.cancel()
        self.deadlineTimer = LazyDeadlineTimer()
    }

    private func scheduleDeadlineCheck(at deadline: NIODeadline, on eventLoop: EventLoop) {
        self.deadlineTimer.firesAt = deadline
        self.deadlineTimer.scheduled = eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in
            self.deadlineTimer = LazyDeadlineTimer()
            guard let due = self.pendingResponseDeadline else { return }
            if NIODeadline.now() < due {
                self.scheduleDeadlineCheck(at: due, on: eventLoop)
            } else {
                self.responseDeadlinePassed()
            }
        }
    }
}
