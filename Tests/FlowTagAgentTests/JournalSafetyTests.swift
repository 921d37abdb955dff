import Foundation
import Testing
@testable import FlowTagAgent
import FlowTagWire
@testable import FlowTagKernel

/// The journal as the outbox of record: one row per flow, kernel entries given back only
/// once written, refusal of files that are not its own, and history that misses nothing.
@Suite("journal safety")
struct JournalSafetyTests {
    static func record(_ i: Int, closedAt: Int64, remote: String = "10.1.2.3", boot: UInt64 = 0) -> FlowRecord {
        var r = FlowRecord(flow: UInt64(i), netns: 1, protocol: .tcp, family: .ipv4, direction: .outbound,
                           local: Endpoint(address: IPAddress("192.168.0.2")!, port: UInt16(40000 + i % 20000)),
                           remote: Endpoint(address: IPAddress(remote)!, port: 443),
                           process: ProcessOwner(pid: 7, tid: 7, exe: "/usr/bin/curl", comm: "curl", uid: 0, gid: 0, cgroup: 1),
                           attribution: .kernel, openedAt: WallTime(nanoseconds: closedAt - 1000), closedAt: WallTime(nanoseconds: closedAt))
        r.openedBootNanoseconds = boot
        return r
    }

    static func path() -> String { NSTemporaryDirectory() + "flowtag-unit-\(getpid())-\(UUID().uuidString).db" }
    static func remove(_ p: String) { for s in ["", "-wal", "-shm"] { unlink(p + s) } }

    final class Released: @unchecked Sendable {
        let lock = NSLock()
        var receipts: [CloseReceipt] = []
        func add(_ r: [CloseReceipt]) { lock.lock(); receipts += r; lock.unlock() }
        var all: [CloseReceipt] { lock.lock(); defer { lock.unlock() }; return receipts }
    }

    @Test("the same flow written by two agents (a crash between commit and release) is kept once")
    func oneRowPerFlow() throws {
        let p = Self.path()
        defer { Self.remove(p) }
        let first = try Journal(path: p)
        first.append(Self.record(1, closedAt: 5_000, boot: 123_456))
        first.flush()
        // The next agent reads the closed entry again; its wall-clock offset differs a little.
        let second = try Journal(path: p)
        var again = Self.record(1, closedAt: 5_017, boot: 123_456)
        again.openedAt = WallTime(nanoseconds: 5_017 - 1000)
        second.append(again)
        second.append(Self.record(2, closedAt: 6_000, boot: 999))
        second.flush()
        #expect(try second.count() == 2)
    }

    @Test("kernel entries are given back only after their rows are committed")
    func receiptsAfterCommit() throws {
        let p = Self.path()
        defer { Self.remove(p) }
        let released = Released()
        let j = try Journal(path: p, release: { released.add($0) })
        j.append(Self.record(1, closedAt: 1), receipt: .tcpEntry(cookie: 1, openedNanoseconds: 5))
        j.append(Self.record(2, closedAt: 2), receipt: .outbox(key: 9))
        j.append(Self.record(3, closedAt: 3), receipt: nil)
        #expect(released.all.isEmpty)
        #expect(j.flush() == 3)
        #expect(released.all == [.tcpEntry(cookie: 1, openedNanoseconds: 5), .outbox(key: 9)])
        #expect(j.pendingRows == 0)
    }

    @Test("while writes fail, receipts are held; past maxPending the oldest rows are dropped and their receipts given back; writes resume")
    func failingWrites() async throws {
        let p = Self.path()
        defer { Self.remove(p) }
        let released = Released()
        let j = try Journal(path: p, maxPending: 10, release: { released.add($0) })
        // The database may not grow past its current pages: every new row fails (SQLITE_FULL).
        let pages = try await j.db.read { try Int.fetchOne($0, sql: "PRAGMA page_count") ?? 0 }
        try await j.db.writeWithoutTransaction { try $0.execute(sql: "PRAGMA max_page_count = \(pages)") }
        // Each row carries a long path: it needs new pages, which the limit refuses.
        func big(_ i: Int) -> FlowRecord {
            var r = Self.record(i, closedAt: Int64(1000 + i))
            r.process.exe = "/" + String(repeating: "x", count: 20_000)
            return r
        }
        for i in 0..<20 { j.append(big(i), receipt: .outbox(key: UInt64(i))) }
        #expect(j.flush() == 0)
        #expect(j.isFailing && j.writeErrors == 1)
        // Failing: the queue is cut to maxPending, the 10 oldest dropped and given back.
        #expect(j.pendingRows == 10 && j.droppedRows == 10)
        #expect(Set(released.all) == Set((0..<10).map { CloseReceipt.outbox(key: UInt64($0)) }))
        j.append(big(20), receipt: .outbox(key: 20))
        #expect(j.pendingRows == 10 && j.droppedRows == 11, "a row past the bound while failing drops the oldest")
        #expect(released.all.contains(.outbox(key: 10)))
        // Space returns: what waits is written, then given back.
        try await j.db.writeWithoutTransaction { try $0.execute(sql: "PRAGMA max_page_count = 1000000") }
        #expect(j.flush() == 10)
        #expect(!j.isFailing && j.pendingRows == 0)
        #expect(Set(released.all) == Set((0...20).map { CloseReceipt.outbox(key: UInt64($0)) }))
        #expect(try j.count() == 10)
    }

    @Test("a file of another program is refused, naming it; so is one of a newer flowtag")
    func foreignFiles() throws {
        let p = Self.path()
        defer { Self.remove(p) }
        do {
            let q = try DatabaseQueueOpener.open(p)
            try q("CREATE TABLE accounts (id INTEGER)")
        }
        #expect(throws: Journal.ForeignFile.self) { try Journal(path: p) }
        do { _ = try Journal(path: p) } catch { #expect("\(error)".contains(p) && "\(error)".contains("not a flowtag journal")) }
        let newer = Self.path()
        defer { Self.remove(newer) }
        let j = try Journal(path: newer)
        try j.db.write { try $0.execute(sql: "INSERT INTO grdb_migrations (identifier) VALUES ('v99')") }
        do { _ = try Journal(path: newer); Issue.record("a newer journal was accepted") } catch {
            #expect("\(error)".contains("newer flowtag"))
        }
    }

    @Test("history answers the newest matches of a prefix filter on a journal far larger than the limit")
    func historyPagesBack() throws {
        let p = Self.path()
        defer { Self.remove(p) }
        let j = try Journal(path: p)
        // 30,000 rows; only every 1000th goes to 10.9.x.x, and a limit of 5 must find the newest five.
        for i in 0..<30_000 {
            j.append(Self.record(i, closedAt: Int64(1_000_000 + i), remote: i % 1000 == 0 ? "10.9.0.\(i / 1000)" : "10.1.2.3"))
        }
        j.flush()
        var f = FlowFilter()
        f.remote = IPPrefix("10.9.0.0/16")
        let rows = try j.history(f, since: nil, until: nil, limit: 5)
        #expect(rows.map(\.flow) == [25_000, 26_000, 27_000, 28_000, 29_000])
        f.local = IPPrefix("192.168.0.0/24")
        #expect(try j.history(f, since: nil, until: nil, limit: 3).map(\.flow) == [27_000, 28_000, 29_000])
        f.local = IPPrefix("192.168.0.3")
        #expect(try j.history(f, since: nil, until: nil, limit: 3).isEmpty)
    }
}

/// A raw SQLite file with someone else's schema (through the sqlite3 CLI-free GRDB queue).
import GRDB
enum DatabaseQueueOpener {
    static func open(_ path: String) throws -> (String) throws -> Void {
        let q = try DatabaseQueue(path: path)
        return { sql in try q.write { try $0.execute(sql: sql) } }
    }
}
