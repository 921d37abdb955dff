#if canImport(Glibc)
import Glibc
#endif

/// One agent per pin directory: an exclusive flock on the pin directory itself, held for
/// the agent's life and released by the kernel when the agent dies (even by kill -9).
/// An agent holding it while pins exist knows their owner is gone and may adopt them.
/// The directory is opened without following a symlink, and a directory replaced while
/// we waited (a stopping agent removes it) is locked anew, so the lock always guards the
/// directory the path names.
public final class PinDirectoryLock: @unchecked Sendable {
    private var fd: Int32
    public let path: String

    public init(_ path: String) throws {
        self.path = path
        try BPFFS.check(pinDirectory: path)
        for _ in 0..<100 {
            if mkdir(path, 0o700) != 0 && errno != EEXIST { throw KernelError.system("create the pin directory \(path)", errno) }
            let fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            guard fd >= 0 else {
                let err = errno
                if err == ENOENT { continue } // removed between mkdir and open: try again
                if err == ELOOP || err == ENOTDIR { throw KernelError.pin("\(path) is a symlink or not a directory: refusing to use it as the pin directory") }
                throw KernelError.system("open the pin directory \(path)", err)
            }
            guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
                let err = errno
                close(fd)
                if err == EWOULDBLOCK { throw KernelError.pin("another flowtag agent is running with pins at \(path)") }
                throw KernelError.system("lock \(path)", err)
            }
            // Still the directory the path names? (The previous holder may have removed it.)
            var held = stat(), named = stat()
            if fstat(fd, &held) == 0, lstat(path, &named) == 0, held.st_dev == named.st_dev, held.st_ino == named.st_ino {
                self.fd = fd
                return
            }
            close(fd)
        }
        throw KernelError.pin("\(path) keeps being replaced: cannot lock it")
    }

    /// Removes the (emptied) directory while still holding it, then lets go. Called on a
    /// clean stop, after the pins are gone.
    public func releaseRemovingDirectory() {
        guard fd >= 0 else { return }
        if holdsPath { rmdir(path) } // never a directory another agent made and locked since
        release()
    }

    /// Whether the path still names the directory this lock holds.
    public var holdsPath: Bool {
        var held = stat(), named = stat()
        return fd >= 0 && fstat(fd, &held) == 0 && lstat(path, &named) == 0 && held.st_dev == named.st_dev && held.st_ino == named.st_ino
    }

    /// Lets go of the lock and leaves the directory.
    public func release() {
        guard fd >= 0 else { return }
        flock(fd, LOCK_UN)
        close(fd)
        fd = -1
    }

    deinit { release() }
}
