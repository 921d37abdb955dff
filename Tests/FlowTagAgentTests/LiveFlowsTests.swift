import Testing
@testable import FlowTagAgent
@testable import FlowTagKernel

@Suite("Live flow store (compact rows, open-addressing index)")
struct LiveFlowsTests {
    static func record(_ n: Int, netns: UInt64 = 1, proto: FlowProtocol = .tcp, v6: Bool = false,
                       pid: UInt32 = 100, exe: String = "/usr/bin/curl-with-a-long-path", tid: UInt32 = 7) -> FlowRecord {
        let local: IPAddress = v6 ? .v6(0xfd00_0000_0000_0000, UInt64(n)) : .v4(0x7f00_0001)
        let remote: IPAddress = v6 ? .v6(0x2001_0db8_0000_0000, 1) : .v4(0x0a01_0203)
        return FlowRecord(flow: UInt64(n + 1), netns: netns, protocol: proto, family: v6 ? .ipv6 : .ipv4,
                          direction: n % 2 == 0 ? .outbound : .inbound,
                          local: Endpoint(address: local, port: UInt16(n % 60000 + 1)),
                          remote: Endpoint(address: remote, port: UInt16(n / 60000 + 443)),
                          process: ProcessOwner(pid: pid, tid: tid, exe: exe, comm: "curl", uid: 1000, gid: 100, cgroup: 42),
                          attribution: Attribution.allCases[n % 4], bytesSent: UInt64(n), bytesReceived: UInt64(2 * n),
                          openedAt: WallTime(nanoseconds: Int64(n) * 1000))
    }

    @Test("a record comes back exactly as it went in (v4, v6, every attribution, direction, protocol)")
    func roundTrip() {
        var live = LiveFlows()
        for n in 0..<8 {
            for r in [Self.record(n, proto: n % 3 == 0 ? .udp : .tcp, v6: n % 2 == 0, tid: UInt32(n))] {
                let added = live.upsert(r)
                #expect(added)
                #expect(live.find(netns: r.netns, proto: r.protocol, local: r.local, remote: r.remote) == r)
            }
        }
        #expect(live.count == 8)
    }

    @Test("the same 5-tuple in another netns or protocol is another flow; the same one replaces")
    func identity() {
        var live = LiveFlows()
        let a = Self.record(1)
        let added = [live.upsert(a), live.upsert(Self.record(1, netns: 2)), live.upsert(Self.record(1, proto: .udp))]
        #expect(added == [true, true, true])
        var replaced = a
        replaced.process.pid = 555
        let addedAgain = live.upsert(replaced)
        #expect(!addedAgain)
        #expect(live.count == 3)
        #expect(live.find(netns: 1, proto: .tcp, local: a.local, remote: a.remote)?.process.pid == 555)
        #expect(live.distinctOwners == 2)
        let removed = [live.remove(replaced), live.remove(replaced)]
        #expect(removed == [true, false])
        #expect(live.find(netns: 1, proto: .tcp, local: a.local, remote: a.remote) == nil)
        #expect(live.find(netns: 2, proto: .tcp, local: a.local, remote: a.remote) != nil)
    }

    @Test("owners are shared per process and released with their last flow")
    func owners() {
        var live = LiveFlows()
        for n in 0..<100 { live.upsert(Self.record(n, pid: UInt32(n % 3), tid: UInt32(n))) }
        #expect(live.distinctOwners == 3)
        // Thread ids stay per flow though the owner is shared.
        #expect(live.find(netns: 1, proto: .tcp, local: Self.record(5).local, remote: Self.record(5).remote)?.process.tid == 5)
        for n in 0..<100 where n % 3 == 0 { live.remove(Self.record(n)) }
        #expect(live.distinctOwners == 2)
    }

    @Test("random inserts and removes agree with a dictionary (index grows, deletes shift back)")
    func againstDictionary() {
        var live = LiveFlows()
        var reference: [UInt64: FlowRecord] = [:]
        var rng = SystemRandomNumberGenerator()
        for step in 0..<40_000 {
            let n = Int.random(in: 0..<5_000, using: &rng)
            let r = Self.record(n, v6: n % 5 == 0, pid: UInt32(n % 17))
            if Bool.random(using: &rng) || step < 3_000 {
                let added = live.upsert(r)
                #expect(added == (reference.updateValue(r, forKey: r.flow) == nil))
            } else {
                let removed = live.remove(r)
                #expect(removed == (reference.removeValue(forKey: r.flow) != nil))
            }
        }
        #expect(live.count == reference.count)
        for r in reference.values {
            #expect(live.find(netns: r.netns, proto: r.protocol, local: r.local, remote: r.remote) == r)
        }
        #expect(Set(live.records().map(\.flow)) == Set(reference.keys))
        for r in reference.values { live.remove(r) }
        #expect(live.count == 0 && live.records().isEmpty && live.distinctOwners == 0)
    }
}

extension LiveFlowsTests {
    @Test("churn then growth: 20k flows opened and closed, then 100k live, each found")
    func churnThenGrowth() {
        var live = LiveFlows()
        for n in 0..<20_000 { live.upsert(Self.record(n)) }
        for n in 0..<20_000 { live.remove(Self.record(n)) }
        #expect(live.count == 0)
        for n in 20_000..<120_000 { live.upsert(Self.record(n, pid: UInt32(n % 6))) }
        var missing = 0
        for n in 20_000..<120_000 {
            let r = Self.record(n, pid: UInt32(n % 6))
            if live.find(netns: r.netns, proto: r.protocol, local: r.local, remote: r.remote) != r { missing += 1 }
        }
        #expect(missing == 0)
    }
}

extension LiveFlowsTests {
    static func loopback(_ localPort: Int, _ remotePort: Int, cookie: Int, inbound: Bool) -> FlowRecord {
        FlowRecord(flow: UInt64(cookie), netns: 3, protocol: .tcp, family: .ipv4, direction: inbound ? .inbound : .outbound,
                   local: Endpoint(address: .v4(0x7f00_0001), port: UInt16(localPort)),
                   remote: Endpoint(address: .v4(0x7f00_0001), port: UInt16(remotePort)),
                   process: ProcessOwner(pid: 7, tid: 7, exe: "/usr/bin/python3.11", comm: "python3", uid: 0, gid: 0, cgroup: 1),
                   attribution: .kernel, openedAt: WallTime(nanoseconds: Int64(cookie)))
    }

    @Test("loopback pairs as a machine makes them: ports reused across listeners, churn, then 100k live")
    func loopbackPairs() {
        var live = LiveFlows()
        var reference: [String: FlowRecord] = [:] // by 5-tuple: a later flow with the same one replaces
        var rng = SystemRandomNumberGenerator()
        var cookie = 1
        func pair(listener: Int, used: inout Set<Int>) -> [FlowRecord] {
            var port: Int
            repeat { port = Int.random(in: 32768...60999, using: &rng) } while !used.insert(port).inserted
            defer { cookie += 2 }
            return [Self.loopback(port, listener, cookie: cookie, inbound: false), Self.loopback(listener, port, cookie: cookie + 1, inbound: true)]
        }
        // Churn: 20k pairs to one listener, each closed at once.
        var used: Set<Int> = []
        for _ in 0..<20_000 {
            if used.count > 28_000 { used.removeAll() }
            for r in pair(listener: 40000, used: &used) { live.upsert(r) }
        }
        for r in live.records() { live.remove(r) }
        #expect(live.count == 0)
        // Holders: 11 listeners, 4,500 pairs each, ports reused across listeners.
        for h in 0..<11 {
            var mine: Set<Int> = []
            let listener = Int.random(in: 32768...60999, using: &rng)
            for _ in 0..<4_500 {
                for r in pair(listener: listener, used: &mine) {
                    live.upsert(r)
                    reference["\(r.local)-\(r.remote)"] = r
                }
            }
            _ = h
        }
        #expect(live.count == reference.count)
        var missing = 0
        for r in reference.values where live.find(netns: r.netns, proto: r.protocol, local: r.local, remote: r.remote) != r { missing += 1 }
        #expect(missing == 0)
    }
}
