import Foundation
import GRDB
import GRDBSQLite

/// Stops one SQLite statement at a deadline: a progress handler checks the monotonic
/// clock every `checkEvery` virtual-machine steps and interrupts past it. The handler is
/// removed again before `run` returns, so the pooled connection is left as it was found.
struct QueryDeadline {
    let timeLimit: Duration
    static let checkEvery: Int32 = 4096

    init(after timeLimit: Duration) { self.timeLimit = timeLimit }

    func run<T>(on db: Database, _ body: () throws -> T) throws -> T {
        let deadline = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
        defer { deadline.deallocate() }
        let (seconds, attoseconds) = timeLimit.components
        let limitNs = UInt64(clamping: max(0, seconds)) &* 1_000_000_000 &+ UInt64(clamping: max(0, attoseconds) / 1_000_000_000)
        deadline.pointee = Self.monotonicNs() &+ limitNs
        let connection = db.sqliteConnection
        sqlite3_progress_handler(connection, Self.checkEvery, { context in
            guard let context else { return 0 }
            return QueryDeadline.monotonicNs() >= context.assumingMemoryBound(to: UInt64.self).pointee ? 1 : 0
        }, deadline)
        defer { sqlite3_progress_handler(connection, 0, nil, nil) }
        do {
            return try body()
        } catch let error as DatabaseError where error.resultCode == .SQLITE_INTERRUPT {
            throw Journal.QueryTimedOut(limit: timeLimit)
        }
    }

    static func monotonicNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}
