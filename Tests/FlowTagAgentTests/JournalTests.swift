import Foundation
import Testing
import FlowTagWire
@testable import FlowTagAgent
@testable import FlowTagKernel

@Suite("Journal")
struct JournalTests {
    static func record(_ i: Int, remote: String = "10.1.2.3", closedAt: Int64, exe: String = "/usr/bin/curl") -> FlowRecord {
        FlowRecord(flow: UInt64(i), netns: 1, protocol: .tcp, family: .ipv4, direction: .outbound,
                   local: Endpoint(address: IPAddress("192.168.0.2")!, port: UInt16(40000 + i % 1000)),
                   remote: Endpoint(address: IPAddress(remote)!, port: 443),
                   process: ProcessOwner(pid: UInt32(100 + i), tid: UInt32(100 + i), exe: exe, comm: "curl", uid: 1000, gid: 1000, cgroup: 9),
                   attribution: .kernel, bytesSent: 10, bytesReceived: 20,
                   openedAt: WallTime(nanoseconds: closedAt - 1_000_000_000), closedAt: WallTime(nanoseconds: closedAt),
                   closeReason: "fin")
    }

    func withJournal(retentionDays: Int = 7, maxBytes: Int64 = 1 << 30, _ body: (Journal, String) throws -> Void) throws {
        let path = NSTemporaryDirectory() + "flowtag-unit-\(getpid())-\(UUID().uuidString).db"
        defer { for s in ["", "-wal", "-shm"] { unlink(path + s) } }
        try body(try Journal(path: path, retentionDays: retentionDays, maxBytes: maxBytes), path)
    }

    @Test("which process talked to 10.1.2.3 an hour ago")
    func history() throws {
        try withJournal { j, _ in
            let now = WallTime.now().nanoseconds
            j.append(Self.record(1, closedAt: now - 3_600_000_000_000))                 // an hour ago
            j.append(Self.record(2, remote: "10.9.9.9", closedAt: now - 3_600_000_000_000))
            j.append(Self.record(3, closedAt: now - 3 * 3_600_000_000_000, exe: "/usr/bin/wget"))
            #expect(j.flush() == 3)
            var f = FlowFilter()
            f.remote = IPPrefix("10.1.2.3")
            let hit = try j.history(f, since: parseTimeBound("2h"), until: parseTimeBound("30m"))
            #expect(hit.map(\.process.pid) == [101])
            #expect(hit.first?.process.exe == "/usr/bin/curl" && hit.first?.closeReason == "fin")
            f.remote = IPPrefix("10.0.0.0/8")
            let all = try j.history(f, since: nil, until: nil)
            #expect(all.count == 3)
            var g = FlowFilter()
            g.exe = "/usr/bin/wget"
            let wget = try j.history(g, since: nil, until: nil)
            #expect(wget.map(\.process.pid) == [103])
            // Another user sees only their own rows.
            let other = try j.history(FlowFilter(), since: nil, until: nil, uid: 4242)
            #expect(other.isEmpty)
        }
    }

    @Test("address prefixes are decided in SQL: the newest matches, IPv4 and IPv6 apart")
    func prefixesInSQL() throws {
        try withJournal { j, _ in
            let now = WallTime.now().nanoseconds
            for i in 0..<3000 { j.append(Self.record(i, remote: "10.0.\(i / 250).\(i % 250)", closedAt: now - Int64(3000 - i) * 1_000_000)) }
            j.append(Self.record(5000, remote: "2001:db8::7", closedAt: now - 5_000_000_000))
            #expect(j.flush() == 3001)
            var f = FlowFilter()
            f.remote = IPPrefix("10.0.11.0/24")
            let hits = try j.history(f, since: nil, until: nil, limit: 10)
            // The 10 newest of the 250 in 10.0.11.0/24, oldest first.
            #expect(hits.map(\.flow) == Array(2990..<3000).map(UInt64.init))
            f.remote = IPPrefix("2001:db8::/32")
            let r1 = try j.history(f, since: nil, until: nil)
            #expect(r1.map(\.flow) == [5000])
            f.remote = IPPrefix("::/0")
            let r2 = try j.history(f, since: nil, until: nil)
            #expect(r2.map(\.flow) == [5000])
            f.remote = nil
            f.local = IPPrefix("::/0")  // every local address is IPv4
            let r3 = try j.history(f, since: nil, until: nil)
            #expect(r3.isEmpty)
            f.local = IPPrefix("192.168.0.0/16")
            let r4 = try j.history(f, since: nil, until: nil, limit: 100_000)
            #expect(r4.count == 3001)
        }
    }

    @Test("a history query past its time limit stops with an error naming the limit")
    func queryTimeLimit() throws {
        try withJournal { j, _ in
            let now = WallTime.now().nanoseconds
            for i in 0..<20_000 { j.append(Self.record(i, closedAt: now - Int64(20_000 - i) * 1_000_000)) }
            #expect(j.flush() == 20_000)
            var f = FlowFilter()
            f.local = IPPrefix("::/0")  // matches nothing, so the whole journal is scanned
            #expect {
                try j.history(f, since: nil, until: nil, timeLimit: .zero)
            } throws: { error in
                (error as? Journal.QueryTimedOut)?.description.contains("narrow it") == true
            }
            // The connection is left without the deadline: the next query on it runs to the end.
            let r5 = try j.history(f, since: nil, until: nil)
            #expect(r5.isEmpty)
            let r6 = try j.history(FlowFilter(), since: nil, until: nil, limit: 5)
            #expect(r6.count == 5)
        }
    }

    @Test("rows round-trip exactly")
    func roundTrip() throws {
        try withJournal { j, _ in
            let r = Self.record(7, closedAt: 1_795_000_000_123_456_789)
            j.append(r)
            j.flush()
            let rows = try j.history(FlowFilter(), since: nil, until: nil)
            #expect(rows == [r])
        }
    }

    @Test("retention by age and by size")
    func retention() throws {
        try withJournal(retentionDays: 1) { j, _ in
            let now = WallTime.now().nanoseconds
            j.append(Self.record(1, closedAt: now - 2 * 86_400_000_000_000))
            j.append(Self.record(2, closedAt: now - 1_000_000_000))
            j.flush()
            let removed = try j.enforceRetention()
            let count = try j.count()
            #expect(removed == 1 && count == 1)
        }
        try withJournal(maxBytes: 1 << 20) { j, _ in
            let now = WallTime.now().nanoseconds
            for i in 0..<20_000 { j.append(Self.record(i, closedAt: now - Int64(20_000 - i) * 1_000_000)) }
            j.flush()
            let before = try j.sizeBytes()
            #expect(before > 1 << 20)
            let removed = try j.enforceRetention()
            let after = try j.sizeBytes()
            #expect(removed > 0 && after <= 1 << 20)
            // The oldest went first.
            let left = try j.history(FlowFilter(), since: nil, until: nil, limit: 100_000)
            #expect(left.first!.flow > 0 && left.last!.flow == 19_999)
        }
    }

    @Test("time bounds parse as RFC 3339 or durations")
    func timeBounds() {
        let now = WallTime(nanoseconds: 1_000_000 * 1_000_000_000)
        #expect(parseTimeBound("90s", now: now)?.nanoseconds == now.nanoseconds - 90_000_000_000)
        #expect(parseTimeBound("2h", now: now)?.nanoseconds == now.nanoseconds - 7_200_000_000_000)
        #expect(parseTimeBound("2026-11-22T00:00:00Z") != nil)
        #expect(parseTimeBound("soon") == nil && parseTimeBound("5y") == nil && parseTimeBound("") == nil)
    }
}

