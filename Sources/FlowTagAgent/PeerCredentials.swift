import FlowTagKernel
#if canImport(Glibc)
import Glibc
#endif

/// Who is asking: from SO_PEERCRED on the connection.
public struct PeerCredentials: Sendable, Equatable {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32

    /// root and members of `group` see every flow; others only their own.
    public func seesEverything(group: gid_t?) -> Bool {
        if uid == 0 { return true }
        guard let group else { return false }
        if gid == group { return true }
        // Supplementary groups of the peer process.
        guard let status = try? readFile("/proc/\(pid)/status") else { return false }
        for line in status.split(separator: "\n") where line.hasPrefix("Groups:") {
            return line.dropFirst(7).split(whereSeparator: { $0 == " " || $0 == "\t" }).contains { gid_t($0) == group }
        }
        return false
    }
}
