import FlowTagCore
import Synchronization

final class EventCounter: Sendable {
    let value = Atomic<Int>(0)
}

/// The monitor's events; counts what its consumer takes, so a consumer can tell when a
/// burst has ended (`FlowMonitor.pendingEvents == 0`) and flush its output then.
public struct FlowEvents: AsyncSequence, Sendable {
    public typealias Element = FlowEvent
    let base: AsyncStream<[FlowEvent]>
    let counter: EventCounter

    public struct AsyncIterator: AsyncIteratorProtocol {
        var base: AsyncStream<[FlowEvent]>.AsyncIterator
        let counter: EventCounter
        var current: [FlowEvent] = []
        var index = 0

        public mutating func next() async -> FlowEvent? {
            while index == current.count {
                guard let batch = await base.next() else { return nil }
                current = batch
                index = 0
            }
            defer { index += 1 }
            counter.value.subtract(1, ordering: .relaxed)
            return current[index]
        }
    }

    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(base: base.makeAsyncIterator(), counter: counter)
    }
}
