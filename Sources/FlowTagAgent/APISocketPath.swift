import FlowTagWire
import FlowTagKernel
#if canImport(Glibc)
import Glibc
#endif

/// Where the API socket goes: checked before anything is attached. A socket nobody answers
/// on is a crash's leftover and is replaced; anything else at the path is refused.
enum APISocketPath {
    /// sun_path holds 108 bytes with the terminating zero; the staging name adds a suffix.
    static let maxBytes = 90

    static func check(_ path: String) throws {
        guard path.hasPrefix("/") else { throw KernelError.invalidArgument("--socket \(path.clipped): must be an absolute path") }
        guard path.utf8.count <= maxBytes else { throw KernelError.invalidArgument("--socket \(path.clipped): longer than \(maxBytes) bytes") }
        var st = stat()
        guard lstat(path, &st) == 0 else {
            if errno == ENOENT { return }
            throw KernelError.system("check the API socket path \(path)", errno)
        }
        switch st.st_mode & S_IFMT {
        case S_IFSOCK:
            // Stale only when nothing listens (a busy agent may be slow to answer).
            if listens(path) { throw KernelError.system("another agent answers on \(path)", EADDRINUSE) }
        case S_IFDIR:
            throw KernelError.invalidArgument("--socket \(path) is a directory")
        default:
            throw KernelError.invalidArgument("--socket \(path) exists and is not a socket: refusing to replace it")
        }
    }

    /// Whether something accepts connections on the unix socket at `path` (a leftover of
    /// a crash refuses them).
    static func listens(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
            raw[bytes.count] = 0
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return rc == 0 || errno == EAGAIN // EAGAIN: a listener with a full backlog
    }

    /// The inode at `path`, if it is a socket.
    static func socketInode(_ path: String) -> ino_t? {
        var st = stat()
        guard lstat(path, &st) == 0, st.st_mode & S_IFMT == S_IFSOCK else { return nil }
        return st.st_ino
    }
}
