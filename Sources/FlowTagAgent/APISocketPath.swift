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
            if (try? APIClient(socketPath: path).get("/v1/version", timeoutSeconds: 2)) != nil {
                throw KernelError.system("another agent answers on \(path)", EADDRINUSE)
            }
        case S_IFDIR:
            throw KernelError.invalidArgument("--socket \(path) is a directory")
        default:
            throw KernelError.invalidArgument("--socket \(path) exists and is not a socket: refusing to replace it")
        }
    }
}
