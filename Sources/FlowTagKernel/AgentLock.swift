#if canImport(Glibc)
import Glibc
#endif

/// One agent per pin directory: an exclusive flock on a lock file beside it, held for the
/// agent's life and released by the kernel when the agent dies (even by kill -9). A new
/// agent that gets the lock while pins exist knows their owner is gone and adopts them.
public final class AgentLock: @unchecked Sendable {
    private let fd: Int32
    public let path: String

    public init(pinDirectory: String, lockDirectory: String = "/run/flowtag") throws {
        mkdir(lockDirectory, 0o755)
        let name = pinDirectory.split(separator: "/").joined(separator: "_")
        path = lockDirectory + "/" + name + ".lock"
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw KernelError.system("open \(path)", errno) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let err = errno
            close(fd)
            if err == EWOULDBLOCK {
                throw KernelError.pin("another flowtag agent is running with pins at \(pinDirectory) (lock \(path))")
            }
            throw KernelError.system("lock \(path)", err)
        }
    }

    deinit {
        flock(fd, LOCK_UN)
        close(fd)
    }
}
