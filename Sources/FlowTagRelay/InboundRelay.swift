#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import FlowContext
import FlowTagCore
import FlowTagKernel

/// Inbound rules (WFP's inbound stream): the relay object's sk_lookup program gives an
/// incoming connection a rule selects to the agent's inbound listener instead of the
/// server; the agent connects to the server itself, from the address the client reached
/// and a port it publishes first (so its SYN passes, and the server's flow and
/// `getpeername` name the real client), and relays between the two. The server's
/// process is the listener's owner, as WFP names an inbound flow's process.
extension StreamRelay {
    static let soCookie: Int32 = 57 // SO_COOKIE (asm-generic/socket.h)

    var hasInboundRules: Bool { rules.contains { $0.direction == .inbound } }

    /// Inbound relaying in `ns`: listeners on its 127.0.0.1 and ::1 (sk_lookup assigns
    /// them connections to any address; one made to them directly is reset), then the
    /// program: the main object's in the agent's namespace, an instance of its own in
    /// any other. On failure nothing of it stays.
    func openInbound(in ns: NetworkNamespace) throws {
        guard inbound[ns.cookie] == nil else { return }
        guard inbound.count < RelayKernel.maxListeners else {
            throw KernelError.invalidArgument("inbound relaying runs in \(RelayKernel.maxListeners) network namespaces already")
        }
        let n = InboundNamespace(ns: ns)
        do {
            try ns.run(from: home) {
                n.listeners.append(try inboundListener(SocketAddress(family: AF_INET, address: .v4(0x7f00_0001), port: 0)))
                // Without IPv6 in the namespace only IPv4 connections are relayed.
                if let v6 = try? inboundListener(SocketAddress(family: AF_INET6, address: .v6(0, 1), port: 0)) { n.listeners.append(v6) }
            }
            let v6 = n.listeners.count > 1 ? n.listeners[1] : -1
            if ns.cookie == home.cookie {
                try kernel.enableInbound(v4: n.listeners[0], v6: v6, netns: home)
            } else {
                n.instance = try kernel.openInboundInstance(netns: ns, v4: n.listeners[0], v6: v6)
            }
        } catch {
            n.close()
            throw error
        }
        inbound[ns.cookie] = n
        for fd in n.listeners {
            inboundByFD[fd] = n
            epoll.add(fd, for: .readable)
        }
        inboundCount.store(inbound.count, ordering: .relaxed)
        logger.info("relay: inbound listeners ready", metadata: ["netns": "\(ns.cookie)"])
    }

    private func inboundListener(_ address: SocketAddress) throws -> Int32 {
        let fd = socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw KernelError.system("inbound relay listener socket", errno) }
        do {
            try kernel.mark(fd) // cloned to every connection it accepts: never a flow
            guard address.withSockaddr({ bind(fd, $0, $1) }) == 0 else { throw KernelError.system("bind the inbound relay listener to \(address)", errno) }
            guard listen(fd, 4096) == 0 else { throw KernelError.system("listen on the inbound relay listener", errno) }
            return fd
        } catch {
            close(fd)
            throw error
        }
    }

    func dropInbound(_ n: InboundNamespace) {
        for fd in n.listeners {
            epoll.remove(fd)
            inboundByFD.removeValue(forKey: fd)
        }
        n.close()
        if inbound[n.ns.cookie] === n { inbound.removeValue(forKey: n.ns.cookie) }
        inboundCount.store(inbound.count, ordering: .relaxed)
    }

    func closeInboundListeners() {
        for n in Array(inbound.values) { dropInbound(n) }
    }

    static let inboundOpensPerLook = 16

    /// Every few seconds with inbound rules: every network namespace a process is in
    /// (`pidByInode`, from /proc) gets inbound relaying (servers in containers too); one no
    /// process is in any more, and no relayed flow, is let go.
    func followInboundNamespaces(_ pidByInode: [UInt64: UInt32]) {
        guard hasInboundRules, drainDeadline == nil else { return }
        let known = Set(inbound.values.map(\.ns.inode))
        for n in Array(inbound.values) where n.ns.cookie != home.cookie && pidByInode[n.ns.inode] == nil
            && !flowByCookie.values.contains(where: { $0.netns == n.ns.cookie }) {
            logger.info("relay: the network namespace is gone; its inbound listeners close", metadata: ["netns": "\(n.ns.cookie)"])
            dropInbound(n)
        }
        inboundFailed.formIntersection(pidByInode.keys)
        // A few per look: each is a program load, and the relay thread relays meanwhile.
        var opened = 0
        for (inode, pid) in pidByInode where !known.contains(inode) && inode != home.inode && !inboundFailed.contains(inode) {
            guard opened < Self.inboundOpensPerLook, inbound.count < RelayKernel.maxListeners else { return }
            opened += 1
            do {
                try openInbound(in: try NetworkNamespace.of(pid: pid, home: home))
            } catch {
                // Not tried again while the namespace lives (a process leaving, a setns refused).
                inboundFailed.insert(inode)
                logger.notice("relay: no inbound relaying in a network namespace", metadata: ["pid": "\(pid)", "why": "\(error)"])
            }
        }
    }

    func acceptInbound(_ listener: Int32) {
        acceptEach(listener) { takeOverInbound($0, from: listener) }
    }

    /// One incoming connection: the address the client reached is the server's.
    func takeOverInbound(_ s: Int32, from listener: Int32) {
        Self.setLinger(s, resetOnClose: true)
        guard let ns = inboundByFD[listener]?.ns else { close(s); return }
        // A connection to the listener itself (sk_lookup sends none there), or from one of
        // the agent's own server-facing sockets, would have the relay connect to itself.
        guard let client = SocketAddress.peer(s), let server = SocketAddress.local(s),
              server != SocketAddress.local(listener), !kernel.isInboundEndpoint(client, netns: ns.cookie) else {
            counters.unknownConnections.add(1, ordering: .relaxed)
            close(s)
            return
        }
        guard flowByCookie.count < options.maxFlows else {
            counters.overLimit.add(1, ordering: .relaxed)
            logger.warning("relay: at max_flows; an incoming connection is reset", metadata: ["max_flows": "\(options.maxFlows)"])
            close(s)
            return
        }
        Self.setNoDelay(s)
        let family: Int32 = server.address.isIPv4 ? AF_INET : AF_INET6
        let destination = SocketAddress(family: family, address: server.address, port: server.port)
        let b: Int32, endpoint: SocketAddress, cookie: UInt64
        do {
            (b, endpoint, cookie) = try connectServer(destination, for: client, in: ns)
        } catch {
            counters.connectFailures.add(1, ordering: .relaxed)
            logger.notice("relay: cannot connect to the server", metadata: ["destination": "\(destination)", "why": "\(error)"])
            close(s)
            return
        }
        let record = Self.inboundRecord(cookie: cookie, netns: ns.cookie, server: destination, client: client, owner: nil, processes: processes)
        let flow = RelayedFlow(cookie: cookie, netns: ns.cookie, processSide: b, source: destination,
                               destination: client, record: record, counters: counters) { [weak self] f in self?.delivered(f) }
        flow.peerSide = s
        flow.inboundEndpoint = endpoint
        adopt(flow)
    }

    /// A marked socket in the server's namespace, bound to the server's address and a
    /// port of its own, published before its SYN leaves, connecting (non-blocking) to it.
    private func connectServer(_ server: SocketAddress, for client: SocketAddress, in ns: NetworkNamespace) throws -> (Int32, SocketAddress, UInt64) {
        let b = try ns.run(from: home) {
            socket(server.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
        guard b >= 0 else { throw KernelError.system("relay socket", errno) }
        var published: SocketAddress?
        do {
            try kernel.mark(b)
            Self.setLinger(b, resetOnClose: true)
            Self.setNoDelay(b)
            let local = SocketAddress(family: server.family, address: server.address, port: 0)
            guard local.withSockaddr({ bind(b, $0, $1) }) == 0 else { throw KernelError.system("bind to \(local)", errno) }
            guard let bound = SocketAddress.local(b) else { throw KernelError.system("relay socket address", errno) }
            // The relay's flows are keyed by this socket's cookie until the server's is known.
            guard let cookie = Self.socketCookie(b), cookie != 0 else { throw KernelError.system("relay socket cookie", errno) }
            try kernel.publishInbound(agentSide: bound, client: client, netns: ns.cookie)
            published = bound
            let rc = server.withSockaddr { connect(b, $0, $1) }
            guard rc == 0 || errno == EINPROGRESS else { throw KernelError.system("connect to \(server)", errno) }
            return (b, bound, cookie)
        } catch {
            if let published { kernel.forgetInbound(agentSide: published, netns: ns.cookie) }
            close(b)
            throw error
        }
    }

    /// Connected to the server: the callouts see the flow under the server socket's
    /// cookie and owner, which sockops fills in when the server's side is established (by
    /// our ACK, which loopback may deliver just after our connect reports done). Until
    /// then, or 5 ms, nothing is read; the relay thread does not wait for it.
    func serverConnected(_ flow: RelayedFlow) {
        guard let endpoint = flow.inboundEndpoint else { return }
        if kernel.inboundServer(agentSide: endpoint, netns: flow.netns) != nil || callouts.isEmpty {
            startInboundSession(flow)
        } else {
            awaitingServer[flow.cookie] = ContinuousClock.now.advanced(by: .milliseconds(5))
        }
    }

    func checkAwaitingServers() {
        let now = ContinuousClock.now
        for (cookie, deadline) in awaitingServer {
            guard let flow = flowByCookie[cookie], let endpoint = flow.inboundEndpoint else {
                awaitingServer.removeValue(forKey: cookie)
                continue
            }
            guard kernel.inboundServer(agentSide: endpoint, netns: flow.netns) != nil || now >= deadline else { continue }
            awaitingServer.removeValue(forKey: cookie)
            startInboundSession(flow)
            update(flow)
        }
    }

    private func startInboundSession(_ flow: RelayedFlow) {
        guard let endpoint = flow.inboundEndpoint else { return }
        let entry = kernel.inboundServer(agentSide: endpoint, netns: flow.netns)
        if entry == nil && !callouts.isEmpty { counters.inboundOwnerUnknown.add(1, ordering: .relaxed) }
        let record = Self.inboundRecord(cookie: entry?.server_cookie ?? flow.cookie, netns: flow.netns, server: flow.source,
                                        client: flow.destination, owner: entry?.owner, processes: processes)
        records.withLock {
            $0.removeValue(forKey: flow.record.flow)
            $0[record.flow] = record
        }
        flow.record = record
        guard !callouts.isEmpty else { return }
        flow.session = StreamSession(flow: FlowHandle(cookie: record.flow, netns: record.netns),
                                     metadata: Self.metadata(record), callouts: callouts, sink: flow)
    }

    /// The relayed inbound flow as the flow table names the server's socket.
    static func inboundRecord(cookie: UInt64, netns: UInt64, server: SocketAddress, client: SocketAddress,
                              owner: ft_stamp?, processes: ProcessTable) -> FlowRecord {
        relayedRecord(local: server, remote: client, direction: FT_DIR_INBOUND, cookie: cookie, netns: netns,
                      owner: owner, openedNS: 0, processes: processes)
    }
}
