import FlowTagWire
import CLinuxCalls
import Synchronization

/// Gives the heap back after a burst of flows ended: their freed rows, batches, records and
/// strings would otherwise stay with malloc (and in RSS) for good.
/// Trimming walks every malloc arena under its lock, so it waits for a quiet second:
/// never in the middle of a burst, or of the answers the API gives right after one.
final class HeapTrimmer: Sendable {
    private let closed = Atomic<Int>(0)
    private let state = Mutex<(seen: Int, trimmedAt: Int)>((0, 0))
    static let burst = 4096

    /// A flow (or a watcher's backlog) was let go. After a burst of opens there is nothing
    /// to give back, and a trim walks the whole heap holding malloc's lock.
    func released(_ count: Int = 1) { closed.add(count, ordering: .relaxed) }

    /// Called once a second.
    func tick() {
        let now = closed.load(ordering: .relaxed)
        let trim = state.withLock { s -> Bool in
            defer { s.seen = now }
            guard now == s.seen, now - s.trimmedAt >= Self.burst else { return false }
            s.trimmedAt = now
            return true
        }
        if trim { lc_heap_trim() }
    }
}
