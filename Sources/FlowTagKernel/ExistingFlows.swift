#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import CLinuxCalls
import FlowTagCore

/// TCP connections that were open before the programs were attached: they have no stamp
/// and get no sock_ops callbacks. They are found with sock_diag, their owners through
/// /proc/*/fd, and they are reported with attribution `seeded` (or `unknown` when no
/// process holds them, e.g. orphaned or in another process's namespace).
public enum ExistingFlows {
    /// Records for the connected TCP sockets of this network namespace whose owner lives
    /// in `cgroup` (a cgroup2 directory) or below, except `known` cookies and the agent's.
    public static func find(cgroup: String, known: Set<UInt64>, processes: ProcessTable) throws -> [(DiagSocket, FlowRecord)] {
        let all = try SockDiag.tcpSockets(states: DiagSocket.connectedStates | (1 << UInt32(DiagSocket.listen)))
        let listeners = all.filter { $0.state == DiagSocket.listen }
        let connected = all.filter { $0.state != DiagSocket.listen && !known.contains($0.cookie) }
        guard !connected.isEmpty else { return [] }
        let owners = socketOwners(Set(connected.map(\.inode)))
        let netns = SockDiag.ownNetnsCookie()
        let mount = Cgroup2.mountPoint() ?? ""
        let me = UInt32(getpid())
        var cgroupOf: [UInt32: (String, UInt64)?] = [:]
        var out: [(DiagSocket, FlowRecord)] = []
        for s in connected {
            let pid = owners[s.inode]
            if pid == me { continue }
            var cg: (String, UInt64)? = nil
            if let pid {
                if cgroupOf[pid] == nil { cgroupOf[pid] = processCgroup(pid, mount: mount) }
                cg = cgroupOf[pid] ?? nil
            }
            // Only flows of the attached cgroup's processes (an unowned socket cannot be placed).
            guard let (path, cgroupID) = cg, path == cgroup || path.hasPrefix(cgroup.hasSuffix("/") ? cgroup : cgroup + "/") else { continue }
            let entry = pid.flatMap { processes.kernelEntry($0) ?? ProcessTable.procEntry(pid: $0).map(ProcessEntry.init) }
            let inbound = listeners.contains { $0.local.port == s.local.port && ($0.local.address.isUnspecified || $0.local.address == s.local.address) }
            let wire: AddressFamily = s.remote.address.isIPv4 || s.remote.address.isV4Mapped ? .ipv4 : .ipv6
            let owner = ProcessOwner(pid: pid ?? 0, tid: pid ?? 0, exe: entry?.exe ?? "", comm: entry?.comm ?? "",
                                     uid: entry?.uid ?? s.uid, gid: entry?.gid ?? 0, cgroup: cgroupID)
            let now = BootClock.nowNanoseconds()
            var record = FlowRecord(flow: s.cookie, netns: netns, protocol: .tcp, family: wire,
                                    direction: inbound ? .inbound : .outbound,
                                    local: s.local.unmapped, remote: s.remote.unmapped, process: owner,
                                    attribution: pid == nil ? .unknown : .seeded,
                                    bytesSent: s.bytesAcked, bytesReceived: s.bytesReceived,
                                    openedAt: WallTime(bootNanoseconds: now))
            record.openedBootNanoseconds = now
            out.append((s, record))
        }
        return out
    }

    /// inode → pid of a process holding the socket (the first found).
    static func socketOwners(_ inodes: Set<UInt32>) -> [UInt32: UInt32] {
        var owners: [UInt32: UInt32] = [:]
        guard let proc = opendir("/proc") else { return owners }
        defer { closedir(proc) }
        while let e = readdir(proc), owners.count < inodes.count {
            let name = withUnsafePointer(to: e.pointee.d_name) { String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self)) }
            guard let pid = UInt32(name), let fds = opendir("/proc/\(pid)/fd") else { continue }
            while let f = readdir(fds) {
                let fd = withUnsafePointer(to: f.pointee.d_name) { String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self)) }
                guard fd.first != ".", let link = readLink("/proc/\(pid)/fd/\(fd)"), link.hasPrefix("socket:["),
                      let ino = UInt32(link.dropFirst(8).dropLast()), inodes.contains(ino), owners[ino] == nil else { continue }
                owners[ino] = pid
            }
            closedir(fds)
        }
        return owners
    }

    /// The process's cgroup2 directory (absolute) and its id.
    static func processCgroup(_ pid: UInt32, mount: String) -> (String, UInt64)? {
        guard let text = try? readFile("/proc/\(pid)/cgroup"),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("0::") }) else { return nil }
        let rel = String(line.dropFirst(3))
        let path = rel == "/" ? mount : mount + rel
        return (path, Cgroup2.id(of: path) ?? 0)
    }
}

extension IPAddress {
    /// ::ffff:a.b.c.d
    var isV4Mapped: Bool {
        if case .v6(let hi, let lo) = self { return hi == 0 && (lo >> 32) == 0xffff }
        return false
    }
}

extension Endpoint {
    /// A v4-mapped address as the IPv4 address it carries (how flows report them).
    var unmapped: Endpoint {
        guard address.isV4Mapped, case .v6(_, let lo) = address else { return self }
        return Endpoint(address: .v4(UInt32(truncatingIfNeeded: lo)), port: port)
    }
}
