import FlowTagWire
import FlowTagKernel
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Agents before the pin-directory lock held a lock file beside their API socket
/// (`<dir>/<pin path with _>.lock`). Pins without a build identity may belong to such an
/// agent still running: they are replaced only when no one holds that lock.
enum LegacyAgentLock {
    static func refuseIfHeld(pinDirectory: String, socket: String?) throws {
        let name = pinDirectory.split(separator: "/").joined(separator: "_") + ".lock"
        var dirs = ["/run/flowtag"]
        if let socket { dirs.append((socket as NSString).deletingLastPathComponent) }
        for dir in Set(dirs) {
            let path = dir + "/" + name
            let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
            guard fd >= 0 else { continue }
            defer { close(fd) }
            if flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK {
                throw KernelError.pin("an older flowtag agent still runs with pins at \(pinDirectory) (it holds \(path)): stop it first")
            }
            flock(fd, LOCK_UN)
        }
    }
}
