#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import FlowTagCore
import FlowTagKernel

/// The relay's listeners in one network namespace (IPv4 and, when the namespace has
/// IPv6, IPv6), and the source hints the connect hook uses there.
final class NetnsListeners {
    let ns: NetworkNamespace
    var v4: Int32 = -1
    var v6: Int32 = -1
    var port4: UInt16 = 0
    var port6: UInt16 = 0
    var hints: [SourceHint] = []

    init(ns: NetworkNamespace) { self.ns = ns }

    var sockets: [Int32] { [v4, v6].filter { $0 >= 0 } }

    func closeSockets() {
        for fd in sockets { close(fd) }
        v4 = -1
        v6 = -1
    }
}

extension StreamRelay {
    /// Listens in `ns` (on every address: connects are sent to the address their
    /// destination would have given them as source), then publishes the listener.
    func openListeners(in ns: NetworkNamespace) throws {
        guard listeners[ns.cookie] == nil else { return }
        guard listeners.count < RelayKernel.maxListeners else {
            throw KernelError.invalidArgument("the relay listens in \(RelayKernel.maxListeners) network namespaces already")
        }
        let l = NetnsListeners(ns: ns)
        do {
            try ns.run(from: home) {
                (l.v4, l.port4) = try listenSocket(family: AF_INET, port: 0)
                // IPv6 may be off in a namespace: then only IPv4 connects are relayed there.
                if let r = (try? listenSocket(family: AF_INET6, port: l.port4)) ?? (try? listenSocket(family: AF_INET6, port: 0)) {
                    (l.v6, l.port6) = r
                }
                l.hints = SourceHints.current()
            }
            let written = kernel.setHints(netns: ns.cookie, l.hints, replacing: [])
            if written < l.hints.count {
                // The hint map is full (shared by every namespace): connects here may show
                // 127.0.0.1 as their own address until entries free up.
                logger.warning("relay: source hints not all stored", metadata: ["netns": "\(ns.cookie)", "stored": "\(written)", "hints": "\(l.hints.count)"])
            }
            for fd in l.sockets { epoll.add(fd, for: .readable) }
            listeners[ns.cookie] = l
            for fd in l.sockets { listenerByFD[fd] = l }
            listenerCount.store(listeners.count, ordering: .relaxed)
            try kernel.setListener(netns: ns.cookie, port4: l.port4, port6: l.port6)
        } catch {
            dropListeners(l)
            throw error
        }
        logger.info("relay: listening", metadata: ["netns": "\(ns.cookie)", "port": "\(l.port4)", "source_hints": "\(l.hints.count)"])
    }

    /// A marked, non-blocking listening socket on the any-address of `family`.
    private func listenSocket(family: Int32, port: UInt16) throws -> (Int32, UInt16) {
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw KernelError.system("relay listener socket", errno) }
        do {
            // Marked before it listens: every connection it accepts inherits the mark.
            try kernel.mark(fd)
            var one: Int32 = 1
            if family == AF_INET6 { _ = setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, 4) }
            let any = SocketAddress(family: family, address: family == AF_INET ? .v4(0) : .v6(0, 0), port: port)
            guard any.withSockaddr({ bind(fd, $0, $1) }) == 0 else { throw KernelError.system("bind the relay listener", errno) }
            guard listen(fd, 4096) == 0 else { throw KernelError.system("listen on the relay listener", errno) }
            guard let bound = SocketAddress.local(fd) else { throw KernelError.system("relay listener address", errno) }
            return (fd, bound.port)
        } catch {
            close(fd)
            throw error
        }
    }

    private func dropListeners(_ l: NetnsListeners) {
        kernel.removeListener(netns: l.ns.cookie)
        kernel.setHints(netns: l.ns.cookie, [], replacing: l.hints)
        for fd in l.sockets {
            epoll.remove(fd)
            listenerByFD.removeValue(forKey: fd)
        }
        l.closeSockets()
        if listeners[l.ns.cookie] === l { listeners.removeValue(forKey: l.ns.cookie) }
        listenerCount.store(listeners.count, ordering: .relaxed)
    }

    func closeListeners() {
        for l in Array(listeners.values) { dropListeners(l) }
    }

    /// A selected connect found no listener in its netns: make one there (the next
    /// connects from that namespace are relayed).
    func listenerRequested(_ r: ft_relay_request) {
        guard drainDeadline == nil, listeners[r.netns_cookie] == nil else { return }
        do {
            // The connecting process may be gone already (a short-lived client): then any
            // process still in that namespace leads there.
            var ns = try? NetworkNamespace.of(pid: r.tgid, home: home)
            if ns?.cookie != r.netns_cookie {
                ns = try Self.processes(inNamespace: UInt64(r.ns_inum)).lazy
                    .compactMap { try? NetworkNamespace.of(pid: $0, home: self.home) }.first { $0.cookie == r.netns_cookie }
            }
            guard let ns else { throw KernelError.invalidArgument("no process is in that network namespace any more") }
            try openListeners(in: ns)
            if hasInboundRules {
                do { try openInbound(in: ns) } catch {
                    logger.warning("relay: no inbound relaying in a process's network namespace", metadata: ["netns": "\(ns.cookie)", "why": "\(error)"])
                }
            }
        } catch {
            logger.warning("relay: cannot listen in a process's network namespace; its connects go direct",
                           metadata: ["netns": "\(r.netns_cookie)", "pid": "\(r.tgid)", "why": "\(error)"])
        }
    }

    /// Every few seconds: source hints follow route and address changes; a namespace no
    /// process and no relayed flow is in any more is let go (the listener would keep it alive).
    func housekeeping() {
        guard drainDeadline == nil else { return }
        // One look at /proc serves both the inbound namespaces and the listeners.
        let live = listeners.count > 1 || hasInboundRules ? Self.processByNamespace() : [:]
        followInboundNamespaces(live)
        for l in Array(listeners.values) {
            if l.ns.cookie != home.cookie, live[l.ns.inode] == nil, !flowByCookie.values.contains(where: { $0.netns == l.ns.cookie }) {
                logger.info("relay: the network namespace is gone; its listener closes", metadata: ["netns": "\(l.ns.cookie)"])
                dropListeners(l)
                continue
            }
            guard let hints = try? l.ns.run(from: home, { SourceHints.current() }), hints != l.hints else { continue }
            kernel.setHints(netns: l.ns.cookie, hints, replacing: l.hints)
            l.hints = hints
        }
    }

    /// The inode of every process's network namespace, with one process in it.
    static func processByNamespace() -> [UInt64: UInt32] {
        var found: [UInt64: UInt32] = [:]
        eachProcessNamespace { pid, inode in if found[inode] == nil { found[inode] = pid } }
        return found
    }

    /// Processes whose network namespace has this inode.
    static func processes(inNamespace inode: UInt64) throws -> [UInt32] {
        var pids: [UInt32] = []
        eachProcessNamespace { pid, ino in if ino == inode { pids.append(pid) } }
        return pids
    }

    private static func eachProcessNamespace(_ body: (UInt32, UInt64) -> Void) {
        guard let dir = opendir("/proc") else { return }
        defer { closedir(dir) }
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            guard let pid = UInt32(name) else { continue }
            var st = stat()
            if stat("/proc/\(name)/ns/net", &st) == 0 { body(pid, UInt64(st.st_ino)) }
        }
    }
}
