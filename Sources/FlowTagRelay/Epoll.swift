import CLinuxCalls
import FlowTagKernel
#if canImport(Glibc)
import Glibc
#endif

/// An epoll instance with a wake-up eventfd: what the relay's thread waits on.
final class Epoll {
    /// Events epoll reports for a descriptor.
    struct Events: OptionSet, Sendable {
        let rawValue: UInt32
        static let readable = Events(rawValue: 0x001)  // EPOLLIN
        static let writable = Events(rawValue: 0x004)  // EPOLLOUT
        static let error = Events(rawValue: 0x008)     // EPOLLERR (always reported)
        static let hangUp = Events(rawValue: 0x010)    // EPOLLHUP (always reported)
    }

    private let fd: Int32
    /// Written by `wake()` from any thread; `wait` drains it and does not report it.
    private let wakeFD: Int32
    private var fds = [Int32](repeating: 0, count: 64)
    private var events = [UInt32](repeating: 0, count: 64)

    init() throws {
        fd = lc_epoll_create()
        wakeFD = lc_eventfd()
        guard fd >= 0, wakeFD >= 0 else {
            let err = fd < 0 ? -fd : -wakeFD
            if fd >= 0 { close(fd) }
            if wakeFD >= 0 { close(wakeFD) }
            throw KernelError.system("relay epoll", err)
        }
        add(wakeFD, for: .readable)
    }

    deinit {
        close(fd)
        close(wakeFD)
    }

    /// Watches `descriptor` for `events` (errors and hang-ups are always reported).
    func add(_ descriptor: Int32, for events: Events) { _ = lc_epoll_ctl(fd, LC_EPOLL_ADD, descriptor, events.rawValue) }
    func change(_ descriptor: Int32, to events: Events) { _ = lc_epoll_ctl(fd, LC_EPOLL_MOD, descriptor, events.rawValue) }
    func remove(_ descriptor: Int32) { _ = lc_epoll_ctl(fd, LC_EPOLL_DEL, descriptor, 0) }

    /// Makes a `wait` in progress (or the next) return. Any thread.
    func wake() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    /// Waits up to `milliseconds` (0: only looks) and calls `body` for each ready
    /// descriptor; returns how many there were (wake-ups included).
    @discardableResult
    func wait(milliseconds: Int32, _ body: (Int32, Events) -> Void) -> Int {
        let n = lc_epoll_wait(fd, &fds, &events, 64, milliseconds)
        guard n > 0 else { return 0 }
        for i in 0..<Int(n) {
            if fds[i] == wakeFD {
                var v: UInt64 = 0
                _ = read(wakeFD, &v, 8)
                continue
            }
            body(fds[i], Events(rawValue: events[i]))
        }
        return Int(n)
    }
}
