#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import CLinuxCalls
import FlowTagCore

/// A TCP socket as sock_diag reports it.
public struct DiagSocket: Sendable, Hashable {
    public var cookie: UInt64
    public var state: UInt8
    public var local: Endpoint
    public var remote: Endpoint
    public var uid: UInt32
    public var inode: UInt32
    public var bytesAcked: UInt64
    public var bytesReceived: UInt64

    public static let listen: UInt8 = 10
    /// States of a connection that carries (or carried) data: ESTABLISHED to CLOSING.
    public static let connectedStates: UInt32 = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11)
}

/// The kernel's socket table (NETLINK_SOCK_DIAG) for the agent's network namespace.
public enum SockDiag {
    /// TCP sockets of both families in the given states (bit per TCP state).
    public static func tcpSockets(states: UInt32) throws -> [DiagSocket] {
        final class Box { var out: [DiagSocket] = [] }
        let box = Box()
        for family in [AF_INET, AF_INET6] {
            let rc = withExtendedLifetime(box) {
                lc_tcp_dump(family, states, { ctx, raw in
                    guard let ctx, let raw else { return 0 }
                    let box = Unmanaged<Box>.fromOpaque(ctx).takeUnretainedValue()
                    var s = raw.pointee
                    let family = Int32(s.family)
                    let local = withUnsafeBytes(of: &s.local) { IPAddress(raw: $0, family: family) }
                    let remote = withUnsafeBytes(of: &s.remote) { IPAddress(raw: $0, family: family) }
                    box.out.append(DiagSocket(cookie: s.cookie, state: s.state,
                                              local: Endpoint(address: local, port: s.local_port),
                                              remote: Endpoint(address: remote, port: s.remote_port),
                                              uid: s.uid, inode: s.inode, bytesAcked: s.bytes_acked, bytesReceived: s.bytes_received))
                    return 0
                }, Unmanaged.passUnretained(box).toOpaque())
            }
            if rc < 0 { throw KernelError.system("sock_diag dump", -rc) }
        }
        return box.out
    }

    /// The network-namespace cookie of the agent's namespace (SO_NETNS_COOKIE).
    public static func ownNetnsCookie() -> UInt64 {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        var cookie: UInt64 = 0
        var len = socklen_t(MemoryLayout<UInt64>.size)
        return getsockopt(fd, SOL_SOCKET, 71 /* SO_NETNS_COOKIE */, &cookie, &len) == 0 ? cookie : 0
    }
}
