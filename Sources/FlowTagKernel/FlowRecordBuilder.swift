#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import FlowTagCore

/// Converts kernel flows into records (shared by the monitor and resynchronisation).
public enum FlowRecordBuilder {
    /// The kernel form of a record made in user space (a flow older than the agent), for
    /// the outbox: the owner is found again by pid in the process table.
    static func kernelFlow(_ r: FlowRecord) -> ft_flow {
        var f = ft_flow()
        f.cookie = r.flow
        f.netns_cookie = r.netns
        f.opened_ns = r.openedBootNanoseconds != 0 ? r.openedBootNanoseconds
            : UInt64(bitPattern: r.openedAt.nanoseconds &- BootClock.realtimeOffset)
        f.direction = UInt8(r.direction == .inbound ? FT_DIR_INBOUND.rawValue : FT_DIR_OUTBOUND.rawValue)
        let v4 = r.local.address.isIPv4 && r.remote.address.isIPv4
        f.tuple.family = UInt8(v4 ? AF_INET : AF_INET6)
        f.tuple.protocol = r.protocol == .udp ? 17 : 6
        f.tuple.local_port = r.local.port
        f.tuple.remote_port = r.remote.port
        withUnsafeMutableBytes(of: &f.tuple.local) { raw in for (i, b) in r.local.address.bytes(v4: v4).enumerated() { raw[i] = b } }
        withUnsafeMutableBytes(of: &f.tuple.remote) { raw in for (i, b) in r.remote.address.bytes(v4: v4).enumerated() { raw[i] = b } }
        f.owner.tgid = r.process.pid
        f.owner.tid = r.process.tid
        f.owner.uid = r.process.uid
        f.owner.gid = r.process.gid
        f.owner.cgroup_id = r.process.cgroup
        f.owner.attribution = UInt8(r.attribution == .unknown ? FT_ATTR_UNKNOWN.rawValue : FT_ATTR_KERNEL.rawValue)
        setCString(&f.owner.comm, r.process.comm)
        return f
    }

    public static func record(_ f: ft_flow, processes: ProcessTable) -> FlowRecord {
        var f = f
        let t = f.tuple
        let family = Int32(t.family)
        let local = withUnsafeBytes(of: t.local) { IPAddress(raw: $0, family: family) }
        let remote = withUnsafeBytes(of: t.remote) { IPAddress(raw: $0, family: family) }
        let wireFamily: AddressFamily = (remote.isIPv4 || (local.isIPv4 && remote.isUnspecified)) ? .ipv4 : .ipv6
        let owner = f.owner
        let entry = processes.resolve(tgid: owner.tgid, startNanoseconds: owner.proc_start_ns)
        let attribution: Attribution
        switch owner.attribution {
        case UInt8(FT_ATTR_KERNEL.rawValue): attribution = entry?.seeded == true ? .seeded : .kernel
        case UInt8(FT_ATTR_INHERITED.rawValue): attribution = .inherited
        default: attribution = .unknown
        }
        let process = ProcessOwner(pid: owner.tgid, tid: owner.tid, exe: entry?.exe ?? "",
                                   comm: cString(&f.owner.comm), uid: owner.uid, gid: owner.gid,
                                   cgroup: owner.cgroup_id)
        var record = FlowRecord(
            flow: f.cookie, netns: f.netns_cookie,
            protocol: t.protocol == 17 ? .udp : .tcp, family: wireFamily,
            direction: f.direction == UInt8(FT_DIR_INBOUND.rawValue) ? .inbound : .outbound,
            local: Endpoint(address: local, port: t.local_port),
            remote: Endpoint(address: remote, port: t.remote_port),
            process: process, attribution: attribution,
            openedAt: WallTime(bootNanoseconds: f.opened_ns))
        record.openedBootNanoseconds = f.opened_ns
        return record
    }
}

extension IPAddress {
    /// The 16 ABI bytes for a socket of family AF_INET (`v4`) or AF_INET6 (an IPv4
    /// address then as `::ffff:a.b.c.d`).
    func bytes(v4: Bool) -> [UInt8] {
        guard !v4, case .v4(let a) = self else { return bytes }
        return Array(repeating: 0, count: 10) + [0xff, 0xff, UInt8(a >> 24), UInt8(a >> 16 & 0xff), UInt8(a >> 8 & 0xff), UInt8(a & 0xff)]
    }
}
