import CFlowTagBPF
import FlowTagCore
import FlowTagKernel

/// Which TCP connects the relay's connect hook redirects to the agent. Every condition
/// set must hold; a rule with none selects every TCP connect of the attached cgroup.
public struct StreamRule: Sendable, Hashable {
    public var exe: ExecutableIdentity?
    public var uid: UInt32?
    /// cgroup v2 id of the socket's owner (exact cgroup, not descendants).
    public var cgroupID: UInt64?
    public var localPort: UInt16?
    public var remotePort: UInt16?
    public var remote: IPPrefix?
    public var direction: FlowDirection?

    public init(exe: ExecutableIdentity? = nil, uid: UInt32? = nil, cgroupID: UInt64? = nil, localPort: UInt16? = nil,
                remotePort: UInt16? = nil, remote: IPPrefix? = nil, direction: FlowDirection? = nil) {
        self.exe = exe; self.uid = uid; self.cgroupID = cgroupID; self.localPort = localPort
        self.remotePort = remotePort; self.remote = remote; self.direction = direction
    }

    var raw: ft_stream_rule {
        var r = ft_stream_rule()
        var match: UInt32 = 0
        if let exe { match |= FT_MATCH_EXE.rawValue; r.exe_dev = exe.device; r.exe_ino = exe.inode }
        if let uid { match |= FT_MATCH_UID.rawValue; r.uid = uid }
        if let cgroupID { match |= FT_MATCH_CGROUP.rawValue; r.cgroup_id = cgroupID }
        if let localPort { match |= FT_MATCH_LOCAL_PORT.rawValue; r.local_port = localPort }
        if let remotePort { match |= FT_MATCH_REMOTE_PORT.rawValue; r.remote_port = remotePort }
        if let direction {
            match |= FT_MATCH_DIRECTION.rawValue
            r.direction = UInt8(direction == .outbound ? FT_DIR_OUTBOUND.rawValue : FT_DIR_INBOUND.rawValue)
        }
        if let remote {
            match |= FT_MATCH_REMOTE_ADDR.rawValue
            let bytes = remote.address.bytes
            withUnsafeMutableBytes(of: &r.remote) { buf in
                for (i, b) in bytes.enumerated() where i < 16 { buf[i] = b }
            }
            r.remote_prefix = UInt8(remote.length)
            r.remote_family = UInt8(remote.address.isIPv4 ? 2 : 10)
        }
        r.match = match == 0 ? FT_MATCH_ANY.rawValue : match
        return r
    }
}
