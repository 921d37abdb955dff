import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Claims on numbered resources (test ports, netns subnets) shared by every test process
/// on the host: a claim is an open-file-description lock on one byte of one file. Each
/// claim opens the file anew, so two claims conflict even in one process; the kernel drops
/// a claim when its process dies, so none go stale. The file itself stays: removing it
/// would let a new file's locks ignore the old one's.
struct HostClaims: Sendable {
    /// The file every test process uses.
    static let shared = HostClaims(path: "/run/lock/flowtag-tests.claims")
    let path: String

    /// Port claims use bytes 0–65535; other kinds start here.
    static let subnetBase = 65_536

    /// Claims `index` until the claim is released or dropped (or the process ends); nil
    /// when another claim holds it.
    func claim(_ index: Int) throws -> Claim? {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw TestFailure("open \(path): \(String(cString: strerror(errno)))") }
        var lock = flock()
        lock.l_type = Int16(F_WRLCK)
        lock.l_whence = Int16(SEEK_SET)
        lock.l_start = off_t(index)
        lock.l_len = 1
        if fcntl(fd, Self.fOFDSetLock, &lock) == 0 { return Claim(fd: fd) }
        let err = errno
        close(fd)
        guard err == EAGAIN || err == EACCES else {
            throw TestFailure("lock byte \(index) of \(path): \(String(cString: strerror(err)))")
        }
        return nil
    }

    /// F_OFD_SETLK: Glibc's module hides it (it needs _GNU_SOURCE); 37 on every Linux.
    static let fOFDSetLock: Int32 = 37

    /// One held claim: its own open file description (close-on-exec, so no child keeps it).
    final class Claim: Sendable {
        private let fd: Mutex<Int32>
        fileprivate init(fd: Int32) { self.fd = Mutex(fd) }
        deinit { release() }

        func release() {
            fd.withLock {
                if $0 >= 0 { close($0) }
                $0 = -1
            }
        }
    }
}
