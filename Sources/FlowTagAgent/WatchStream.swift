import FlowTagWire
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import Synchronization

/// One `/v1/watch` client: events are rendered once, buffered here, and written only
/// while the channel is writable, so a client that reads slowly or not at all costs at
/// most its budget. Past the budget (or when all watchers together pass theirs and this
/// one holds a real backlog) the watcher is dropped: a final error line, then close.
final class WatchStream: WatchSink, @unchecked Sendable {
    /// Bytes one watcher may have waiting in the agent.
    static let budget = 1 << 20
    /// Bytes all watchers together may have waiting; past it the ones with a backlog of
    /// at least `shareFloor` are dropped first.
    static let totalBudget = 16 << 20
    static let shareFloor = 64 << 10
    static let totalBuffered = Atomic<Int>(0)

    private struct State {
        var buffer: [UInt8] = []
        var scheduled = false
        var ended = false
        /// The response's end was written: nothing may follow it.
        var closedOut = false
    }
    private let state = NIOLockedValueBox(State())
    private let channel: Channel
    private let onDrop: @Sendable () -> Void
    var cancel: (@Sendable () -> Void)?

    init(channel: Channel, onDrop: @escaping @Sendable () -> Void) {
        self.channel = channel
        self.onDrop = onDrop
    }

    func deliver(_ line: [UInt8]) {
        enum Next { case nothing, flush, drop(Int) }
        let next: Next = state.withLockedValue { s in
            guard !s.ended else { return .nothing }
            let backlog = s.buffer.count + line.count
            let total = Self.totalBuffered.load(ordering: .relaxed) + line.count
            if backlog > Self.budget || (total > Self.totalBudget && backlog > Self.shareFloor) {
                s.ended = true
                Self.totalBuffered.subtract(s.buffer.count, ordering: .relaxed)
                s.buffer = []
                return .drop(backlog)
            }
            s.buffer += line
            Self.totalBuffered.add(line.count, ordering: .relaxed)
            if s.scheduled { return .nothing }
            s.scheduled = true
            return .flush
        }
        switch next {
        case .nothing: break
        case .flush: channel.eventLoop.execute { self.flush() }
        case .drop(let backlog):
            cancel?()
            onDrop()
            let message = "watcher dropped: it read too slowly (\(backlog) bytes were waiting, the limit is \(Self.budget))"
            channel.eventLoop.execute { self.end(errorLine: "{\"event\":\"error\",\"error\":\(EventLine.quoted(message))}\n") }
        }
    }

    func finish() {
        let first = state.withLockedValue { s -> Bool in
            defer { s.ended = true }
            return !s.ended
        }
        if first { channel.eventLoop.execute { self.flush(thenEnd: true) } }
    }

    /// Hands what is buffered to the channel if it can take it; else waits for
    /// `writabilityChanged`. On the event loop.
    func flush(thenEnd: Bool = false) {
        guard channel.isActive else { return release() }
        let chunk: [UInt8]? = state.withLockedValue { s in
            s.scheduled = false
            guard !s.closedOut, channel.isWritable, !s.buffer.isEmpty else { return nil }
            defer { s.buffer = [] }
            return s.buffer
        }
        if let chunk {
            Self.totalBuffered.subtract(chunk.count, ordering: .relaxed)
            channel.write(HTTPServerResponsePart.body(.byteBuffer(channel.allocator.buffer(bytes: chunk))), promise: nil)
            channel.flush()
        }
        if thenEnd { end(errorLine: nil) }
    }

    /// The channel became writable again: send what waited.
    func writabilityChanged() {
        if channel.isWritable { flush() }
    }

    private func end(errorLine: String?) {
        let first = state.withLockedValue { s -> Bool in
            defer { s.closedOut = true }
            return !s.closedOut
        }
        guard first else { return }
        if let errorLine, channel.isActive {
            channel.write(HTTPServerResponsePart.body(.byteBuffer(channel.allocator.buffer(string: errorLine))), promise: nil)
        }
        guard channel.isActive else { return }
        channel.writeAndFlush(HTTPServerResponsePart.end(nil)).whenComplete { [channel] _ in channel.close(promise: nil) }
        // A client that does not read never lets those writes complete: close it anyway,
        // so a dropped watcher's buffers are freed.
        channel.eventLoop.scheduleTask(in: .seconds(1)) { [channel] in channel.close(promise: nil) }
    }

    /// The client went away: the watcher ends and its buffer is freed.
    func release() {
        cancel?()
        state.withLockedValue { s in
            s.ended = true
            Self.totalBuffered.subtract(s.buffer.count, ordering: .relaxed)
            s.buffer = []
        }
    }
}
