#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import FlowTagCore
import FlowTagKernel
import Synchronization

/// The kernel half of the stream relay: the connect-redirect object (loaded at every
/// start, attached with links only this agent holds), its rules, listeners and source
/// hints, and the hand-over entries the flowtag object's sockops publishes.
public final class RelayKernel: @unchecked Sendable {
    public let programs: KernelPrograms
    private var handle: OpaquePointer?
    private let closed = Atomic<Bool>(false)

    public static let maxRules = Int(FT_STREAM_RULES_MAX)
    public static let maxListeners = Int(FT_RELAY_LISTENERS_MAX)

    /// Loads the relay object (with the fast path's verdict when asked) and attaches it to
    /// `cgroup`; on failure nothing stays attached.
    public init(programs: KernelPrograms, cgroup: String, fastPath: Bool = false) throws {
        self.programs = programs
        var err = [CChar](repeating: 0, count: 1024)
        var h: OpaquePointer?
        let rc = ftrelay_open_load(programs.mapFD(FTBPF_MAP_PROCS), programs.mapFD(FTBPF_MAP_RELAY_ORIGS),
                                   programs.mapFD(FTBPF_MAP_RELAY_MARKS), programs.mapFD(FTBPF_MAP_RELAY_INBOUND),
                                   fastPath ? 1 : 0, &h, &err, err.count)
        guard rc == 0, let h else { throw KernelError.load(Self.text(err)) }
        handle = h
        let cg = Glibc.open(cgroup, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard cg >= 0 else {
            let e = errno
            ftrelay_destroy(h)
            handle = nil
            throw KernelError.system("open cgroup \(cgroup) for the relay", e)
        }
        defer { Glibc.close(cg) }
        let arc = ftrelay_attach(h, cg, &err, err.count)
        guard arc == 0 else {
            ftrelay_destroy(h)
            handle = nil
            throw KernelError.attach(Self.text(err))
        }
    }

    deinit { close() }

    /// Detaches the connect hooks (new connects go direct) and frees the object.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing), let h = handle else { return }
        ftrelay_destroy(h)
        handle = nil
    }

    private static func text(_ buf: [CChar]) -> String {
        String(decoding: buf.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    func fd(_ map: ftrelay_map) -> Int32 { handle.map { ftrelay_map_fd($0, map) } ?? -1 }

    private func check(_ what: String, _ rc: Int32) throws {
        guard rc == 0 else { throw KernelError.system(what, -rc) }
    }

    /// Installs the selection rules (replacing any), count last so no connect sees half a set.
    public func setRules(_ rules: [StreamRule]) throws {
        guard rules.count <= Self.maxRules else {
            throw KernelError.invalidArgument("at most \(Self.maxRules) stream rules, not \(rules.count)")
        }
        var zero: UInt32 = 0, count: UInt32 = 0
        try check("clear the stream rule count", ftbpf_map_update(fd(FTRELAY_MAP_STREAM_RULE_COUNT), &zero, &count, 0))
        for i in 0..<Self.maxRules {
            var key = UInt32(i)
            var value = i < rules.count ? rules[i].raw : ft_stream_rule()
            try check("write stream rule \(i)", ftbpf_map_update(fd(FTRELAY_MAP_STREAM_RULES), &key, &value, 0))
        }
        count = UInt32(rules.count)
        try check("write the stream rule count", ftbpf_map_update(fd(FTRELAY_MAP_STREAM_RULE_COUNT), &zero, &count, 0))
    }

    /// Where the connect hook sends a netns's selected connects (ports 0: that family is not relayed).
    func setListener(netns: UInt64, port4: UInt16, port6: UInt16) throws {
        var key = netns
        var v = ft_relay_listener()
        v.ip4 = UInt32(0x7f00_0001).bigEndian
        withUnsafeMutableBytes(of: &v.ip6) { $0[15] = 1 }  // ::1
        v.port4 = port4
        v.port6 = port6
        try check("publish the relay listener", ftbpf_map_update(fd(FTRELAY_MAP_LISTENERS), &key, &v, 0))
    }

    func removeListener(netns: UInt64) {
        var key = netns
        _ = ftbpf_map_delete(fd(FTRELAY_MAP_LISTENERS), &key)
    }

    /// Replaces a netns's source hints; returns how many were written.
    @discardableResult
    func setHints(netns: UInt64, _ hints: [SourceHint], replacing old: [SourceHint]) -> Int {
        let fd = fd(FTRELAY_MAP_HINTS)
        let keep = Set(hints.map(\.prefix))
        for h in old where !keep.contains(h.prefix) {
            var key = Self.hintKey(netns: netns, h.prefix)
            _ = ftbpf_map_delete(fd, &key)
        }
        var written = 0
        for h in hints {
            var key = Self.hintKey(netns: netns, h.prefix)
            var value = ft_relay_hint()
            let bytes = h.source.bytes
            withUnsafeMutableBytes(of: &value.source) { for i in 0..<16 { $0[i] = bytes[i] } }
            if ftbpf_map_update(fd, &key, &value, 0) == 0 { written += 1 }
        }
        return written
    }

    static func hintKey(netns: UInt64, _ prefix: IPPrefix) -> ft_relay_hint_key {
        var key = ft_relay_hint_key()
        key.prefixlen = UInt32(32 + 64 + prefix.length)
        key.family = UInt32(prefix.address.isIPv4 ? AF_INET : AF_INET6)
        key.netns_cookie = netns
        let bytes = prefix.address.bytes
        withUnsafeMutableBytes(of: &key.addr) { for i in 0..<16 { $0[i] = bytes[i] } }
        return key
    }

    /// Marks one of the agent's sockets: never redirected, never a flow (a listener's mark
    /// is cloned to every connection it accepts).
    func mark(_ socket: Int32) throws {
        var key = socket
        var value = ft_relay_mark(agent: 1, pad: 0)
        try check("mark a relay socket", ftbpf_map_update(programs.mapFD(FTBPF_MAP_RELAY_MARKS), &key, &value, 0))
    }

    /// The hand-over entry of an accepted connection, removed as it is taken.
    func takePending(_ key: ft_relay_pending_key) -> ft_relay_orig? {
        var k = key
        var value = ft_relay_orig()
        let fd = programs.mapFD(FTBPF_MAP_RELAY_PENDING)
        guard ftbpf_map_lookup(fd, &k, &value) == 0 else { return nil }
        _ = ftbpf_map_delete(fd, &k)
        return value
    }

    /// Every fast-path socket's counters, by cookie (one system call per few thousand).
    func spliceStats() -> [UInt64: ft_relay_splice_stat] {
        Dictionary(MapIterator<UInt64, ft_relay_splice_stat>(fd: fd(FTRELAY_MAP_SPLICE_STAT)).all(), uniquingKeysWith: { a, _ in a })
    }

    /// Attaches the sockmap fast path's verdict (stream.fast_path: sockmap).
    func attachFastPath() throws {
        guard let h = handle else { throw KernelError.invalidArgument("the relay object is closed") }
        var err = [CChar](repeating: 0, count: 1024)
        guard ftrelay_attach_splice(h, &err, err.count) == 0 else { throw KernelError.attach(Self.text(err)) }
    }

    // MARK: Inbound

    /// Puts the inbound listeners (IPv4, and IPv6 when there is one) where the sk_lookup
    /// program finds them, and attaches it to `netns` (detached with the object).
    func enableInbound(v4: Int32, v6: Int32, netns: NetworkNamespace) throws {
        // Entries a killed agent left would let their endpoints skip the rules: the agent
        // is the map's only writer, so a start empties it.
        let inbound = programs.mapFD(FTBPF_MAP_RELAY_INBOUND)
        var key = ft_relay_endpoint()
        while ftbpf_map_next_key(inbound, nil, &key) == 0 { _ = ftbpf_map_delete(inbound, &key) }
        var zero: UInt32 = 0
        var cookie = netns.cookie
        try check("publish the relay's network namespace", ftbpf_map_update(fd(FTRELAY_MAP_HOME), &zero, &cookie, 0))
        for (index, fd) in [(UInt32(0), v4), (1, v6)] where fd >= 0 {
            var key = index
            var value = UInt64(fd)
            try check("publish the inbound relay listener", ftbpf_map_update(self.fd(FTRELAY_MAP_INBOUND_LISTENER), &key, &value, 0))
        }
        guard let h = handle else { throw KernelError.invalidArgument("the relay object is closed") }
        var err = [CChar](repeating: 0, count: 1024)
        guard ftrelay_attach_inbound(h, netns.fd, &err, err.count) == 0 else { throw KernelError.attach(Self.text(err)) }
    }

    /// The relay object's instance for inbound relaying in another namespace (its own
    /// sk_lookup program, listeners and home cookie; every other map shared).
    func openInboundInstance(netns: NetworkNamespace, v4: Int32, v6: Int32) throws -> OpaquePointer {
        guard let h = handle else { throw KernelError.invalidArgument("the relay object is closed") }
        var err = [CChar](repeating: 0, count: 1024)
        var instance: OpaquePointer?
        guard ftrelay_open_inbound(h, netns.fd, netns.cookie, v4, v6, &instance, &err, err.count) == 0, let instance else {
            throw KernelError.attach(Self.text(err))
        }
        return instance
    }

    static func endpoint(_ a: SocketAddress, netns: UInt64) -> ft_relay_endpoint {
        var e = ft_relay_endpoint()
        e.netns_cookie = netns
        let v4 = a.address.isIPv4
        e.family = UInt8(v4 ? AF_INET : AF_INET6)
        e.port = a.port
        let bytes = a.address.bytes
        withUnsafeMutableBytes(of: &e.addr) { for i in 0..<min(16, bytes.count) { $0[i] = bytes[i] } }
        return e
    }

    /// Before the agent connects to a server from `agentSide`: its SYN passes sk_lookup,
    /// and the server's flow and getpeername will name `client`.
    func publishInbound(agentSide: SocketAddress, client: SocketAddress, netns: UInt64) throws {
        var key = Self.endpoint(agentSide, netns: netns)
        var value = ft_relay_inbound()
        value.client = Self.endpoint(client, netns: netns)
        try check("publish an inbound relayed connection", ftbpf_map_update(programs.mapFD(FTBPF_MAP_RELAY_INBOUND), &key, &value, 0))
    }

    /// What sockops filled in once the server's side was established (nil before).
    func inboundServer(agentSide: SocketAddress, netns: UInt64) -> ft_relay_inbound? {
        var key = Self.endpoint(agentSide, netns: netns)
        var value = ft_relay_inbound()
        guard ftbpf_map_lookup(programs.mapFD(FTBPF_MAP_RELAY_INBOUND), &key, &value) == 0, value.server_cookie != 0 else { return nil }
        return value
    }

    /// Whether `endpoint` is one of the agent's own server-facing sockets.
    func isInboundEndpoint(_ endpoint: SocketAddress, netns: UInt64) -> Bool {
        var key = Self.endpoint(endpoint, netns: netns)
        var value = ft_relay_inbound()
        return ftbpf_map_lookup(programs.mapFD(FTBPF_MAP_RELAY_INBOUND), &key, &value) == 0
    }

    func forgetInbound(agentSide: SocketAddress, netns: UInt64) {
        var key = Self.endpoint(agentSide, netns: netns)
        _ = ftbpf_map_delete(programs.mapFD(FTBPF_MAP_RELAY_INBOUND), &key)
    }

    func counter(_ index: ft_relay_counter) -> UInt64 {
        var sum: UInt64 = 0
        return ftbpf_percpu_sum(fd(FTRELAY_MAP_COUNTERS), index.rawValue, &sum) == 0 ? sum : 0
    }

    public var redirectedCount: UInt64 { counter(FT_RCNT_REDIRECTED) }
    public var noListenerCount: UInt64 { counter(FT_RCNT_NO_LISTENER) }
    public var storageFailedCount: UInt64 { counter(FT_RCNT_STORAGE_FAILED) }
    public var inboundRedirectedCount: UInt64 { counter(FT_RCNT_INBOUND_REDIRECTED) }
    public var inboundNotTakenCount: UInt64 { counter(FT_RCNT_INBOUND_NO_LISTENER) + counter(FT_RCNT_INBOUND_ASSIGN_FAILED) }
    public var handOverLostCount: UInt64 { programs.counter(FT_CNT_RELAY_PENDING_FULL) }

    /// Opens the listener requests; `fn` gets each record during `consumeRequests`.
    func openRequests(_ fn: ftbpf_event_fn, context: UnsafeMutableRawPointer) throws -> Int32 {
        guard let h = handle else { throw KernelError.invalidArgument("the relay object is closed") }
        try check("open the relay's request ring buffer", ftrelay_requests_open(h, fn, context))
        let fd = ftrelay_requests_fd(h)
        guard fd >= 0 else { throw KernelError.system("relay request ring buffer fd", -fd) }
        return fd
    }

    func consumeRequests() { if let h = handle { _ = ftrelay_requests_consume(h) } }
}
