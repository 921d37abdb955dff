import FlowTagWire
import FlowTagKernel

/// The live flows, kept compact: the agent tracks every socket on the machine, so a
/// flow costs one fixed-size row (no strings, no per-flow allocation), an owner shared by
/// all flows of a process, and four bytes of index. `FlowRecord`s are built only for
/// answers. (A dictionary of `FlowRecord`s by 5-tuple cost ≈ 1.1 KB per flow: B6.)
/// Not thread-safe: `FlowTable` holds it under its lock.
struct LiveFlows {
    /// One live flow. Addresses are stored as two 64-bit halves; IPv4 in the low half.
    struct Row {
        var cookie: UInt64
        var netns: UInt64
        var openedAt: Int64
        var bytesSent: UInt64
        var bytesReceived: UInt64
        var localHi: UInt64, localLo: UInt64
        var remoteHi: UInt64, remoteLo: UInt64
        var owner: UInt32
        var tid: UInt32
        var localPort: UInt16, remotePort: UInt16
        /// Bit 0 tcp, bit 1 ipv4 family, bit 2 inbound, bits 3–4 attribution,
        /// bit 5 local address is v4, bit 6 remote address is v4, bit 7 row in use.
        var flags: UInt8
    }

    private(set) var rows: ContiguousArray<Row> = []
    private var freeRows: [Int32] = []
    /// Open addressing, linear probing: row index + 1, 0 = empty. Capacity a power of two,
    /// at most half full (deletes shift back, so there are no tombstones).
    private var index: [Int32] = Array(repeating: 0, count: 16)
    private(set) var count = 0
    private var owners = Owners()

    // MARK: record <-> row

    private static let inUse: UInt8 = 1 << 7
    private static let attributions = Attribution.allCases

    private static func split(_ a: IPAddress) -> (UInt64, UInt64, Bool) {
        switch a {
        case .v4(let v): return (0, UInt64(v), true)
        case .v6(let h, let l): return (h, l, false)
        }
    }

    private static func join(_ hi: UInt64, _ lo: UInt64, v4: Bool) -> IPAddress {
        v4 ? .v4(UInt32(truncatingIfNeeded: lo)) : .v6(hi, lo)
    }

    private mutating func makeRow(_ r: FlowRecord) -> Row {
        let (lh, ll, l4) = Self.split(r.local.address)
        let (rh, rl, r4) = Self.split(r.remote.address)
        let attr = UInt8(Self.attributions.firstIndex(of: r.attribution) ?? 0)
        var flags = Self.inUse | attr << 3
        if r.protocol == .tcp { flags |= 1 }
        if r.family == .ipv4 { flags |= 2 }
        if r.direction == .inbound { flags |= 4 }
        if l4 { flags |= 1 << 5 }
        if r4 { flags |= 1 << 6 }
        return Row(cookie: r.flow, netns: r.netns, openedAt: r.openedAt.nanoseconds, bytesSent: r.bytesSent,
                   bytesReceived: r.bytesReceived, localHi: lh, localLo: ll, remoteHi: rh, remoteLo: rl,
                   owner: owners.retain(r.process), tid: r.process.tid,
                   localPort: r.local.port, remotePort: r.remote.port, flags: flags)
    }

    func record(_ row: Row) -> FlowRecord {
        var owner = owners[row.owner]
        owner.tid = row.tid
        let f = row.flags
        return FlowRecord(flow: row.cookie, netns: row.netns, protocol: f & 1 != 0 ? .tcp : .udp,
                          family: f & 2 != 0 ? .ipv4 : .ipv6, direction: f & 4 != 0 ? .inbound : .outbound,
                          local: Endpoint(address: Self.join(row.localHi, row.localLo, v4: f & 1 << 5 != 0), port: row.localPort),
                          remote: Endpoint(address: Self.join(row.remoteHi, row.remoteLo, v4: f & 1 << 6 != 0), port: row.remotePort),
                          process: owner, attribution: Self.attributions[Int(f >> 3 & 3)],
                          bytesSent: row.bytesSent, bytesReceived: row.bytesReceived,
                          openedAt: WallTime(nanoseconds: row.openedAt))
    }

    // MARK: index

    private struct Key: Hashable {
        var netns: UInt64, lh: UInt64, ll: UInt64, rh: UInt64, rl: UInt64
        var lp: UInt16, rp: UInt16, tcp: Bool
    }

    private static func key(_ row: Row) -> Key {
        Key(netns: row.netns, lh: row.localHi, ll: row.localLo, rh: row.remoteHi, rl: row.remoteLo,
            lp: row.localPort, rp: row.remotePort, tcp: row.flags & 1 != 0)
    }

    private static func key(netns: UInt64, proto: FlowProtocol, local: Endpoint, remote: Endpoint) -> Key {
        let (lh, ll, _) = split(local.address)
        let (rh, rl, _) = split(remote.address)
        return Key(netns: netns, lh: lh, ll: ll, rh: rh, rl: rl, lp: local.port, rp: remote.port, tcp: proto == .tcp)
    }

    private var mask: Int { index.count - 1 }

    /// The index position holding this key's row, or the empty position where it would go.
    private func probe(_ key: Key) -> (position: Int, row: Int32?) {
        var i = key.hashValue & mask
        while true {
            let slot = index[i]
            if slot == 0 { return (i, nil) }
            if Self.key(rows[Int(slot - 1)]) == key { return (i, slot - 1) }
            i = (i + 1) & mask
        }
    }

    private mutating func growIndexIfNeeded() {
        guard (count + 1) * 2 > index.count else { return }
        var bigger = LiveFlowsIndex(capacity: index.count * 2)
        for slot in index where slot != 0 { bigger.insert(slot, hash: Self.key(rows[Int(slot - 1)]).hashValue) }
        index = bigger.slots
    }

    // MARK: operations

    func find(netns: UInt64, proto: FlowProtocol, local: Endpoint, remote: Endpoint) -> FlowRecord? {
        probe(Self.key(netns: netns, proto: proto, local: local, remote: remote)).row.map { record(rows[Int($0)]) }
    }

    /// Inserts or replaces the flow with this record's 5-tuple; true when it was new.
    @discardableResult
    mutating func upsert(_ r: FlowRecord) -> Bool {
        let row = makeRow(r)
        let (position, existing) = probe(Self.key(row))
        if let existing {
            owners.release(rows[Int(existing)].owner)
            rows[Int(existing)] = row
            return false
        }
        let at: Int32
        if let free = freeRows.popLast() {
            at = free
            rows[Int(at)] = row
        } else {
            at = Int32(rows.count)
            rows.append(row)
        }
        index[position] = at + 1
        count += 1
        growIndexIfNeeded()
        return true
    }

    /// Removes the flow with this record's 5-tuple; true when there was one.
    @discardableResult
    mutating func remove(_ r: FlowRecord) -> Bool {
        let (position, found) = probe(Self.key(netns: r.netns, proto: r.protocol, local: r.local, remote: r.remote))
        guard let found else { return false }
        owners.release(rows[Int(found)].owner)
        rows[Int(found)].flags = 0
        freeRows.append(found)
        count -= 1
        // Backward-shift deletion: later entries of the probe run move up into the gap.
        var gap = position
        var i = (position + 1) & mask
        while index[i] != 0 {
            let home = Self.key(rows[Int(index[i] - 1)]).hashValue & mask
            // Move it if its home is not within (gap, i] cyclically.
            let distanceFromHome = (i - home) & mask
            let distanceFromGap = (i - gap) & mask
            if distanceFromHome >= distanceFromGap {
                index[gap] = index[i]
                gap = i
            }
            i = (i + 1) & mask
        }
        index[gap] = 0
        if count == 0 { rows.removeAll(); freeRows.removeAll() }
        return true
    }

    /// Every live flow (in no particular order).
    func forEach(_ body: (Row) -> Void) {
        for row in rows where row.flags & Self.inUse != 0 { body(row) }
    }

    /// Records of the rows that pass a cheap test first (`FlowRecord`s only for those).
    func records(where include: (Row) -> Bool = { _ in true }) -> [FlowRecord] {
        var out: [FlowRecord] = []
        forEach { if include($0) { out.append(record($0)) } }
        return out
    }

    var distinctOwners: Int { owners.count }
}

/// Sized open-addressing slots for a rebuild of the index.
private struct LiveFlowsIndex {
    var slots: [Int32]
    init(capacity: Int) { slots = Array(repeating: 0, count: capacity) }
    mutating func insert(_ slot: Int32, hash: Int) {
        let mask = slots.count - 1
        var i = hash & mask
        while slots[i] != 0 { i = (i + 1) & mask }
        slots[i] = slot
    }
}

/// Owners shared by the flows of one process: interned by everything but the thread id
/// (kept per flow), reference-counted, their numbers reused.
private struct Owners {
    private struct Key: Hashable {
        var pid: UInt32, uid: UInt32, gid: UInt32, cgroup: UInt64, exe: String, comm: String
        init(_ o: ProcessOwner) { pid = o.pid; uid = o.uid; gid = o.gid; cgroup = o.cgroup; exe = o.exe; comm = o.comm }
    }
    private var owners: [ProcessOwner] = []
    private var references: [Int] = []
    private var numbers: [Key: UInt32] = [:]
    private var free: [UInt32] = []

    var count: Int { numbers.count }

    subscript(n: UInt32) -> ProcessOwner { owners[Int(n)] }

    mutating func retain(_ o: ProcessOwner) -> UInt32 {
        let key = Key(o)
        if let n = numbers[key] {
            references[Int(n)] += 1
            return n
        }
        var shared = o
        shared.tid = 0
        let n: UInt32
        if let f = free.popLast() {
            n = f
            owners[Int(n)] = shared
            references[Int(n)] = 1
        } else {
            n = UInt32(owners.count)
            owners.append(shared)
            references.append(1)
        }
        numbers[key] = n
        return n
    }

    mutating func release(_ n: UInt32) {
        references[Int(n)] -= 1
        guard references[Int(n)] == 0 else { return }
        numbers.removeValue(forKey: Key(owners[Int(n)]))
        owners[Int(n)] = ProcessOwner(pid: 0, tid: 0, exe: "", comm: "", uid: 0, gid: 0, cgroup: 0)
        free.append(n)
    }
}
