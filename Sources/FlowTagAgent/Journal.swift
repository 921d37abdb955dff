import FlowTagWire
import FlowTagKernel
import Foundation
import GRDB
import GRDBSQLite
import DequeModule
import Logging
import Synchronization

/// Closed flows in an embedded SQLite database (WAL), the agent's outbox of record.
///
/// Rows are queued by `append` (never blocking the event path) and written by the
/// journal's own thread in batches, one transaction each, so a kill -9 mid-write loses
/// no committed row and corrupts nothing. A close's kernel entry (`CloseReceipt`) is
/// given back only after its row is committed, so rows queued at a crash are found again
/// by the next agent; the same flow written twice is kept once (unique flow identity).
/// When writes fail (a full disk), the thread backs off, counts, logs once per
/// interval, and keeps at most `maxPending` rows, dropping the oldest (counted).
public final class Journal: Sendable {
    public let path: String
    let db: DatabasePool
    let retention: Duration
    let maxBytes: Int64
    public let maxPending: Int
    public static let batchSize = 1000
    static let maxBackoffSeconds = 30.0
    static let logInterval: Duration = .seconds(60)

    private struct State {
        var pending = Deque<FlowRecord>()
        var receipts = Deque<CloseReceipt?>()
        /// Sequence number of `pending[0]`: rows dropped while a batch is written are
        /// told apart from rows the batch wrote.
        var firstSeq = 0
        var writeErrors = 0
        var dropped = 0
        var written = 0
        var failingSince: ContinuousClock.Instant?
        var retryAt: ContinuousClock.Instant?
        var backoff = 1.0
        var lastLogged: ContinuousClock.Instant?
        var stopping = false
    }
    private let state = Mutex(State())
    private let wake = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)
    private let started = Atomic<Bool>(false)
    private let log = Logger(label: "flowtagd.journal")
    /// Gets the kernel entries of closes that are journaled (or dropped): any thread.
    private let release: @Sendable ([CloseReceipt]) -> Void

    /// Opens (or creates) the journal. A file that is not a flowtag journal, or one
    /// written by a newer flowtag, is refused naming the file.
    public init(path: String, retentionDays: Int = 7, maxBytes: Int64 = 1 << 30, maxPending: Int = 32768,
                release: @escaping @Sendable ([CloseReceipt]) -> Void = { _ in }) throws {
        self.path = path
        retention = .seconds(retentionDays * 86400)
        self.maxBytes = maxBytes
        self.maxPending = maxPending
        self.release = release
        let dir = (path as NSString).deletingLastPathComponent
        if !dir.isEmpty { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
        var config = Configuration()
        config.busyMode = .timeout(5)
        config.prepareDatabase { db in db.add(function: Journal.inPrefixFunction) }
        db = try DatabasePool(path: path, configuration: config)
        let migrator = Self.migrator
        try db.write { db in try Self.checkSchema(db, path: path, migrator: migrator) }
        try migrator.migrate(db)
    }

    /// Why the journal refuses a file.
    public struct ForeignFile: Error, CustomStringConvertible {
        public let description: String
    }

    static let columns = ["id", "flow", "netns", "protocol", "family", "direction", "local_address", "local_port",
                          "remote_address", "remote_port", "pid", "tid", "exe", "comm", "uid", "gid", "cgroup",
                          "attribution", "bytes_sent", "bytes_received", "opened_at", "closed_at", "close_reason"]

    /// A file with tables but no flowtag migrations is someone else's database; one with
    /// migrations this build does not know was written by a newer flowtag.
    static func checkSchema(_ db: Database, path: String, migrator: DatabaseMigrator) throws {
        let tables = try String.fetchAll(db, sql: "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        guard !tables.isEmpty else { return }
        guard tables.contains("grdb_migrations") else {
            throw ForeignFile(description: "\(path) is not a flowtag journal (it holds tables \(tables.sorted().prefix(5).joined(separator: ", "))); use another --journal path")
        }
        let applied = try String.fetchAll(db, sql: "SELECT identifier FROM grdb_migrations")
        let known = Set(migrator.migrations)
        if let unknown = applied.first(where: { !known.contains($0) }) {
            throw ForeignFile(description: "\(path) was written by a newer flowtag (migration \(unknown)); use that version or another --journal path")
        }
        if applied.contains("v1") {
            let have = Set(try db.columns(in: "flows").map(\.name))
            if let missing = columns.first(where: { !have.contains($0) }) {
                throw ForeignFile(description: "\(path) is not a flowtag journal (table flows has no column \(missing))")
            }
        }
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.create(table: "flows") { t in
                t.autoIncrementedPrimaryKey("id")
                t.column("flow", .integer).notNull()
                t.column("netns", .integer).notNull()
                t.column("protocol", .text).notNull()
                t.column("family", .text).notNull()
                t.column("direction", .text).notNull()
                t.column("local_address", .text).notNull()
                t.column("local_port", .integer).notNull()
                t.column("remote_address", .text).notNull()
                t.column("remote_port", .integer).notNull()
                t.column("pid", .integer).notNull()
                t.column("tid", .integer).notNull()
                t.column("exe", .text).notNull()
                t.column("comm", .text).notNull()
                t.column("uid", .integer).notNull()
                t.column("gid", .integer).notNull()
                t.column("cgroup", .integer).notNull()
                t.column("attribution", .text).notNull()
                t.column("bytes_sent", .integer).notNull()
                t.column("bytes_received", .integer).notNull()
                t.column("opened_at", .integer).notNull()  // ns since the epoch
                t.column("closed_at", .integer).notNull()
                t.column("close_reason", .text)
            }
            try db.create(index: "flows_closed_at", on: "flows", columns: ["closed_at"])
            try db.create(index: "flows_remote", on: "flows", columns: ["remote_address"])
            try db.create(index: "flows_pid", on: "flows", columns: ["pid"])
        }
        // One row per flow: a close written again after a crash (its kernel entry was
        // still there) is ignored. A socket cookie names one socket per boot; UDP flows of
        // one socket differ by peer and by the kernel's open time.
        migrator.registerMigration("v2") { db in
            try db.alter(table: "flows") { t in
                t.add(column: "boot", .integer).notNull().defaults(to: 0)            // hash of the boot id
                t.add(column: "opened_boot_ns", .integer).notNull().defaults(to: 0)  // the kernel's open time
            }
            try db.execute(sql: """
                DELETE FROM flows WHERE id NOT IN (SELECT MIN(id) FROM flows
                  GROUP BY flow, opened_at, local_port, remote_port, remote_address)
                """)
            try db.execute(sql: "UPDATE flows SET opened_boot_ns = opened_at")
            try db.create(index: "flows_identity", on: "flows",
                          columns: ["boot", "flow", "opened_boot_ns", "local_port", "remote_port", "remote_address"], unique: true)
        }
        return migrator
    }

    /// This boot, as a number (FNV-1a of /proc/sys/kernel/random/boot_id): socket cookies
    /// and the boot clock start again at each boot.
    static let boot: Int64 = {
        let id = (try? readFile("/proc/sys/kernel/random/boot_id")) ?? ""
        var h: UInt64 = 14695981039346656037
        for b in id.utf8 where b != 10 { h = (h ^ UInt64(b)) &* 1099511628211 }
        return Int64(bitPattern: h)
    }()

    /// Starts the writer thread.
    public func start() {
        guard !started.exchange(true, ordering: .relaxed) else { return }
        let t = Thread { [self] in writerLoop() }
        t.name = "flowtag-journal"
        t.start()
    }

    /// Queues a closed flow (O(1); never touches the database). While writes fail, past
    /// `maxPending` queued rows the oldest is dropped, counted, and its kernel entry given
    /// back (kernel entries held for the journal take room from live flows). While writes
    /// succeed nothing is dropped: a burst (a restart after an outage) waits its turn,
    /// bounded by the kernel maps that hold its entries.
    public func append(_ r: FlowRecord, receipt: CloseReceipt? = nil) {
        var droppedReceipt: CloseReceipt?
        let count = state.withLock { s -> Int in
            if s.failingSince != nil, s.pending.count >= maxPending {
                s.pending.removeFirst()
                droppedReceipt = s.receipts.removeFirst()
                s.firstSeq += 1
                s.dropped += 1
            }
            s.pending.append(r)
            s.receipts.append(receipt)
            return s.pending.count
        }
        if let droppedReceipt { release([droppedReceipt]) }
        if count == Self.batchSize { wake.signal() }
    }

    public var writeErrors: Int { state.withLock { $0.writeErrors } }
    /// Rows dropped because the journal could not keep up (writes failing).
    public var droppedRows: Int { state.withLock { $0.dropped } }
    public var pendingRows: Int { state.withLock { $0.pending.count } }
    public var isFailing: Bool { state.withLock { $0.failingSince != nil } }

    private func writerLoop() {
        var lastRetention = ContinuousClock.now
        while true {
            _ = wake.wait(timeout: .now() + .seconds(1))
            let (stop, wait) = state.withLock { s in (s.stopping, s.retryAt.map { ContinuousClock.now < $0 } ?? false) }
            if stop { break }
            if wait { continue }
            flush()
            if ContinuousClock.now - lastRetention >= .seconds(60), !isFailing {
                lastRetention = .now
                _ = try? enforceRetention()
            }
        }
        finished.signal()
    }

    /// Stops the writer thread and makes one last attempt to write what is queued
    /// (bounded: a failing disk does not hold up the stop). Returns the rows left unwritten.
    @discardableResult
    public func stop() -> Int {
        state.withLock { $0.stopping = true }
        if started.load(ordering: .relaxed) {
            wake.signal()
            finished.wait()
        }
        state.withLock { $0.retryAt = nil }
        flush()
        return pendingRows
    }

    /// Writes everything queued, in batches; stops at the first failure (the rows stay
    /// queued, the next attempt waits out a growing back-off). Returns the rows written.
    @discardableResult
    public func flush() -> Int {
        var total = 0
        while true {
            let (batch, start) = state.withLock { s -> ([FlowRecord], Int) in
                (Array(s.pending.prefix(Self.batchSize * 4)), s.firstSeq)
            }
            guard !batch.isEmpty else { return total }
            do {
                try write(batch)
            } catch {
                failed(error)
                return total
            }
            let receipts = state.withLock { s -> [CloseReceipt] in
                // Rows dropped meanwhile came off the front (their receipts went then).
                let n = max(0, start + batch.count - s.firstSeq)
                let done = s.receipts.prefix(n).compactMap { $0 }
                s.pending.removeFirst(n)
                s.receipts.removeFirst(n)
                s.firstSeq += n
                s.written += batch.count
                if s.failingSince != nil {
                    log.notice("journal: writing again", metadata: ["path": "\(path)", "rows_waiting": "\(s.pending.count)", "rows_dropped": "\(s.dropped)"])
                }
                s.failingSince = nil
                s.retryAt = nil
                s.backoff = 1
                return done
            }
            release(receipts)
            total += batch.count
        }
    }

    private func failed(_ error: any Error) {
        var dropped: [CloseReceipt] = []
        defer { release(dropped) }
        state.withLock { s in
            let now = ContinuousClock.now
            s.writeErrors += 1
            let excess = s.pending.count - maxPending
            if excess > 0 {
                dropped = s.receipts.prefix(excess).compactMap { $0 }
                s.pending.removeFirst(excess)
                s.receipts.removeFirst(excess)
                s.firstSeq += excess
                s.dropped += excess
            }
            if s.failingSince == nil { s.failingSince = now }
            s.retryAt = now + .milliseconds(Int(s.backoff * 1000))
            let delay = s.backoff
            s.backoff = min(s.backoff * 2, Self.maxBackoffSeconds)
            if s.lastLogged.map({ now - $0 >= Self.logInterval }) ?? true {
                s.lastLogged = now
                log.error("journal: cannot write", metadata: [
                    "path": "\(path)", "error": "\(String(describing: error).prefix(300))",
                    "rows_waiting": "\(s.pending.count)", "rows_dropped": "\(s.dropped)", "retry_in_s": "\(delay)",
                ])
            }
        }
    }

    private func write(_ batch: [FlowRecord]) throws {
        try db.write { db in
            let stmt = try db.makeStatement(sql: """
                INSERT OR IGNORE INTO flows (flow, netns, protocol, family, direction, local_address, local_port, remote_address,
                  remote_port, pid, tid, exe, comm, uid, gid, cgroup, attribution, bytes_sent, bytes_received, opened_at,
                  closed_at, close_reason, boot, opened_boot_ns) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                """)
            // Bound with the C API: building GRDB's argument arrays (an existential per
            // column) cost more than SQLite itself at tens of thousands of rows a second.
            let h = stmt.sqliteStatement
            let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)
            for r in batch {
                sqlite3_reset(h)
                var i: Int32 = 0
                func int(_ v: Int64) { i += 1; sqlite3_bind_int64(h, i, v) }
                func text(_ v: String?) {
                    i += 1
                    if let v { sqlite3_bind_text(h, i, v, -1, transient) } else { sqlite3_bind_null(h, i) }
                }
                int(Int64(bitPattern: r.flow)); int(Int64(bitPattern: r.netns))
                text(r.protocol.rawValue); text(r.family.rawValue); text(r.direction.rawValue)
                text(r.local.address.description); int(Int64(r.local.port))
                text(r.remote.address.description); int(Int64(r.remote.port))
                int(Int64(r.process.pid)); int(Int64(r.process.tid)); text(r.process.exe); text(r.process.comm)
                int(Int64(r.process.uid)); int(Int64(r.process.gid)); int(Int64(bitPattern: r.process.cgroup))
                text(r.attribution.rawValue)
                int(Int64(clamping: r.bytesSent)); int(Int64(clamping: r.bytesReceived))
                int(r.openedAt.nanoseconds); int((r.closedAt ?? r.openedAt).nanoseconds); text(r.closeReason)
                int(Self.boot)
                int(r.openedBootNanoseconds != 0 ? Int64(bitPattern: r.openedBootNanoseconds) : r.openedAt.nanoseconds)
                let rc = sqlite3_step(h)
                guard rc == SQLITE_DONE else {
                    throw DatabaseError(resultCode: ResultCode(rawValue: rc), message: String(cString: sqlite3_errmsg(db.sqliteConnection)))
                }
            }
        }
    }

    /// Drops rows older than the retention, then the oldest until the rows fit `maxBytes`
    /// (pages in use: freed pages are reused, the file is never vacuumed). Deletes in
    /// chunks, each its own short transaction, so closes keep being committed meanwhile.
    @discardableResult
    public func enforceRetention(now: WallTime = .now()) throws -> Int {
        let cutoff = now.nanoseconds - Int64(retention.components.seconds) * 1_000_000_000
        var removed = 0
        while true {
            let n = try db.write { db -> Int in
                try db.execute(sql: "DELETE FROM flows WHERE id IN (SELECT id FROM flows WHERE closed_at < ? LIMIT 5000)",
                               arguments: [cutoff])
                return db.changesCount
            }
            removed += n
            if n < 5000 { break }
        }
        while try sizeBytes() > maxBytes {
            let n = try db.write { db -> Int in
                try db.execute(sql: """
                    DELETE FROM flows WHERE id IN (SELECT id FROM flows ORDER BY closed_at LIMIT
                      (SELECT MIN(5000, MAX(100, COUNT(*) / 10)) FROM flows))
                    """)
                return db.changesCount
            }
            if n == 0 { break }
            removed += n
        }
        return removed
    }

    /// Bytes the database uses (pages in use, not free pages).
    public func sizeBytes() throws -> Int64 {
        try db.read { db in
            let pages = try Int64.fetchOne(db, sql: "PRAGMA page_count") ?? 0
            let free = try Int64.fetchOne(db, sql: "PRAGMA freelist_count") ?? 0
            let size = try Int64.fetchOne(db, sql: "PRAGMA page_size") ?? 4096
            return (pages - free) * size
        }
    }

    /// SQLite's own check of the file: "ok" when nothing is corrupt.
    public func integrityCheck() throws -> String {
        try db.read { try String.fetchOne($0, sql: "PRAGMA integrity_check") ?? "" }
    }

    public func count() throws -> Int { try db.read { try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM flows") ?? 0 } }

    /// A history query stopped at its time limit: the client is told to narrow it.
    public struct QueryTimedOut: Error, CustomStringConvertible {
        public let limit: Duration
        public var description: String {
            "the history query ran past \(limit.components.seconds) s: narrow it with since/until, pid, exe or an exact address"
        }
    }

    /// The default time limit of one history query, well under the API's answer limit.
    public static let queryTimeLimit = Duration.seconds(20)

    /// The newest `limit` closed flows in [since, until] matching the filter, returned
    /// oldest first. Every test runs in SQL (address prefixes by `ft_in_prefix`), so a
    /// filter that matches nothing scans at SQLite's speed; past `timeLimit` the scan is
    /// interrupted and `QueryTimedOut` thrown rather than answering late or partially.
    public func history(_ filter: FlowFilter, since: WallTime?, until: WallTime?, uid: UInt32? = nil, limit: Int = 10000,
                        timeLimit: Duration = Journal.queryTimeLimit) throws -> [FlowRecord] {
        var clauses: [String] = [], args: [any DatabaseValueConvertible] = []
        if let uid, let f = filter.uid, f != uid { return [] }
        if let since { clauses.append("closed_at >= ?"); args.append(since.nanoseconds) }
        if let until { clauses.append("opened_at <= ?"); args.append(until.nanoseconds) }
        if let pid = filter.pid { clauses.append("pid = ?"); args.append(Int(pid)) }
        if let exe = filter.exe { clauses.append("exe = ?"); args.append(exe) }
        if let comm = filter.comm { clauses.append("comm = ?"); args.append(comm) }
        if let u = filter.uid ?? uid { clauses.append("uid = ?"); args.append(Int(u)) }
        if let cg = filter.cgroup { clauses.append("cgroup = ?"); args.append(Int64(bitPattern: cg)) }
        if let p = filter.proto { clauses.append("protocol = ?"); args.append(p.rawValue) }
        if let port = filter.port { clauses.append("(local_port = ? OR remote_port = ?)"); args += [Int(port), Int(port)] }
        for (column, prefix) in [("remote_address", filter.remote), ("local_address", filter.local)] {
            guard let prefix else { continue }
            if prefix.length == (prefix.address.isIPv4 ? 32 : 128) {
                clauses.append("\(column) = ?"); args.append(prefix.address.description)
            } else {
                // IPv6 text always has a colon and IPv4 text never: the cheap test goes first.
                clauses.append("instr(\(column), ':') \(prefix.address.isIPv4 ? "=" : ">") 0 AND ft_in_prefix(\(column), ?)")
                args.append(prefix.description)
            }
        }
        let whereSQL = clauses.isEmpty ? "" : "WHERE " + clauses.joined(separator: " AND ")
        let rows = try db.read { db in
            try QueryDeadline(after: timeLimit).run(on: db) {
                try Row.fetchAll(db, sql: "SELECT * FROM flows \(whereSQL) ORDER BY closed_at DESC, id DESC LIMIT ?",
                                 arguments: StatementArguments(args + [limit]))
            }
        }
        // The SQL above decided; `matches` re-checks what it can (a row it cannot decode is skipped).
        return rows.compactMap { row in Self.record(row).flatMap { filter.matches($0, state: .closed) ? $0 : nil } }.reversed()
    }

    /// `ft_in_prefix(address, prefix)`: whether a stored address lies in a CIDR prefix,
    /// by the same rules as `FlowFilter` (an IPv4 prefix never matches an IPv6 address).
    static let inPrefixFunction = DatabaseFunction("ft_in_prefix", argumentCount: 2, pure: true) { values in
        guard let text = String.fromDatabaseValue(values[0]), let address = IPAddress(text),
              let prefixText = String.fromDatabaseValue(values[1]), let prefix = IPPrefix(prefixText) else { return false }
        return prefix.contains(address)
    }

    static func record(_ row: Row) -> FlowRecord? {
        guard let local = IPAddress(row["local_address"] as String), let remote = IPAddress(row["remote_address"] as String),
              let proto = FlowProtocol(rawValue: row["protocol"]), let family = AddressFamily(rawValue: row["family"]),
              let dir = FlowDirection(rawValue: row["direction"]), let attr = Attribution(rawValue: row["attribution"]) else { return nil }
        let owner = ProcessOwner(pid: UInt32(truncatingIfNeeded: row["pid"] as Int64), tid: UInt32(truncatingIfNeeded: row["tid"] as Int64),
                                 exe: row["exe"], comm: row["comm"],
                                 uid: UInt32(truncatingIfNeeded: row["uid"] as Int64), gid: UInt32(truncatingIfNeeded: row["gid"] as Int64),
                                 cgroup: UInt64(bitPattern: row["cgroup"] as Int64))
        return FlowRecord(flow: UInt64(bitPattern: row["flow"] as Int64), netns: UInt64(bitPattern: row["netns"] as Int64),
                          protocol: proto, family: family, direction: dir,
                          local: Endpoint(address: local, port: UInt16(truncatingIfNeeded: row["local_port"] as Int64)),
                          remote: Endpoint(address: remote, port: UInt16(truncatingIfNeeded: row["remote_port"] as Int64)),
                          process: owner, attribution: attr,
                          bytesSent: UInt64(bitPattern: row["bytes_sent"] as Int64), bytesReceived: UInt64(bitPattern: row["bytes_received"] as Int64),
                          openedAt: WallTime(nanoseconds: row["opened_at"]), closedAt: WallTime(nanoseconds: row["closed_at"]),
                          closeReason: row["close_reason"])
    }
}
