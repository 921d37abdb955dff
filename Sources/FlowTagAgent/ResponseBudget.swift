import FlowTagWire
import NIOPosix
import Synchronization

/// Bounds what the API holds for clients at once, so that many clients asking for large
/// answers and not reading them cost bounded memory: answer bytes not yet written to
/// their sockets, and journal queries running or waiting. Past either bound a request
/// gets 429 (retry later), never an unbounded queue.
final class ResponseBudget: Sendable {
    static let maxPendingBytes = 256 << 20
    static let maxQueries = 4

    private let pendingBytes = Atomic<Int>(0)
    private let queries = Atomic<Int>(0)
    /// Journal queries run here, off the event loop, so a long one never stalls the others.
    let queryPool: NIOThreadPool = {
        let p = NIOThreadPool(numberOfThreads: 2)
        p.start()
        return p
    }()

    /// Takes `bytes` of the budget for an answer; false when it would pass the bound
    /// (an answer larger than the whole budget is still allowed when nothing else waits).
    func reserve(_ bytes: Int) -> Bool {
        let now = pendingBytes.add(bytes, ordering: .relaxed).newValue
        if now > Self.maxPendingBytes && now != bytes {
            pendingBytes.subtract(bytes, ordering: .relaxed)
            return false
        }
        return true
    }

    func release(_ bytes: Int) { pendingBytes.subtract(bytes, ordering: .relaxed) }

    /// A slot for one journal query; false when `maxQueries` run or wait already.
    func startQuery() -> Bool {
        if queries.add(1, ordering: .relaxed).newValue > Self.maxQueries {
            queries.subtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    func endQuery() { queries.subtract(1, ordering: .relaxed) }

    func shutdown() { try? queryPool.syncShutdownGracefully() }
}
