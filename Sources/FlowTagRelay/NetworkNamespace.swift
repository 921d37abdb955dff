#if canImport(Glibc)
import Glibc
#endif
import CLinuxCalls
import FlowTagKernel

/// A network namespace held open by an fd, and entering it on the calling thread
/// (setns(2) changes only that thread; sockets keep the namespace they were made in).
final class NetworkNamespace {
    let fd: Int32
    let cookie: UInt64
    /// st_ino of the namespace file: what /proc/PID/ns/net of its processes shows.
    let inode: UInt64

    static let soNetnsCookie: Int32 = 71 // SO_NETNS_COOKIE

    /// The calling thread's namespace.
    static func current() throws -> NetworkNamespace {
        try NetworkNamespace(path: "/proc/thread-self/ns/net", home: nil)
    }

    /// The namespace of process `pid`, entered from `home` to read its cookie.
    static func of(pid: UInt32, home: NetworkNamespace) throws -> NetworkNamespace {
        try NetworkNamespace(path: "/proc/\(pid)/ns/net", home: home)
    }

    private init(path: String, home: NetworkNamespace?) throws {
        let f = open(path, O_RDONLY | O_CLOEXEC)
        guard f >= 0 else { throw KernelError.system("open \(path)", errno) }
        var st = stat()
        guard fstat(f, &st) == 0 else { let e = errno; close(f); throw KernelError.system("stat \(path)", e) }
        fd = f
        inode = UInt64(st.st_ino)
        do {
            if let home {
                cookie = try Self.enter(f, returningTo: home.fd) { try Self.currentCookie() }
            } else {
                cookie = try Self.currentCookie()
            }
        } catch {
            close(f)
            throw error
        }
    }

    deinit { close(fd) }

    /// Runs `body` inside this namespace (from `home`, where the thread returns after).
    func run<T>(from home: NetworkNamespace, _ body: () throws -> T) throws -> T {
        if fd == home.fd || cookie == home.cookie { return try body() }
        return try Self.enter(fd, returningTo: home.fd, body)
    }

    private static func enter<T>(_ target: Int32, returningTo home: Int32, _ body: () throws -> T) throws -> T {
        let rc = lc_setns_net(target)
        guard rc == 0 else { throw KernelError.system("enter a network namespace (setns)", -rc) }
        defer {
            // The thread must not stay in another namespace: its next sockets would be made
            // there. Returning cannot fail while the agent holds `home` and the capability
            // it just used; if it did, stopping is safer than relaying in the wrong place.
            let back = lc_setns_net(home)
            if back != 0 { fatalError("cannot return to the agent's network namespace: \(String(cString: strerror(-back)))") }
        }
        return try body()
    }

    /// The cookie of the calling thread's namespace (a socket made here tells it).
    static func currentCookie() throws -> UInt64 {
        let s = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw KernelError.system("socket for the netns cookie", errno) }
        defer { close(s) }
        return try cookie(of: s)
    }

    static func cookie(of socket: Int32) throws -> UInt64 {
        var cookie: UInt64 = 0
        var len = socklen_t(8)
        guard getsockopt(socket, SOL_SOCKET, soNetnsCookie, &cookie, &len) == 0 else {
            throw KernelError.system("SO_NETNS_COOKIE", errno)
        }
        return cookie
    }
}
