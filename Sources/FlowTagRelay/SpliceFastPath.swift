#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import CLinuxCalls
import FlowContext

/// How a relayed flow's bytes move once its callouts have allowed the connection.
public enum FastPath: String, Sendable, CaseIterable {
    /// The relay thread keeps copying (recv into the agent, send out).
    case copy
    /// The kernel moves them between the agent's two sockets (sockhash + sk_skb verdict).
    case sockmap
}

/// One direction of a flow on the sockmap fast path (docs/stream-relay.md, "Sockmap").
///
/// The verdict counts what it redirected and what it passed to the agent; the agent
/// counts what it read of the passed bytes and what it wrote itself into the writing
/// socket. From those: `lag`, redirected bytes not yet in the writing socket's send
/// queue. The FIN goes on only at lag 0; the verdict redirects only while the agent owes
/// nothing (passed == consumed); a direction held for flow control resumes at lag 0.
struct SpliceLane {
    let readerCookie: UInt64
    let writerCookie: UInt64
    /// Passed bytes the agent has read (starts at what it owed when the flow entered).
    var passedRead: UInt64
    /// Passed bytes written on: `passedRead` whenever nothing waits in this direction.
    var consumed: UInt64 = 0
    /// Bytes ever queued on the writing socket when the flow entered the fast path.
    var baseOut: UInt64
    /// Bytes the agent itself wrote into the writing socket since then.
    var agentWritten: UInt64 = 0
    /// Held for flow control: the kernel's queue toward the writer passed the limit.
    var throttled = false
    /// Held while the agent stops (it relays the rest itself).
    var draining = false
    /// `hold` as last written to the kernel.
    var written: (hold: Bool, consumed: UInt64)?
    /// recv() said end of file while passed bytes were still on their way to the agent.
    var eofEarly = false
    /// What the last tick saw: a lane whose kernel moved nothing since, with nothing
    /// queued then, is not measured again.
    var lastRedirected: UInt64 = 0
    var lastLag: Int64 = 0
}

/// The fast path's state of one flow: a lane per direction (index: `RelayedFlow.index`).
struct SplicedFlow {
    var lanes: [SpliceLane]
}

extension StreamRelay {
    /// Redirected bytes queued in the kernel above this pause a direction.
    static let spliceQueueLimit: UInt64 = 4 << 20

    /// Bytes ever put into a socket's send queue: a lower bound (so lag is never
    /// under-estimated), or `exact` (the base at entry, while nothing writes: a base too
    /// high would keep lag above 0 for the flow's life and its FIN back). nil if the
    /// kernel cannot say.
    static func queuedTotal(_ fd: Int32, exact: Bool = false) -> UInt64? {
        var total: UInt64 = 0
        return lc_tcp_bytes_queued(fd, exact ? 1 : 0, &total) == 0 ? total : nil
    }

    static func socketCookie(_ fd: Int32) -> UInt64? {
        var cookie: UInt64 = 0
        var len = socklen_t(8)
        return getsockopt(fd, SOL_SOCKET, Self.soCookie, &cookie, &len) == 0 ? cookie : nil
    }

    func passesThrough(_ flow: RelayedFlow, _ d: StreamDirection) -> Bool {
        flow.session.map { $0.passesThrough(d) } ?? true
    }

    /// Puts a flow on the fast path once one of its directions passes through (the other
    /// stays held until it does). Bytes the agent holds count as passed: the verdict
    /// passes newer ones until those are written, so nothing is overtaken.
    func enterFastPath(_ flow: RelayedFlow) {
        guard options.fastPath == .sockmap, flow.splice == nil, !flow.fastPathRefused, flow.connected, !flow.isAborted,
              awaitingServer[flow.cookie] == nil, flow.readClosed == [false, false], flow.finForwarded == [false, false],
              passesThrough(flow, .send) || passesThrough(flow, .receive),
              let process = Self.socketCookie(flow.processSide), let peer = Self.socketCookie(flow.peerSide) else { return }
        // Only established sockets go in (one whose FIN came would be refused after the
        // other went in). The bases are measured now: nothing is redirected before the
        // holds are lifted, and the agent writes nothing in between.
        let tcpEstablished: Int32 = 1
        guard lc_tcp_state(flow.processSide) == tcpEstablished, lc_tcp_state(flow.peerSide) == tcpEstablished,
              let peerBase = Self.queuedTotal(flow.peerSide, exact: true),
              let processBase = Self.queuedTotal(flow.processSide, exact: true) else {
            flow.fastPathRefused = true
            counters.fastPathRefused.add(1, ordering: .relaxed)
            return
        }
        var lanes: [SpliceLane] = []
        for d in [StreamDirection.send, .receive] {
            let (reader, writer) = d == .send ? (process, peer) : (peer, process)
            lanes.append(SpliceLane(readerCookie: reader, writerCookie: writer, passedRead: UInt64(flow.pendingBytes(d)),
                                    baseOut: d == .send ? peerBase : processBase))
        }
        flow.splice = SplicedFlow(lanes: lanes)
        for lane in lanes {
            var key = lane.readerCookie
            var stat = ft_relay_splice_stat()
            stat.passed = lane.passedRead
            guard ftbpf_map_update(kernel.fd(FTRELAY_MAP_SPLICE_STAT), &key, &stat, 0) == 0 else { return refuseFastPath(flow, ENOMEM) }
        }
        // Held while the sockets go in: a redirect to a socket not in the map yet would fail.
        for d in [StreamDirection.send, .receive] { writeControl(flow, d, hold: true) }
        for (n, (fd, cookie)) in [(flow.peerSide, peer), (flow.processSide, process)].enumerated() {
            var key = cookie
            var value = UInt64(fd)
            let rc = ftbpf_map_update(kernel.fd(FTRELAY_MAP_SPLICE), &key, &value, 1 /* BPF_NOEXIST */)
            guard rc == 0 else {
                if n == 0 { return refuseFastPath(flow, -rc) }
                // The peer's socket went in: taking it out drops what its psock holds. Read
                // that out, take the socket out, then check nothing came in between.
                read(flow, .receive)
                guard flowByCookie[flow.cookie] === flow, flow.splice != nil else { return }
                var first = peer
                _ = ftbpf_map_delete(kernel.fd(FTRELAY_MAP_SPLICE), &first)
                let lost = (spliceStat(flow, .receive)?.passed ?? 0) > flow.splice!.lanes[1].passedRead
                refuseFastPath(flow, -rc)
                if lost { abort(flow, why: -rc) }
                return
            }
        }
        counters.fastPathFlows.add(1, ordering: .relaxed)
        spliced.insert(flow.cookie)
        syncFastPath(flow)
        // A read runs the verdict on bytes that arrived before the sockets went in.
        read(flow, .send)
        read(flow, .receive)
    }

    /// The kernel would not take the flow (the sockhash is full, or a socket is no longer
    /// established): it is copied.
    private func refuseFastPath(_ flow: RelayedFlow, _ err: Int32) {
        logger.notice("relay: fast path refused, the flow is copied", metadata: [
            "flow": "\(flow.cookie)", "why": "\(String(cString: strerror(err)))"])
        counters.fastPathRefused.add(1, ordering: .relaxed)
        forgetFastPath(flow)
        flow.fastPathRefused = true
    }

    private func writeControl(_ flow: RelayedFlow, _ d: StreamDirection, hold: Bool) {
        guard let lane = flow.splice?.lanes[RelayedFlow.index(d)] else { return }
        if let w = lane.written, w.hold == hold, w.consumed == lane.consumed { return }
        var key = lane.readerCookie
        var ctl = ft_relay_splice_ctl()
        ctl.peer_cookie = lane.writerCookie
        ctl.consumed = lane.consumed
        ctl.hold = hold ? 1 : 0
        if ftbpf_map_update(kernel.fd(FTRELAY_MAP_SPLICE_CTL), &key, &ctl, 0) == 0 {
            flow.splice!.lanes[RelayedFlow.index(d)].written = (hold, lane.consumed)
        }
    }

    func spliceStat(_ flow: RelayedFlow, _ d: StreamDirection) -> ft_relay_splice_stat? {
        guard let lane = flow.splice?.lanes[RelayedFlow.index(d)] else { return nil }
        var key = lane.readerCookie
        var stat = ft_relay_splice_stat()
        return ftbpf_map_lookup(kernel.fd(FTRELAY_MAP_SPLICE_STAT), &key, &stat) == 0 ? stat : nil
    }

    /// Redirected bytes of a direction not yet in its writing socket's send queue.
    func spliceLag(_ flow: RelayedFlow, _ d: StreamDirection, _ stat: ft_relay_splice_stat) -> Int64 {
        guard let lane = flow.splice?.lanes[RelayedFlow.index(d)] else { return 0 }
        guard let queued = Self.queuedTotal(flow.writer(d)) else { return Int64.max } // unknown: wait
        let inWriter = Int64(bitPattern: queued &- lane.baseOut &- lane.agentWritten)
        return Int64(bitPattern: stat.redirected) - inWriter
    }

    /// After the agent read or wrote: what it owes and whether each direction is held.
    func syncFastPath(_ flow: RelayedFlow) {
        guard flow.splice != nil else { return }
        for d in [StreamDirection.send, .receive] {
            let i = RelayedFlow.index(d)
            let through = passesThrough(flow, d)
            if through && flow.pendingBytes(d) == 0 { flow.splice!.lanes[i].consumed = flow.splice!.lanes[i].passedRead }
            let lane = flow.splice!.lanes[i]
            writeControl(flow, d, hold: !through || lane.throttled || lane.draining)
        }
    }

    /// While reading passed bytes: writes them on at once (if nothing redirected is still
    /// on its way). False when the flow ended. The read that finds nothing more tells the
    /// verdict that nothing is owed (`syncFastPath`): the moment between them is all a
    /// busy stream has to slip another skb into the agent's queue, so it is kept short.
    func spliceWriteOn(_ flow: RelayedFlow, _ d: StreamDirection) -> Bool {
        guard flow.connected, !flow.isAborted, spliceMayWrite(flow, d) else { return !flow.isAborted }
        do {
            let n = try flow.flush(d)
            flow.splice?.lanes[RelayedFlow.index(d)].agentWritten += UInt64(n)
        } catch RelayError.io(let err) {
            abort(flow, why: err)
            return false
        } catch {}
        return true
    }

    /// The agent read `n` passed bytes.
    func splicedRead(_ flow: RelayedFlow, _ d: StreamDirection, _ n: Int) {
        flow.splice?.lanes[RelayedFlow.index(d)].passedRead += UInt64(n)
    }

    /// Whether recv()'s end of file is final: every byte the verdict passed has been read
    /// (a psock socket says EOF once its FIN came and its message queue is empty, also
    /// while passed bytes still wait behind redirected ones).
    func spliceEOFIsFinal(_ flow: RelayedFlow, _ d: StreamDirection) -> Bool {
        let i = RelayedFlow.index(d)
        guard let lane = flow.splice?.lanes[i], let stat = spliceStat(flow, d) else { return true }
        let final = stat.passed <= lane.passedRead
        flow.splice!.lanes[i].eofEarly = !final
        return final
    }

    /// Whether the agent may write a direction's output now: not while redirected bytes
    /// are still on their way to the writer (they came first).
    func spliceMayWrite(_ flow: RelayedFlow, _ d: StreamDirection) -> Bool {
        guard flow.splice != nil, flow.pendingBytes(d) > 0 else { return true }
        return spliceFINReady(flow, d)
    }

    /// Whether the FIN of a direction may go on: every redirected byte is in the writing
    /// socket's send queue (no event says so: the tick polls).
    func spliceFINReady(_ flow: RelayedFlow, _ d: StreamDirection) -> Bool {
        guard flow.splice != nil, let stat = spliceStat(flow, d) else { return true }
        return spliceLag(flow, d, stat) <= 0
    }

    /// How often the fast path's counters are read: every millisecond for up to 64 flows,
    /// less often with more (one batched read each time; what a direction can queue
    /// beyond the hold limit grows with the interval).
    var spliceTickInterval: Duration { .microseconds(max(1000, spliced.count * 1000 / 64)) }

    /// Holds a direction whose kernel queue is over the limit and resumes it at 0, reads
    /// what an early EOF left, sends FINs that waited for the queue, and resets a flow
    /// whose verdict could not trim an skb (never a silent duplicate). A psock's send
    /// error is the socket's error: epoll reports it.
    func spliceTick() {
        let stats = kernel.spliceStats()
        for cookie in spliced {
            guard let flow = flowByCookie[cookie], flow.splice != nil else { spliced.remove(cookie); continue }
            var waiting = false
            for d in [StreamDirection.send, .receive] {
                let i = RelayedFlow.index(d)
                guard !flow.finForwarded[i], let lane = flow.splice?.lanes[i], let stat = stats[lane.readerCookie] else { continue }
                if stat.trim_failed != 0 {
                    logger.error("relay: the fast path could not cut a repeated skb head; the flow is reset", metadata: ["flow": "\(flow.cookie)"])
                    abort(flow, why: EPROTO)
                    break
                }
                let finWaits = flow.finPending(d), outputWaits = flow.pendingBytes(d) > 0
                guard stat.redirected != lane.lastRedirected || lane.lastLag > 0 || lane.throttled || lane.eofEarly || finWaits
                        || outputWaits else { continue }
                let lag = spliceLag(flow, d, stat)
                flow.splice!.lanes[i].lastRedirected = stat.redirected
                flow.splice!.lanes[i].lastLag = lag
                if !lane.throttled && lag > Int64(Self.spliceQueueLimit) {
                    flow.splice!.lanes[i].throttled = true
                    counters.fastPathHolds.add(1, ordering: .relaxed)
                } else if lane.throttled && lag <= 0 {
                    // Only at 0: bytes the agent relays itself must not overtake
                    // redirected ones still queued for the writer.
                    flow.splice!.lanes[i].throttled = false
                }
                if lane.eofEarly {
                    flow.splice!.lanes[i].eofEarly = false
                    read(flow, d)
                    guard flowByCookie[cookie] === flow else { break }
                }
                waiting = waiting || finWaits || outputWaits || lane.eofEarly || lane.throttled != flow.splice!.lanes[i].throttled
            }
            if waiting, flowByCookie[cookie] === flow { update(flow) }
        }
    }

    /// Stopping: the verdict passes everything to the agent, which relays the rest itself.
    func drainFastPath(_ flow: RelayedFlow) {
        guard flow.splice != nil else { return }
        flow.splice!.lanes[0].draining = true
        flow.splice!.lanes[1].draining = true
        syncFastPath(flow)
    }

    /// Whether the agent read every byte the verdict passed (closing with unread ones
    /// must reset: a psock's queue is dropped silently on close).
    func spliceFullyRead(_ flow: RelayedFlow) -> Bool {
        guard let s = flow.splice else { return true }
        for d in [StreamDirection.send, .receive] {
            guard let stat = spliceStat(flow, d) else { continue }
            if stat.passed > s.lanes[RelayedFlow.index(d)].passedRead { return false }
        }
        return true
    }

    /// Takes the flow's sockets out of the sockhash and its entries out of the maps; the
    /// bytes the kernel moved are added to the relay's byte counters.
    func forgetFastPath(_ flow: RelayedFlow) {
        guard let s = flow.splice else { return }
        for d in [StreamDirection.send, .receive] {
            if let stat = spliceStat(flow, d) {
                let lane = s.lanes[RelayedFlow.index(d)]
                logger.debug("relay: fast path ends", metadata: [
                    "flow": "\(flow.cookie)", "direction": "\(d)", "redirected": "\(stat.redirected)",
                    "passed": "\(stat.passed)", "read": "\(lane.passedRead)", "consumed": "\(lane.consumed)",
                    "redirect_failed": "\(stat.redirect_failed)", "trimmed": "\(stat.trimmed)",
                    "held": "\(lane.throttled || lane.draining)"])
                let moved = stat.redirected
                counters.fastPathBytes.add(moved, ordering: .relaxed)
                if d == .send {
                    counters.bytesFromProcess.add(moved, ordering: .relaxed)
                    counters.bytesToPeer.add(moved, ordering: .relaxed)
                } else {
                    counters.bytesFromPeer.add(moved, ordering: .relaxed)
                    counters.bytesToProcess.add(moved, ordering: .relaxed)
                }
            }
        }
        for lane in s.lanes {
            var key = lane.readerCookie
            _ = ftbpf_map_delete(kernel.fd(FTRELAY_MAP_SPLICE), &key)
            _ = ftbpf_map_delete(kernel.fd(FTRELAY_MAP_SPLICE_CTL), &key)
            _ = ftbpf_map_delete(kernel.fd(FTRELAY_MAP_SPLICE_STAT), &key)
        }
        flow.splice = nil
        spliced.remove(flow.cookie)
    }
}
