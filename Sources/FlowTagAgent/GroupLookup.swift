#if canImport(Glibc)
import FlowTagWire
import Glibc
#endif

/// The API socket's group: a name looked up in the group database, or a numeric gid
/// taken as it is (a container's /etc/group may not know the host's group).
public enum GroupLookup {
    /// The gid, or nil for a default group that does not exist (the socket is then
    /// root's alone). A group the config named must exist: refused with the key.
    public static func socketGroup(_ config: AgentConfig) throws(ConfigError) -> gid_t? {
        let name = config.socketGroup
        if let gid = UInt32(name) { return gid }
        if let gid = gid(named: name) { return gid }
        if config.socketGroupExplicit {
            throw ConfigError(key: "socket_group", reason: "no group named '\(name)' (create it with: groupadd --system \(name), or give a gid)")
        }
        return nil
    }

    /// getgrnam_r with a buffer that grows as the entry needs (bounded at 1 MiB).
    public static func gid(named name: String) -> gid_t? {
        var size = 4096
        while size <= 1 << 20 {
            var group = group()
            var result: UnsafeMutablePointer<group>?
            var buffer = [CChar](repeating: 0, count: size)
            let rc = getgrnam_r(name, &group, &buffer, size, &result)
            if rc == ERANGE { size *= 4; continue }
            guard rc == 0, result != nil else { return nil }
            return group.gr_gid
        }
        return nil
    }
}
