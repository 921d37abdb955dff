#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import CLinuxCalls
import FlowTagCore
import FlowTagKernel

/// Which TCP flows the kernel hands to the stream relay. Every condition set must hold;
/// a rule with none selects every TCP flow of the attached cgroup.
public struct StreamRule: Sendable, Hashable {
    public var exe: ExecutableIdentity?
    public var uid: UInt32?
    /// cgroup v2 id of the socket's owner (exact cgroup, not descendants).
    public var cgroupID: UInt64?
    public var localPort: UInt16?
    public var remotePort: UInt16?
    public var remote: IPPrefix?
    public var direction: FlowDirection?

    public init(exe: ExecutableIdentity? = nil, uid: UInt32? = nil, cgroupID: UInt64? = nil, localPort: UInt16? = nil,
                remotePort: UInt16? = nil, remote: IPPrefix? = nil, direction: FlowDirection? = nil) {
        self.exe = exe; self.uid = uid; self.cgroupID = cgroupID; self.localPort = localPort
        self.remotePort = remotePort; self.remote = remote; self.direction = direction
    }

    var raw: ft_stream_rule {
        var r = ft_stream_rule()
        var match: UInt32 = 0
        if let exe { match |= FT_MATCH_EXE.rawValue; r.exe_dev = exe.device; r.exe_ino = exe.inode }
        if let uid { match |= FT_MATCH_UID.rawValue; r.uid = uid }
        if let cgroupID { match |= FT_MATCH_CGROUP.rawValue; r.cgroup_id = cgroupID }
        if let localPort { match |= FT_MATCH_LOCAL_PORT.rawValue; r.local_port = localPort }
        if let remotePort { match |= FT_MATCH_REMOTE_PORT.rawValue; r.remote_port = remotePort }
        if let direction {
            match |= FT_MATCH_DIRECTION.rawValue
            r.direction = UInt8(direction == .outbound ? FT_DIR_OUTBOUND.rawValue : FT_DIR_INBOUND.rawValue)
        }
        if let remote {
            match |= FT_MATCH_REMOTE_ADDR.rawValue
            let bytes = remote.address.bytes
            withUnsafeMutableBytes(of: &r.remote) { buf in
                for (i, b) in bytes.enumerated() where i < 16 { buf[i] = b }
            }
            r.remote_prefix = UInt8(remote.length)
            r.remote_family = UInt8(remote.address.isIPv4 ? 2 : 10)
        }
        r.match = match == 0 ? FT_MATCH_ANY.rawValue : match
        return r
    }
}

/// The kernel half of the stream relay: selection rules, the slot table, the pool of
/// pre-made relay socket pairs, and the sockhash that ties them to selected flows.
public final class RelayKernel: @unchecked Sendable {
    public let programs: KernelPrograms
    private var listener: Int32 = -1
    private var listenPort: UInt16 = 0

    public static let maxRules = Int(FT_STREAM_RULES_MAX)
    /// Send buffer of a slot's kernel end and receive buffer of the agent's end.
    public static let hopBufferBytes: Int32 = 8 << 20

    public static let maxSlots = UInt32(FT_RELAY_SLOTS_MAX)

    public init(programs: KernelPrograms) { self.programs = programs }

    /// A live relayed TCP flow as the kernel holds it now (its open may not be reported
    /// yet: inbound flows are reported at accept, their bytes can come first).
    func liveRelayedFlow(cookie: UInt64, processes: ProcessTable) -> (slot: UInt32, record: FlowRecord)? {
        var key = cookie
        var entry = ft_tcp_entry()
        guard ftbpf_map_lookup(programs.mapFD(FTBPF_MAP_TCP_FLOWS), &key, &entry) == 0,
              entry.flow.flags & UInt8(FT_FLOW_RELAYED.rawValue) != 0,
              entry.flow.flags & UInt8(FT_FLOW_CLOSED.rawValue) == 0 else { return nil }
        return (entry.flow.relay_slot, FlowRecordBuilder.record(entry.flow, processes: processes))
    }

    deinit { if listener >= 0 { close(listener) } }

    /// Installs the selection rules (replacing any), count last so no flow sees half a set.
    public func setRules(_ rules: [StreamRule]) throws {
        guard rules.count <= Self.maxRules else {
            throw KernelError.invalidArgument("at most \(Self.maxRules) stream rules, not \(rules.count)")
        }
        let fd = programs.mapFD(FTBPF_MAP_STREAM_RULES)
        var zero: UInt32 = 0, count: UInt32 = 0
        try check("clear the stream rule count", ftbpf_map_update(programs.mapFD(FTBPF_MAP_STREAM_RULE_COUNT), &zero, &count, 0))
        for i in 0..<Self.maxRules {
            var key = UInt32(i)
            var value = i < rules.count ? rules[i].raw : ft_stream_rule()
            try check("write stream rule \(i)", ftbpf_map_update(fd, &key, &value, 0))
        }
        count = UInt32(rules.count)
        try check("write the stream rule count", ftbpf_map_update(programs.mapFD(FTBPF_MAP_STREAM_RULE_COUNT), &zero, &count, 0))
    }

    /// Forgets every slot a previous agent left (its relay sockets died with it): flows it
    /// relayed fall back to direct mode, and the pool starts empty.
    public func reset() throws {
        withdrawPool()
        let fd = programs.mapFD(FTBPF_MAP_RELAY_SLOTS)
        for s in 0..<Self.maxSlots {
            var key = s
            var entry = ft_relay_slot()
            if ftbpf_map_lookup(fd, &key, &entry) == 0, entry.mode != FT_RELAY_FREE.rawValue {
                entry.mode = FT_RELAY_DIRECT.rawValue
                _ = ftbpf_map_update(fd, &key, &entry, 0)
            }
        }
    }

    /// Makes the loopback listener the relay pairs come from.
    public func openListener() throws {
        guard listener < 0 else { return }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw KernelError.system("relay listener socket", errno) }
        do {
            try markRole(fd, FT_RELAY_AGENT, slot: 0)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
            try withUnsafePointer(to: &addr) { p in
                try p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    guard bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 else { throw KernelError.system("bind the relay listener", errno) }
                }
            }
            guard listen(fd, 128) == 0 else { throw KernelError.system("listen on the relay listener", errno) }
            var bound = sockaddr_in()
            var len = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &bound) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
            }
            listenPort = UInt16(bigEndian: bound.sin_port)
            listener = fd
        } catch {
            close(fd)
            throw error
        }
    }

    /// One slot: for each direction a loopback TCP connection whose kernel end is in the
    /// sockhash (the programs redirect to and from it) and whose agent end the agent reads
    /// and writes (the SEND one through ft_relay_writers). Not yet offered (`offer`).
    public func makeSlot(_ slot: UInt32) throws -> RelaySlotSockets {
        try openListener()
        var made: [Int32] = []
        do {
            let (sendKernel, sendAgent) = try connectedPair(role: FT_RELAY_SEND, slot: slot)
            made += [sendKernel, sendAgent]
            let (recvKernel, recvAgent) = try connectedPair(role: FT_RELAY_RECV, slot: slot)
            made += [recvKernel, recvAgent]
            var entry = ft_relay_slot()
            var key = slot
            try check("reset relay slot \(slot)", ftbpf_map_update(programs.mapFD(FTBPF_MAP_RELAY_SLOTS), &key, &entry, 0))
            var tuples: [ft_tuple] = []
            for (fd, role) in [(sendKernel, FT_RELAY_SEND), (recvKernel, FT_RELAY_RECV)] {
                var tuple = try Self.loopbackTuple(fd)
                var route = ft_relay_route()
                route.slot = slot
                route.role = role.rawValue
                try check("index a relay socket", ftbpf_map_update(programs.mapFD(FTBPF_MAP_RELAY_TUPLES), &tuple, &route, 0))
                tuples.append(tuple)
                try addToSockhash(fd, key: Self.sockhashKey(slot: slot, role: role))
            }
            // The agent's SEND end writes out of the app socket through sk_msg.
            try markRole(sendAgent, FT_RELAY_WRITER, slot: slot)
            var writerKey = UInt64(slot)
            var writerFD = UInt64(sendAgent)
            try check("add a relay writer", ftbpf_map_update(programs.mapFD(FTBPF_MAP_RELAY_WRITERS), &writerKey, &writerFD, 0))
            // The agent's RECV end writes into the app socket's receive queue through sk_msg
            // (synchronous: no kworker hop). That queue has no limit of its own; the relay
            // bounds it by reading the process's unread bytes (StreamRelay).
            try markRole(recvAgent, FT_RELAY_WRITER_IN, slot: slot)
            var inKey = UInt64(slot) | (1 << 32)
            var inFD = UInt64(recvAgent)
            try check("add a relay writer", ftbpf_map_update(programs.mapFD(FTBPF_MAP_RELAY_WRITERS), &inKey, &inFD, 0))
            return RelaySlotSockets(slot: slot, sendFD: sendAgent, receiveFD: recvAgent, kernelFDs: [sendKernel, recvKernel], tuples: tuples)
        } catch {
            made.forEach { close($0) }
            throw error
        }
    }

    /// Closes a slot's sockets (which takes them out of the sockhash) and its index entries.
    public func destroy(_ sockets: RelaySlotSockets) {
        for var t in sockets.tuples { _ = ftbpf_map_delete(programs.mapFD(FTBPF_MAP_RELAY_TUPLES), &t) }
        for fd in [sockets.sendFD, sockets.receiveFD] + sockets.kernelFDs { close(fd) }
    }

    /// A loopback connection: (kernel end, marked with its role before connecting so
    /// sockops never takes it for a flow; agent end).
    private func connectedPair(role: ft_relay_role, slot: UInt32) throws -> (Int32, Int32) {
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard client >= 0 else { throw KernelError.system("relay socket", errno) }
        do {
            try markRole(client, role, slot: slot)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
            addr.sin_port = listenPort.bigEndian
            try withUnsafePointer(to: &addr) { p in
                try p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    guard connect(client, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 else { throw KernelError.system("connect a relay pair", errno) }
                }
            }
            let accepted = accept(listener, nil, nil) // inherits the listener's AGENT mark
            guard accepted >= 0 else { throw KernelError.system("accept a relay pair", errno) }
            _ = fcntl(accepted, F_SETFD, FD_CLOEXEC)
            var one: Int32 = 1
            // Large buffers on the hop into the agent: a non-blocking process that fills
            // it gets EAGAIN, but poll() on its own socket cannot tell it when the hop has
            // room again (the kernel does not link the two), so it would spin; the room
            // makes that rare. Memory is charged only while bytes wait.
            var bytes = Self.hopBufferBytes
            let size = socklen_t(MemoryLayout<Int32>.size)
            if setsockopt(client, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, size) != 0 { _ = setsockopt(client, SOL_SOCKET, SO_SNDBUF, &bytes, size) }
            if setsockopt(accepted, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, size) != 0 { _ = setsockopt(accepted, SOL_SOCKET, SO_RCVBUF, &bytes, size) }
            for fd in [client, accepted] {
                _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            // Blocking: the agent passes MSG_DONTWAIT where it must not wait, and its
            // send-direction writer blocks on the app socket's room (see StreamRelay).
            return (client, accepted)
        } catch {
            close(client)
            throw error
        }
    }

    /// The tuple sk_skb sees on a loopback socket (addresses network order, ports host).
    static func loopbackTuple(_ fd: Int32) throws -> ft_tuple {
        var local = sockaddr_in(), remote = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let a = withUnsafeMutablePointer(to: &local) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let b = withUnsafeMutablePointer(to: &remote) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) } }
        guard a == 0, b == 0 else { throw KernelError.system("relay socket address", errno) }
        var t = ft_tuple()
        t.family = UInt8(AF_INET)
        t.protocol = UInt8(IPPROTO_TCP)
        t.local_port = UInt16(bigEndian: local.sin_port)
        t.remote_port = UInt16(bigEndian: remote.sin_port)
        withUnsafeMutableBytes(of: &t.local) { buf in
            withUnsafeBytes(of: local.sin_addr.s_addr) { for i in 0..<4 { buf[i] = $0[i] } }
        }
        withUnsafeMutableBytes(of: &t.remote) { buf in
            withUnsafeBytes(of: remote.sin_addr.s_addr) { for i in 0..<4 { buf[i] = $0[i] } }
        }
        return t
    }

    /// Takes every offered slot back: no flow can be selected into one any more.
    public func withdrawPool() {
        var slot: UInt32 = 0
        while ftbpf_queue_pop(programs.mapFD(FTBPF_MAP_RELAY_POOL), &slot) == 0 {}
    }

    /// Offers a made slot to the kernel: the next selected flow may take it.
    public func offer(_ slot: UInt32) throws {
        var s = slot
        try check("offer relay slot \(slot)", ftbpf_queue_push(programs.mapFD(FTBPF_MAP_RELAY_POOL), &s))
    }

    /// The slot table entry (which app socket holds it, and its mode).
    public func slotEntry(_ slot: UInt32) -> (appCookie: UInt64, active: Bool)? {
        var key = slot
        var entry = ft_relay_slot()
        guard ftbpf_map_lookup(programs.mapFD(FTBPF_MAP_RELAY_SLOTS), &key, &entry) == 0 else { return nil }
        return (entry.app_cookie, entry.mode == FT_RELAY_ACTIVE.rawValue)
    }

    public enum SlotMode { case free, active, direct }

    /// Frees a slot, or returns its flow to direct mode (the programs pass its bytes).
    public func setSlot(_ slot: UInt32, _ mode: SlotMode) {
        var key = slot
        var entry = ft_relay_slot()
        guard ftbpf_map_lookup(programs.mapFD(FTBPF_MAP_RELAY_SLOTS), &key, &entry) == 0 else { return }
        switch mode {
        case .free: entry.mode = FT_RELAY_FREE.rawValue; entry.app_cookie = 0
        case .active: entry.mode = FT_RELAY_ACTIVE.rawValue
        case .direct: entry.mode = FT_RELAY_DIRECT.rawValue
        }
        _ = ftbpf_map_update(programs.mapFD(FTBPF_MAP_RELAY_SLOTS), &key, &entry, 0)
    }

    public var assignedCount: UInt64 { programs.counter(FT_CNT_RELAY_ASSIGNED) }
    public var poolEmptyCount: UInt64 { programs.counter(FT_CNT_RELAY_POOL_EMPTY) }
    /// Relayed skbs whose head had already been received (a partial retransmission),
    /// cut by the sk_skb program before the kernel counted them.
    public var retransmitTrimCount: UInt64 { programs.counter(FT_CNT_RELAY_RETRANSMIT_TRIMS) }

    static func sockhashKey(slot: UInt32, role: ft_relay_role) -> UInt64 {
        (1 << 63) | (UInt64(slot) << 2) | UInt64(role.rawValue)
    }

    private func markRole(_ fd: Int32, _ role: ft_relay_role, slot: UInt32) throws {
        var route = ft_relay_route()
        route.slot = slot
        route.role = role.rawValue
        var key = fd
        try check("mark a relay socket", ftbpf_map_update(programs.mapFD(FTBPF_MAP_RELAY_ROUTES), &key, &route, 0))
    }

    private func addToSockhash(_ fd: Int32, key: UInt64) throws {
        var k = key
        var value = UInt64(fd)
        try check("add a relay socket to the sockhash", ftbpf_map_update(programs.mapFD(FTBPF_MAP_RELAY_SOCKS), &k, &value, 0))
    }

    private func check(_ what: String, _ rc: Int32) throws {
        if rc < 0 { throw KernelError.system(what, -rc) }
    }
}

/// The sockets of one relay slot.
public struct RelaySlotSockets: Sendable {
    public let slot: UInt32
    /// The agent's ends: read what the process sent / what arrived for it; write back.
    public let sendFD: Int32
    public let receiveFD: Int32
    /// The ends in the sockhash (kept open, never read or written by the agent; watched
    /// for errors: a hop whose send fails hard stops relaying, see StreamRelay.hopBroke).
    public let kernelFDs: [Int32]
    let tuples: [ft_tuple]
}

/// Acting on a process's own socket from the agent: pidfd_getfd(2) on the owner's fd
/// that carries the flow's cookie (needs CAP_SYS_PTRACE over the owner).
public enum AppSocket {
    /// shutdown(2) on the socket with this cookie held by `pid` (SHUT_WR: FIN to the
    /// peer, EPIPE to the process's next write; SHUT_RDWR also EOF to its reads).
    /// Returns false when no such socket was found.
    @discardableResult
    public static func shutdown(pid: UInt32, cookie: UInt64, how: Int32 = Int32(SHUT_RDWR)) -> Bool {
        guard let fd = find(pid: pid, cookie: cookie) else { return false }
        defer { close(fd) }
        return Glibc.shutdown(fd, how) == 0
    }

    /// Resets the flow's socket, whoever holds it: RST to the peer, an error to the
    /// process. First by the kernel's socket table (SOCK_DESTROY by exact 4-tuple and
    /// cookie, as `ss -K`: the process gets ECONNABORTED), else, for a socket in another
    /// network namespace, through the owner's fd (connect(AF_UNSPEC), which disconnects
    /// with a reset: ECONNRESET). Returns how it was done, nil when neither reached it.
    public static func reset(_ r: FlowRecord?, pid: UInt32, cookie: UInt64) -> String? {
        if let r, r.protocol == .tcp {
            let rc = lc_tcp_destroy(Int32(r.family == .ipv4 ? AF_INET : AF_INET6), r.local.address.bytes, r.local.port,
                                       r.remote.address.bytes, r.remote.port, cookie)
            if rc == 0 { return "socket destroyed" }
        }
        guard pid != 0, let fd = find(pid: pid, cookie: cookie) else { return nil }
        defer { close(fd) }
        var unspec = sockaddr()
        unspec.sa_family = sa_family_t(AF_UNSPEC)
        return connect(fd, &unspec, socklen_t(MemoryLayout<sockaddr>.size)) == 0 ? "disconnected through pid \(pid)" : nil
    }

    /// Whether the peer has finished sending (its FIN arrived) and how many payload
    /// bytes the socket received from it in all; nil when the socket is unreachable.
    public static func peerProgress(pid: UInt32, cookie: UInt64, hint: inout Int32?) -> (peerFinished: Bool, bytesReceived: UInt64)? {
        guard let fd = duplicate(pid: pid, cookie: cookie, hint: &hint) else { return nil }
        defer { close(fd) }
        var state: UInt8 = 0
        var received: UInt64 = 0
        guard lc_tcp_progress(fd, &state, &received) == 0 else { return nil }
        // TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING: the peer's FIN came.
        return ([6, 7, 8, 9, 11].contains(state), received)
    }

    /// Bytes the process has not read yet from its socket (FIONREAD, which on a relayed
    /// socket counts what was delivered into its receive queue) and the socket's receive
    /// buffer (SO_RCVBUF, which the kernel's autotuning grows), through the owner's fd
    /// number `hint` when it still names the socket, else found again. nil: unreachable.
    public static func unreadBytes(pid: UInt32, cookie: UInt64, hint: inout Int32?) -> (unread: Int, receiveBuffer: Int)? {
        guard let fd = duplicate(pid: pid, cookie: cookie, hint: &hint) else { return nil }
        defer { close(fd) }
        var n: Int32 = 0, buffer: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        guard ioctl(fd, UInt(FIONREAD), &n) == 0, getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buffer, &len) == 0 else { return nil }
        return (Int(n), Int(buffer))
    }

    /// The process's socket's inode, from the kernel's socket table (sock_diag, exact
    /// 4-tuple and cookie) whoever holds it: what every `/proc/PID/fd` link to it names
    /// (`socket:[N]`). nil when it is not in the agent's network namespace, or gone.
    /// (The table's unread count, `idiag_rqueue`, would not do for the unread bound: it
    /// leaves out what a sockmap redirect queued, which FIONREAD counts.)
    public static func inode(_ r: FlowRecord) -> UInt64? {
        guard r.protocol == .tcp else { return nil }
        let family = r.family == .ipv4 ? AF_INET : AF_INET6
        var inode: UInt32 = 0
        let rc = lc_tcp_inode(Int32(family), r.local.address.bytes, r.local.port, r.remote.address.bytes, r.remote.port,
                                 r.flow, &inode)
        return rc == 0 ? UInt64(inode) : nil
    }

    /// A process that holds the socket now, and its fd number there, found by the inode in
    /// every process's fd table: a socket passed to another process (SCM_RIGHTS, fork,
    /// pidfd_getfd) keeps the stamp of the process that connected, which may be gone.
    /// Costs a readlink per open fd on the machine: call it rarely.
    public static func holder(inode: UInt64, cookie: UInt64) -> (pid: UInt32, fd: Int32)? {
        guard let proc = opendir("/proc") else { return nil }
        defer { closedir(proc) }
        let link = "socket:[\(inode)]"
        while let entry = readdir(proc) {
            guard let pid = UInt32(direntName(entry)), pid != UInt32(getpid()) else { continue }
            var found: Int32?
            walkSockets(of: pid, linkedTo: { $0 == link }) { target, fd in
                guard fd >= 0, cookieOf(fd) == cookie else { return false }
                close(fd)
                found = target
                return true
            }
            if let found { return (pid, found) }
        }
        return nil
    }

    /// Walks the fds of `pid` whose link passes `linkedTo` (sockets unless told), each
    /// duplicated with pidfd_getfd: `visit` gets the fd number and the duplicate (or
    /// -errno) and returns true to stop, keeping the duplicate (it is closed otherwise).
    /// nil when /proc/PID/fd cannot be read (errno says why).
    @discardableResult
    static func walkSockets(of pid: UInt32, linkedTo wanted: (String) -> Bool = { $0.hasPrefix("socket:") },
                                    _ visit: (_ target: Int32, _ duplicate: Int32) -> Bool) -> Bool? {
        guard let dir = opendir("/proc/\(pid)/fd") else { return nil }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = direntName(entry)
            guard let target = Int32(name), let link = readLink("/proc/\(pid)/fd/\(name)"), wanted(link) else { continue }
            let fd = lc_pidfd_getfd(Int32(bitPattern: pid), target)
            if visit(target, fd) { return true }
            if fd >= 0 { close(fd) }
        }
        return false
    }

    private static func direntName(_ entry: UnsafeMutablePointer<dirent>) -> String {
        withUnsafePointer(to: entry.pointee.d_name) { String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self)) }
    }

    /// A duplicate of the owner's fd for this socket, through fd number `hint` when it
    /// still names the socket, else found again (and `hint` updated). Close it after use.
    static func duplicate(pid: UInt32, cookie: UInt64, hint: inout Int32?) -> Int32? {
        if let h = hint {
            let d = lc_pidfd_getfd(Int32(bitPattern: pid), h)
            if d >= 0, cookieOf(d) == cookie { return d }
            if d >= 0 { close(d) }
        }
        guard let (d, target) = findWithNumber(pid: pid, cookie: cookie) else { hint = nil; return nil }
        hint = target
        return d
    }

    /// Whether `pid` is a running process: not gone, and not a zombie (which keeps its
    /// /proc entry, with no fds, until its parent reaps it).
    public static func isRunning(pid: UInt32) -> Bool {
        guard let stat = try? readFile("/proc/\(pid)/stat"),
              let close = stat.lastIndex(of: ")") else { return false }
        // "pid (comm) S ...": the state follows the command name, which may hold spaces.
        return stat[stat.index(after: close)...].dropFirst().first.map { $0 != "Z" && $0 != "X" } ?? false
    }

    static func cookieOf(_ fd: Int32) -> UInt64? {
        var value: UInt64 = 0
        var len = socklen_t(MemoryLayout<UInt64>.size)
        return getsockopt(fd, SOL_SOCKET, SO_COOKIE, &value, &len) == 0 ? value : nil
    }

    /// A duplicate of the owner's fd for the socket with this cookie (close it after use).
    public static func find(pid: UInt32, cookie: UInt64) -> Int32? {
        findWithNumber(pid: pid, cookie: cookie)?.0
    }

    /// Why the socket with this cookie cannot be reached through `pid`, step by step (for
    /// the log line that says a flow's delivery is paced: a live owner has been seen
    /// unreachable under load, cause unknown).
    public static func whyUnreachable(pid: UInt32, cookie: UInt64) -> String {
        var sockets = 0, errors: [Int32: Int] = [:], cookies: [UInt64] = []
        let walked = walkSockets(of: pid) { _, fd in
            sockets += 1
            if fd < 0 { errors[-fd, default: 0] += 1 } else if let c = cookieOf(fd), cookies.count < 8 { cookies.append(c) }
            return false
        }
        guard walked != nil else { return "/proc/\(pid)/fd: \(String(cString: strerror(errno)))" }
        let failed = errors.map { "\($0.value)× \(String(cString: strerror($0.key)))" }.joined(separator: ", ")
        return "\(sockets) sockets in /proc/\(pid)/fd, pidfd_getfd failed: [\(failed)], cookies seen \(cookies) (looking for \(cookie))"
    }

    static func findWithNumber(pid: UInt32, cookie: UInt64) -> (Int32, Int32)? {
        var found: (Int32, Int32)?
        walkSockets(of: pid) { target, fd in
            guard fd >= 0, cookieOf(fd) == cookie else { return false }
            found = (fd, target)
            return true
        }
        return found
    }
}
