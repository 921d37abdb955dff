import FlowTagKernel
import Foundation
import GRDB
import GRDBSQLite
import Synchronization

/// Closed flows in an embedded SQLite database (WAL): written in batches, one transaction
/// each, so a kill -9 mid-write loses no committed row and corrupts nothing; kept by age
/// and by size. `history` answers "which process talked to 10.1.2.3 an hour ago?".
public final class Journal: Sendable {
    public let path: String
    let db: DatabasePool
    let retention: Duration
    let maxBytes: Int64
    private let pending = Mutex<[FlowRecord]>([])
    private let errors = Mutex<Int>(0)
    public static let batchSize = 1000

    public init(path: String, retentionDays: Int = 7, maxBytes: Int64 = 1 << 30) throws {
        self.path = path
        retention = .seconds(retentionDays * 86400)
        self.maxBytes = maxBytes
        let dir = (path as NSString).deletingLastPathComponent
        if !dir.isEmpty { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
        var config = Configuration()
        config.busyMode = .timeout(5)
        db = try DatabasePool(path: path, configuration: config)
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
        try migrator.migrate(db)
    }

    /// Queues a closed flow; `flush` writes the queue.
    public func append(_ r: FlowRecord) {
        let n = pending.withLock { $0.append(r); return $0.count }
        if n >= Self.batchSize { flush() }
    }

    public var writeErrors: Int { errors.withLock { $0 } }

    /// Writes everything queued in one transaction. On failure the rows stay queued.
    @discardableResult
    public func flush() -> Int {
        let batch = pending.withLock { p in defer { p.removeAll() }; return p }
        guard !batch.isEmpty else { return 0 }
        do {
            try db.write { db in
                let stmt = try db.makeStatement(sql: """
                    INSERT INTO flows (flow, netns, protocol, family, direction, local_address, local_port, remote_address,
                      remote_port, pid, tid, exe, comm, uid, gid, cgroup, attribution, bytes_sent, bytes_received, opened_at,
                      closed_at, close_reason) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
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
                    let rc = sqlite3_step(h)
                    guard rc == SQLITE_DONE else {
                        throw DatabaseError(resultCode: ResultCode(rawValue: rc), message: String(cString: sqlite3_errmsg(db.sqliteConnection)))
                    }
                }
            }
            return batch.count
        } catch {
            errors.withLock { $0 += 1 }
            pending.withLock { $0.insert(contentsOf: batch, at: 0) }
            return 0
        }
    }

    /// Drops rows older than the retention, then the oldest until the file fits `maxBytes`.
    @discardableResult
    public func enforceRetention(now: WallTime = .now()) throws -> Int {
        let cutoff = now.nanoseconds - Int64(retention.components.seconds) * 1_000_000_000
        var removed = try db.write { db -> Int in
            try db.execute(sql: "DELETE FROM flows WHERE closed_at < ?", arguments: [cutoff])
            return db.changesCount
        }
        while try sizeBytes() > maxBytes {
            let n = try db.write { db -> Int in
                try db.execute(sql: """
                    DELETE FROM flows WHERE id IN (SELECT id FROM flows ORDER BY closed_at LIMIT
                      (SELECT MAX(100, COUNT(*) / 10) FROM flows))
                    """)
                return db.changesCount
            }
            if n == 0 { break }
            removed += n
            try db.writeWithoutTransaction { try $0.execute(sql: "PRAGMA wal_checkpoint(TRUNCATE); VACUUM") }
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

    /// Closed flows in [since, until] matching the filter, oldest first, at most `limit`.
    public func history(_ filter: FlowFilter, since: WallTime?, until: WallTime?, uid: UInt32? = nil, limit: Int = 10000) throws -> [FlowRecord] {
        var clauses: [String] = [], args: [any DatabaseValueConvertible] = []
        if let since { clauses.append("closed_at >= ?"); args.append(since.nanoseconds) }
        if let until { clauses.append("opened_at <= ?"); args.append(until.nanoseconds) }
        if let pid = filter.pid { clauses.append("pid = ?"); args.append(Int(pid)) }
        if let exe = filter.exe { clauses.append("exe = ?"); args.append(exe) }
        if let comm = filter.comm { clauses.append("comm = ?"); args.append(comm) }
        if let u = filter.uid ?? uid { clauses.append("uid = ?"); args.append(Int(u)) }
        if let uid, filter.uid != nil, filter.uid != uid { return [] }
        if let cg = filter.cgroup { clauses.append("cgroup = ?"); args.append(Int64(bitPattern: cg)) }
        if let p = filter.proto { clauses.append("protocol = ?"); args.append(p.rawValue) }
        if let port = filter.port { clauses.append("(local_port = ? OR remote_port = ?)"); args += [Int(port), Int(port)] }
        // An exact address is an index lookup; a prefix is checked below.
        if let r = filter.remote, r.length == (r.address.isIPv4 ? 32 : 128) {
            clauses.append("remote_address = ?"); args.append(r.address.description)
        }
        let whereSQL = clauses.isEmpty ? "" : "WHERE " + clauses.joined(separator: " AND ")
        let rows = try db.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM flows \(whereSQL) ORDER BY closed_at LIMIT ?",
                             arguments: StatementArguments(args + [limit * 4]))
        }
        return rows.compactMap(Self.record).filter { filter.matches($0, state: .closed) }.prefix(limit).map { $0 }
    }

    static func record(_ row: Row) -> FlowRecord? {
        guard let local = IPAddress(row["local_address"] as String), let remote = IPAddress(row["remote_address"] as String),
              let proto = FlowProtocol(rawValue: row["protocol"]), let family = AddressFamily(rawValue: row["family"]),
              let dir = FlowDirection(rawValue: row["direction"]), let attr = Attribution(rawValue: row["attribution"]) else { return nil }
        let owner = ProcessOwner(pid: UInt32(row["pid"] as Int), tid: UInt32(row["tid"] as Int), exe: row["exe"], comm: row["comm"],
                                 uid: UInt32(row["uid"] as Int), gid: UInt32(row["gid"] as Int),
                                 cgroup: UInt64(bitPattern: row["cgroup"] as Int64))
        return FlowRecord(flow: UInt64(bitPattern: row["flow"] as Int64), netns: UInt64(bitPattern: row["netns"] as Int64),
                          protocol: proto, family: family, direction: dir,
                          local: Endpoint(address: local, port: UInt16(row["local_port"] as Int)),
                          remote: Endpoint(address: remote, port: UInt16(row["remote_port"] as Int)),
                          process: owner, attribution: attr,
                          bytesSent: UInt64(row["bytes_sent"] as Int64), bytesReceived: UInt64(row["bytes_received"] as Int64),
                          openedAt: WallTime(nanoseconds: row["opened_at"]), closedAt: WallTime(nanoseconds: row["closed_at"]),
                          closeReason: row["close_reason"])
    }
}
