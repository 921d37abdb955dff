#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import CLinuxCalls
import FlowContext
import FlowTagCore
import FlowTagKernel

/// Taking over redirected connections: accept, the hand-over entry, and the agent's own
/// connect to the original destination from the process's address and port.
extension StreamRelay {
    static let ipBindAddressNoPort: Int32 = 24 // IP_BIND_ADDRESS_NO_PORT
    static let ipLocalPortRange: Int32 = 51    // IP_LOCAL_PORT_RANGE (Linux 6.3)

    /// Accepts every queued connection of one listener socket.
    func acceptAll(_ l: NetnsListeners, fd: Int32) {
        acceptEach(fd) { takeOver($0, from: l) }
    }

    /// Hands each connection queued at `listener` to `take`.
    func acceptEach(_ listener: Int32, _ take: (Int32) -> Void) {
        if let until = acceptPausedUntil, ContinuousClock.now < until { return }
        acceptPausedUntil = nil
        while true {
            let s = lc_accept_nonblock(listener)
            if s < 0 {
                if -s == EMFILE || -s == ENFILE || -s == ENOBUFS || -s == ENOMEM {
                    // Out of descriptors: the queue stays readable; look again in 100 ms, not in a spin.
                    logger.warning("relay: cannot accept: \(String(cString: strerror(-s)))")
                    acceptPausedUntil = ContinuousClock.now.advanced(by: .milliseconds(100))
                }
                return
            }
            take(s)
        }
    }

    /// One accepted connection: relayed when its hand-over entry is found, else reset.
    func takeOver(_ s: Int32, from l: NetnsListeners) {
        Self.setLinger(s, resetOnClose: true)
        guard let peer = SocketAddress.peer(s), let local = SocketAddress.local(s),
              let orig = kernel.takePending(Self.pendingKey(netns: l.ns.cookie, peer: peer, local: local)) else {
            counters.unknownConnections.add(1, ordering: .relaxed)
            close(s)
            return
        }
        guard flowByCookie.count < options.maxFlows, flowByCookie[orig.cookie] == nil else {
            counters.overLimit.add(1, ordering: .relaxed)
            logger.warning("relay: at max_flows; a redirected connection is reset", metadata: ["max_flows": "\(options.maxFlows)"])
            close(s)
            return
        }
        var o = orig
        let dstAddress = withUnsafeBytes(of: &o.dst) { IPAddress(raw: $0, family: Int32(o.family)) }
        let destination = SocketAddress(family: Int32(orig.family), address: dstAddress, port: orig.dst_port)
        let record = Self.record(orig, source: peer, destination: destination, processes: processes)
        let flow = RelayedFlow(cookie: orig.cookie, netns: orig.netns_cookie, processSide: s, source: peer,
                               destination: destination, record: record, counters: counters) { [weak self] f in self?.delivered(f) }
        if !callouts.isEmpty {
            flow.session = StreamSession(flow: FlowHandle(cookie: orig.cookie, netns: orig.netns_cookie),
                                         metadata: Self.metadata(record), callouts: callouts, sink: flow)
        }
        Self.setNoDelay(s)
        do {
            flow.peerSide = try connectPeer(flow, in: l.ns)
        } catch {
            counters.connectFailures.add(1, ordering: .relaxed)
            logger.notice("relay: cannot connect to the original destination", metadata: [
                "flow": "\(flow.cookie)", "destination": "\(destination)", "why": "\(error)"])
            flow.session?.abort()
            close(s)
            return
        }
        adopt(flow)
    }

    static func metadata(_ r: FlowRecord) -> Metadata {
        Metadata(flow: FlowHandle(cookie: r.flow, netns: r.netns), processID: r.process.pid, threadID: r.process.tid,
                 processPath: r.process.exe, userID: r.process.uid, cgroupID: r.process.cgroup)
    }

    /// The key sockops wrote for this connection: as the listener sees it.
    static func pendingKey(netns: UInt64, peer: SocketAddress, local: SocketAddress) -> ft_relay_pending_key {
        var key = ft_relay_pending_key()
        key.netns_cookie = netns
        key.family = UInt8(peer.address.isIPv4 ? AF_INET : AF_INET6)
        key.peer_port = peer.port
        key.local_port = local.port
        let p = peer.address.bytes, l = local.address.bytes
        withUnsafeMutableBytes(of: &key.peer) { for i in 0..<16 { $0[i] = p[i] } }
        withUnsafeMutableBytes(of: &key.local) { for i in 0..<16 { $0[i] = l[i] } }
        return key
    }

    /// The relayed flow as the flow table names it (same cookie, same tuple).
    static func record(_ o: ft_relay_orig, source: SocketAddress, destination: SocketAddress, processes: ProcessTable) -> FlowRecord {
        relayedRecord(local: source, remote: destination, direction: FT_DIR_OUTBOUND, cookie: o.cookie, netns: o.netns_cookie,
                      owner: o.owner, openedNS: o.connect_ns, processes: processes)
    }

    /// A relayed flow's record, built as the flow table builds the kernel's.
    static func relayedRecord(local: SocketAddress, remote: SocketAddress, direction: ft_direction, cookie: UInt64, netns: UInt64,
                              owner: ft_stamp?, openedNS: UInt64, processes: ProcessTable) -> FlowRecord {
        var f = ft_flow()
        f.tuple.family = UInt8(remote.address.isIPv4 ? AF_INET : AF_INET6)
        f.tuple.protocol = UInt8(IPPROTO_TCP)
        f.tuple.local_port = local.port
        f.tuple.remote_port = remote.port
        let l = local.address.bytes, r = remote.address.bytes
        withUnsafeMutableBytes(of: &f.tuple.local) { for i in 0..<16 { $0[i] = l[i] } }
        withUnsafeMutableBytes(of: &f.tuple.remote) { for i in 0..<16 { $0[i] = r[i] } }
        if let owner { f.owner = owner }
        f.cookie = cookie
        f.netns_cookie = netns
        f.opened_ns = openedNS
        f.last_ns = openedNS
        f.direction = UInt8(direction.rawValue)
        f.flags = UInt8(FT_FLOW_RELAYED.rawValue)
        return FlowRecordBuilder.record(f, processes: processes)
    }

    /// The agent's socket to the original destination, made in the process's netns,
    /// connecting (non-blocking) from the process's address and, when that 4-tuple is
    /// free, its port: the peer sees the connection the process would have made.
    func connectPeer(_ flow: RelayedFlow, in ns: NetworkNamespace) throws -> Int32 {
        let dest = flow.destination
        let source = flow.source
        // A loopback source cannot reach another host: then the route picks the source.
        let bindAddress: IPAddress = Self.isLoopback(source.address) && !Self.isLoopback(dest.address)
            ? (dest.family == AF_INET ? .v4(0) : .v6(0, 0)) : source.address
        for samePort in [true, false] {
            let s = try ns.run(from: home) { socket(dest.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
            guard s >= 0 else { throw KernelError.system("relay socket", errno) }
            do {
                try kernel.mark(s)
                Self.setLinger(s, resetOnClose: true)
                Self.setNoDelay(s)
                var one: Int32 = 1
                _ = setsockopt(s, Int32(IPPROTO_IP), Self.ipBindAddressNoPort, &one, 4)
                if samePort {
                    var range = UInt32(source.port) << 16 | UInt32(source.port)
                    _ = setsockopt(s, Int32(IPPROTO_IP), Self.ipLocalPortRange, &range, 4)
                }
                let local = SocketAddress(family: dest.family, address: bindAddress, port: 0)
                guard local.withSockaddr({ bind(s, $0, $1) }) == 0 else { throw KernelError.system("bind to \(local)", errno) }
                let rc = dest.withSockaddr { connect(s, $0, $1) }
                if rc == 0 || errno == EINPROGRESS {
                    if !samePort { counters.sourcePortChanged.add(1, ordering: .relaxed) }
                    return s
                }
                let err = errno
                close(s)
                if samePort && (err == EADDRNOTAVAIL || err == EADDRINUSE) { continue }
                throw KernelError.system("connect to \(dest)", err)
            } catch {
                close(s)
                throw error
            }
        }
        throw KernelError.system("connect to \(dest)", EADDRNOTAVAIL)
    }

    /// The agent's connect finished: relay, or reset the process's side when it failed
    /// (the process sees ECONNRESET, as from any proxy that cannot reach the peer).
    func finishConnect(_ flow: RelayedFlow) {
        var err: Int32 = 0
        var len = socklen_t(4)
        if getsockopt(flow.connectingSide, SOL_SOCKET, SO_ERROR, &err, &len) != 0 { err = errno }
        guard err == 0 else {
            counters.connectFailures.add(1, ordering: .relaxed)
            logger.notice("relay: the original destination did not accept the connection", metadata: [
                "flow": "\(flow.cookie)", "destination": "\(flow.isInbound ? flow.source : flow.destination)",
                "why": "\(String(cString: strerror(err)))"])
            return abort(flow, why: err)
        }
        flow.connected = true
        if flow.isInbound { serverConnected(flow) }
        update(flow)
    }

    static func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, 4)
    }

    static func isLoopback(_ a: IPAddress) -> Bool {
        switch a {
        case .v4(let v): return v >> 24 == 127
        case .v6(let h, let l): return h == 0 && l == 1
        }
    }
}
