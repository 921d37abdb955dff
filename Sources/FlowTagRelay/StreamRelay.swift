#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import CFlowTagBPF
import CLinuxCalls
import FlowContext
import FlowTagCore
import FlowTagKernel
import Synchronization

/// The stream relay (docs/stream-relay.md): WFP's connect-redirect with TCP's semantics.
///
/// The relay object's connect hook sends a selected connect to this relay's listener in
/// the socket's netns; the relay accepts it, takes the hand-over entry (original
/// destination, owner, flow cookie), connects to the original destination from the
/// process's address and port, and copies between its two sockets through the flow's
/// `StreamSession`. Reads stop while a direction's output is full, so TCP holds back a
/// sender whose reader is slow; a FIN goes on after every byte before it; a reset on
/// either side (or by a callout) resets both. Both sockets linger 0 until the flow ends
/// cleanly, so when the agent dies both ends are reset, never left hanging or cut short.
/// One thread runs every flow with epoll.
public final class StreamRelay: @unchecked Sendable {
    public struct Options: Sendable {
        /// Connections relayed at once; more are reset (counted).
        public var maxFlows = 4096
        /// On stop, how long flows may take to end by themselves before each side is sent
        /// what the relay holds and a FIN.
        public var drain: Duration = .seconds(10)
        /// Output held per direction before the relay stops reading that direction.
        public var bufferBytes = 256 << 10
        /// After the callouts allow a direction: keep copying, or let the kernel move it.
        public var fastPath = FastPath.copy
        public init(maxFlows: Int = 4096, drain: Duration = .seconds(10), fastPath: FastPath = .copy) {
            self.maxFlows = maxFlows; self.drain = drain; self.fastPath = fastPath
        }
    }

    public let kernel: RelayKernel
    public let counters = RelayCounters()
    let logger = Logger(label: "flowtagd.relay")
    let processes: ProcessTable
    let callouts: [StreamCallout]
    let options: Options
    let rules: [StreamRule]
    let epoll: Epoll
    let home: NetworkNamespace
    private let stopping = Atomic<Bool>(false)
    private let done = DispatchSemaphore(value: 0)
    private var thread: Thread?
    /// pthread_self() of the relay thread: deliveries from other threads wake it.
    private let relayThread = Atomic<UInt>(0)
    private let dirty = Mutex<[UInt64]>([])

    // Relay-thread state.
    var listeners: [UInt64: NetnsListeners] = [:]
    var listenerByFD: [Int32: NetnsListeners] = [:]
    var flowByFD: [Int32: RelayedFlow] = [:]
    var flowByCookie: [UInt64: RelayedFlow] = [:]
    var requestsFD: Int32 = -1
    /// Inbound relaying per network namespace, and by listener socket.
    var inbound: [UInt64: InboundNamespace] = [:]
    var inboundByFD: [Int32: InboundNamespace] = [:]
    let inboundCount = Atomic<Int>(0)
    /// Namespaces (by inode) where inbound relaying could not start.
    var inboundFailed: Set<UInt64> = []
    /// Inbound flows connected to their server, waiting (until the instant) for sockops
    /// to name the server's socket before their callouts begin.
    var awaitingServer: [UInt64: ContinuousClock.Instant] = [:]
    /// Flows on the sockmap fast path (their FINs and flow control are polled).
    var spliced: Set<UInt64> = []
    var nextSpliceTick = ContinuousClock.now
    var requests: [ft_relay_request] = []
    var acceptPausedUntil: ContinuousClock.Instant?
    var nextHousekeeping = ContinuousClock.now
    var drainDeadline: ContinuousClock.Instant?
    /// Past the drain deadline: the agent ends the streams itself.
    var finishing = false
    private let activeCount = Atomic<Int>(0)
    let records = Mutex<[UInt64: FlowRecord]>([:])

    static let readSize = 1 << 16
    static let readRounds = 4
    static let spliceReadRounds = 64
    /// How long the relay thread keeps polling after an event before it sleeps in epoll.
    static let busyPoll: Duration = .microseconds(50)

    /// Loads and attaches the connect hooks (with no rule yet: nothing is redirected
    /// until `start`). A failure leaves nothing attached.
    public init(programs: KernelPrograms, cgroup: String, rules: [StreamRule], callouts: [StreamCallout], options: Options = Options()) throws {
        guard rules.count <= RelayKernel.maxRules else {
            throw KernelError.invalidArgument("at most \(RelayKernel.maxRules) stream rules, not \(rules.count)")
        }
        kernel = try RelayKernel(programs: programs, cgroup: cgroup, fastPath: options.fastPath == .sockmap)
        do {
            if options.fastPath == .sockmap { try kernel.attachFastPath() }
            processes = ProcessTable(programs: programs)
            epoll = try Epoll()
            home = try NetworkNamespace.current()
        } catch {
            kernel.close()
            throw error
        }
        self.callouts = callouts
        self.options = options
        self.rules = rules
    }

    /// Opens the listeners of the agent's own netns, installs the rules (last: no connect
    /// is redirected before a listener takes it) and starts the relay thread. On failure
    /// what this start made is undone and the hooks are detached.
    public func start() throws {
        do {
            let ctx = Unmanaged.passUnretained(self).toOpaque()
            requestsFD = try kernel.openRequests({ ctx, data, len in
                guard let ctx, let data, len >= MemoryLayout<ft_relay_request>.size else { return 0 }
                let relay = Unmanaged<StreamRelay>.fromOpaque(ctx).takeUnretainedValue()
                relay.requests.append(data.loadUnaligned(as: ft_relay_request.self))
                return 0
            }, context: ctx)
            epoll.add(requestsFD, for: .readable)
            try openListeners(in: home)
            if hasInboundRules {
                try openInbound(in: home)
                followInboundNamespaces(Self.processByNamespace())
            }
            try kernel.setRules(rules)
        } catch {
            closeInboundListeners()
            closeListeners()
            kernel.close()
            throw error
        }
        let t = Thread { [self] in
            relayThread.store(UInt(pthread_self()), ordering: .releasing)
            // Relayed bytes wait for this thread: ahead of ordinary processes (CAP_SYS_NICE; else as is).
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, -10)
            run()
            done.signal()
        }
        t.name = "flowtag-relay"
        thread = t
        t.start()
    }

    /// Stops redirecting, lets relayed flows end by themselves for `options.drain`, then
    /// sends each side what the relay holds and a FIN, and detaches the hooks.
    public func stop() {
        guard !stopping.exchange(true, ordering: .relaxed) else { return }
        if thread != nil {
            epoll.wake()
            done.wait()
        }
        kernel.close()
    }

    /// Flows being relayed now.
    public var activeFlows: Int { activeCount.load(ordering: .relaxed) }

    /// The record of a flow being relayed (for reports about it, e.g. captures).
    public func record(flow: UInt64) -> FlowRecord? { records.withLock { $0[flow] } }

    // MARK: - Relay thread

    private func run() {
        var lastBusy = ContinuousClock.now
        while true {
            if stopping.load(ordering: .relaxed) && drainDeadline == nil { beginDrain() }
            if let deadline = drainDeadline, flowByCookie.isEmpty || ContinuousClock.now >= deadline { break }
            // Busy-poll briefly after activity: the answer to what was just relayed often
            // comes within tens of µs, and a sleeping thread's wake-up costs about that.
            let spinning = ContinuousClock.now - lastBusy < Self.busyPoll
            let polling = !awaitingServer.isEmpty || !spliced.isEmpty
            let n = epoll.wait(milliseconds: spinning ? 0 : polling ? 1 : drainDeadline == nil ? 200 : 10) { fd, events in dispatch(fd, events) }
            if !awaitingServer.isEmpty { checkAwaitingServers() }
            if !spliced.isEmpty && ContinuousClock.now >= nextSpliceTick {
                spliceTick()
                nextSpliceTick = ContinuousClock.now.advanced(by: spliceTickInterval)
            }
            if n > 0 { lastBusy = ContinuousClock.now }
            for cookie in dirty.withLock({ d -> [UInt64] in defer { d.removeAll() }; return d }) {
                if let f = flowByCookie[cookie] { update(f) }
            }
            if ContinuousClock.now >= nextHousekeeping {
                housekeeping()
                nextHousekeeping = ContinuousClock.now.advanced(by: .seconds(5))
            }
        }
        finishAll()
        closeInboundListeners()
        closeListeners()
    }

    private func dispatch(_ fd: Int32, _ events: Epoll.Events) {
        if fd == requestsFD {
            kernel.consumeRequests()
            let asked = requests
            requests.removeAll()
            for r in asked { listenerRequested(r) }
            return
        }
        if let l = listenerByFD[fd] { acceptAll(l, fd: fd); return }
        if inboundByFD[fd] != nil { acceptInbound(fd); return }
        guard let flow = flowByFD[fd] else { return }
        if fd == flow.connectingSide && !flow.connected {
            finishConnect(flow)
            return
        }
        if events.contains(.error) || !flow.connected {
            // Errors (and, before the peer answered, hang-ups) are reported whatever is
            // watched: a reset on either side resets the other.
            var err: Int32 = 0
            var len = socklen_t(4)
            _ = getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
            if err != 0 || !flow.connected { return abort(flow, why: err == 0 ? ECONNRESET : err) }
        }
        let d: StreamDirection = fd == flow.processSide ? .send : .receive
        if !events.subtracting(.writable).isEmpty { read(flow, d) }
        update(flow)
    }

    /// Called by a flow whenever output or a FIN was delivered or it was aborted.
    func delivered(_ flow: RelayedFlow) {
        guard UInt(pthread_self()) != relayThread.load(ordering: .acquiring) else { return } // update() follows on this thread
        dirty.withLock { $0.append(flow.cookie) }
        epoll.wake()
    }

    func canRead(_ flow: RelayedFlow, _ d: StreamDirection) -> Bool {
        guard flow.connected, !flow.readClosed[RelayedFlow.index(d)], !flow.isAborted,
              awaitingServer[flow.cookie] == nil else { return false }
        if let lane = flow.splice?.lanes[RelayedFlow.index(d)], lane.throttled || lane.eofEarly { return false }
        if flow.pendingBytes(d) >= options.bufferBytes { return false }
        if let s = flow.session, s.heldBytes >= s.bufferLimit { return false }
        return true
    }

    /// Reads what one direction's socket has (a few buffers: the other flows get their
    /// turn; epoll reports the rest again) into the callouts.
    func read(_ flow: RelayedFlow, _ d: StreamDirection) {
        let fd = flow.reader(d)
        // On the fast path the agent catches up with what it was passed (until EAGAIN):
        // the kernel redirects again only once it owes nothing.
        for _ in 0..<(flow.splice == nil ? Self.readRounds : Self.spliceReadRounds) {
            guard canRead(flow, d) else { return }
            var n = 0, err: Int32 = 0
            let bytes = [UInt8](unsafeUninitializedCapacity: Self.readSize) { buf, count in
                n = recv(fd, buf.baseAddress, buf.count, Int32(MSG_DONTWAIT))
                err = n < 0 ? errno : 0
                count = max(n, 0)
            }
            if n > 0 {
                splicedRead(flow, d, n)
                if d == .send { counters.bytesFromProcess.add(UInt64(n), ordering: .relaxed) } else { counters.bytesFromPeer.add(UInt64(n), ordering: .relaxed) }
                // Small reads are kept at their size: what waits is bounded by bytes, and a
                // 64 KiB array per 1 KiB message would hold 64 times that in memory.
                flow.received(n > Self.readSize / 2 ? bytes : Array(bytes[...]), d)
                if flow.splice != nil && !spliceWriteOn(flow, d) { return }
            } else if n == 0 {
                guard spliceEOFIsFinal(flow, d) else { return }
                flow.readClosed[RelayedFlow.index(d)] = true
                flow.receivedFIN(d)
                return
            } else {
                if err != EAGAIN && err != EINTR { abort(flow, why: err) } else { syncFastPath(flow) }
                return
            }
        }
    }

    /// Writes what waits, forwards FINs, ends the flow when both directions are done,
    /// and sets what epoll watches.
    func update(_ flow: RelayedFlow) {
        guard flowByCookie[flow.cookie] === flow else { return }
        if flow.isAborted { return reset(flow) }
        guard flow.connected else { return }
        enterFastPath(flow)
        guard flowByCookie[flow.cookie] === flow else { return }
        if flow.isAborted { return reset(flow) } // a callout dropped it while enterFastPath read
        var mayWrite = [true, true]
        for d in [StreamDirection.send, .receive] {
            let i = RelayedFlow.index(d)
            mayWrite[i] = spliceMayWrite(flow, d)
            guard mayWrite[i] else { continue } // the tick comes back at lag 0
            do {
                let n = try flow.flush(d)
                flow.splice?.lanes[i].agentWritten += UInt64(n)
            } catch RelayError.io(let err) {
                return abort(flow, why: err)
            } catch {}
            if !flow.finForwarded[i] && flow.finPending(d) && spliceFINReady(flow, d) {
                // Every byte before the FIN is written: now the FIN.
                _ = shutdown(flow.writer(d), Int32(SHUT_WR))
                flow.finForwarded[i] = true
            }
        }
        syncFastPath(flow)
        if flow.finForwarded[0] && flow.finForwarded[1] {
            // At the stop deadline the agent sent the FINs itself while both sides may still
            // be sending: close (and let the kernel reset them for what comes later) only
            // once each side has acknowledged what it was sent, FIN included.
            if finishing && (lc_tcp_outq(flow.processSide) > 0 || lc_tcp_outq(flow.peerSide) > 0) { return }
            // A psock drops what it holds unread silently on close: reset instead.
            return spliceFullyRead(flow) ? closeCleanly(flow) : abort(flow, why: EPIPE)
        }
        watch(flow.processSide, flow, readable: canRead(flow, .send), writable: mayWrite[1] && flow.pendingBytes(.receive) > 0,
              done: flow.readClosed[0] && flow.finForwarded[1])
        watch(flow.peerSide, flow, readable: canRead(flow, .receive), writable: mayWrite[0] && flow.pendingBytes(.send) > 0,
              done: flow.readClosed[1] && flow.finForwarded[0])
    }

    /// Sets what epoll watches on one socket. A socket finished both ways (its FIN came,
    /// ours went) leaves epoll: it would report its hang-up on every wait.
    func watch(_ fd: Int32, _ flow: RelayedFlow, readable: Bool, writable: Bool, done: Bool) {
        guard flow.interest[fd] != UInt32.max else { return }
        if done {
            epoll.remove(fd)
            flow.interest[fd] = UInt32.max
            return
        }
        var want: Epoll.Events = []
        if readable { want.insert(.readable) }
        if writable { want.insert(.writable) }
        if flow.interest[fd] != want.rawValue {
            epoll.change(fd, to: want)
            flow.interest[fd] = want.rawValue
        }
    }

    /// A reset from either side, a failed write, or a callout's drop: both sides reset.
    func abort(_ flow: RelayedFlow, why err: Int32) {
        logger.debug("relay: flow reset", metadata: ["flow": "\(flow.cookie)", "why": "\(String(cString: strerror(err)))"])
        if let s = flow.session { s.abort() } else { flow.abort() }
        reset(flow)
    }

    /// Closes both sockets with linger 0: each side gets a reset.
    func reset(_ flow: RelayedFlow) {
        if !flow.isAborted { flow.session?.abort() ?? flow.abort() }
        counters.resets.add(1, ordering: .relaxed)
        forget(flow)
        close(flow.processSide)
        if flow.peerSide >= 0 { close(flow.peerSide) }
    }

    /// Both FINs went on after every byte: an ordinary close of both sockets.
    func closeCleanly(_ flow: RelayedFlow) {
        forget(flow)
        for fd in [flow.processSide, flow.peerSide] where fd >= 0 {
            Self.setLinger(fd, resetOnClose: false)
            close(fd)
        }
    }

    private func forget(_ flow: RelayedFlow) {
        forgetFastPath(flow)
        for fd in [flow.processSide, flow.peerSide] where fd >= 0 {
            if flow.interest[fd] != UInt32.max { epoll.remove(fd) }
            flowByFD.removeValue(forKey: fd)
        }
        if flowByCookie.removeValue(forKey: flow.cookie) != nil { activeCount.subtract(1, ordering: .relaxed) }
        if let e = flow.inboundEndpoint { kernel.forgetInbound(agentSide: e, netns: flow.netns) }
        awaitingServer.removeValue(forKey: flow.cookie)
        records.withLock { _ = $0.removeValue(forKey: flow.record.flow) }
    }

    func adopt(_ flow: RelayedFlow) {
        flowByCookie[flow.cookie] = flow
        flowByFD[flow.processSide] = flow
        flowByFD[flow.peerSide] = flow
        records.withLock { $0[flow.record.flow] = flow.record }
        activeCount.add(1, ordering: .relaxed)
        counters.flows.add(1, ordering: .relaxed)
        let accepted = flow.isInbound ? flow.peerSide : flow.processSide
        epoll.add(accepted, for: [])
        epoll.add(flow.connectingSide, for: .writable)
        flow.interest = [accepted: 0, flow.connectingSide: Epoll.Events.writable.rawValue]
    }

    static func setLinger(_ fd: Int32, resetOnClose: Bool) {
        var l = linger(l_onoff: resetOnClose ? 1 : 0, l_linger: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
    }

    // MARK: - Stopping

    /// No new connect is redirected; connections already queued at a listener are taken
    /// and relayed like the rest; then the listeners close.
    private func beginDrain() {
        try? kernel.setRules([])
        for (netns, l) in listeners {
            kernel.removeListener(netns: netns)
            for fd in l.sockets { acceptAll(l, fd: fd) }
        }
        for fd in Array(inboundByFD.keys) { acceptInbound(fd) }
        closeInboundListeners()
        closeListeners()
        drainDeadline = ContinuousClock.now.advanced(by: options.drain)
        logger.info("relay: stopping", metadata: ["flows": "\(flowByCookie.count)", "drain_seconds": "\(options.drain.components.seconds)"])
    }

    /// At the drain deadline: each open direction gets what its socket holds now, then
    /// its FIN (the callouts see the end of both streams); a second at most to write it
    /// all out; what is still open then is reset (each side sees an error, never a
    /// silent truncation).
    private func finishAll() {
        finishing = true
        for flow in Array(flowByCookie.values) {
            guard flow.connected else { reset(flow); continue }
            drainFastPath(flow)
            for d in [StreamDirection.send, .receive] where !flow.readClosed[RelayedFlow.index(d)] {
                read(flow, d)
                guard flowByCookie[flow.cookie] === flow else { break }
                if !flow.readClosed[RelayedFlow.index(d)] {
                    flow.readClosed[RelayedFlow.index(d)] = true
                    flow.receivedFIN(d)
                }
            }
            update(flow)
        }
        let deadline = ContinuousClock.now.advanced(by: .seconds(1))
        while !flowByCookie.isEmpty && ContinuousClock.now < deadline {
            epoll.wait(milliseconds: 10) { fd, _ in
                if let flow = flowByFD[fd] { update(flow) }
            }
            for flow in Array(flowByCookie.values) { update(flow) }
        }
        for flow in Array(flowByCookie.values) { reset(flow) }
    }

    // MARK: - Metrics

    /// The relay's counters, for the agent's metrics and /v1/stats.
    public var reportedValues: [ReportedValue] {
        let c = counters, kernel = self.kernel
        let bytes = "Bytes through the stream relay, by hop."
        return [
            ReportedValue(metric: "relay_flows", unit: "total", help: "Connections the stream relay took.", kind: .counter,
                          statsField: "relayed_flows") { c.flows.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_active_flows", unit: "", help: "Connections relayed now.", kind: .gauge,
                          statsField: "active_relayed_flows") { [weak self] in UInt64(self?.activeFlows ?? 0) },
            ReportedValue(metric: "relay_bytes", unit: "total", help: bytes, labels: [("direction", "from_process")], kind: .counter) {
                c.bytesFromProcess.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_bytes", unit: "total", help: bytes, labels: [("direction", "to_peer")], kind: .counter) {
                c.bytesToPeer.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_bytes", unit: "total", help: bytes, labels: [("direction", "from_peer")], kind: .counter) {
                c.bytesFromPeer.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_bytes", unit: "total", help: bytes, labels: [("direction", "to_process")], kind: .counter) {
                c.bytesToProcess.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_resets", unit: "total", help: "Relayed connections ended by a reset (either side, a callout, or the stop deadline).",
                          kind: .counter, statsField: "relay_resets") { c.resets.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_connect_failures", unit: "total",
                          help: "Connects to an original destination that failed; the process's connection was reset.",
                          kind: .counter, statsField: "relay_connect_failures") { c.connectFailures.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_reset_bytes", unit: "total", help: "Bytes the relay held when their connection was reset.",
                          kind: .counter, statsField: "relay_reset_bytes") { c.bytesUndeliverable.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_redirected", unit: "total", help: "Connects the kernel redirected to the relay.",
                          kind: .counter) { kernel.redirectedCount },
            ReportedValue(metric: "relay_no_listener", unit: "total",
                          help: "Selected connects that went direct because their network namespace had no relay listener yet.",
                          kind: .counter, statsField: "relay_no_listener") { kernel.noListenerCount },
            ReportedValue(metric: "relay_unknown_connections", unit: "total",
                          help: "Connections to a relay listener that no connect hook sent there (reset).",
                          kind: .counter) { c.unknownConnections.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_over_limit", unit: "total", help: "Redirected connections reset because the relay was at max_flows.",
                          kind: .counter, statsField: "relay_over_limit") { c.overLimit.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_source_port_changed", unit: "total",
                          help: "Relayed connections whose peer saw another source port than the process's (that 4-tuple was in use).",
                          kind: .counter) { c.sourcePortChanged.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_handover_lost", unit: "total",
                          help: "Redirected connections whose hand-over entry could not be stored (reset at accept).",
                          kind: .counter) { kernel.handOverLostCount + kernel.storageFailedCount },
            ReportedValue(metric: "relay_inbound_redirected", unit: "total",
                          help: "Incoming connections an inbound rule gave to the relay instead of the server.",
                          kind: .counter, statsField: "relay_inbound_redirected") { kernel.inboundRedirectedCount },
            ReportedValue(metric: "relay_inbound_not_taken", unit: "total",
                          help: "Incoming connections an inbound rule selected that went to the server directly (no relay listener).",
                          kind: .counter) { kernel.inboundNotTakenCount },
            ReportedValue(metric: "relay_inbound_owner_unknown", unit: "total",
                          help: "Inbound relayed connections whose callouts began before the server's side was named (no process in their metadata).",
                          kind: .counter) { c.inboundOwnerUnknown.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_fast_path_flows", unit: "total",
                          help: "Relayed connections whose sockets went on the sockmap fast path (stream.fast_path: sockmap).",
                          kind: .counter, statsField: "relay_fast_path_flows") { c.fastPathFlows.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_fast_path_bytes", unit: "total",
                          help: "Bytes the kernel moved between the relay's sockets on the fast path (counted as each connection ends; also in relay_bytes_total).",
                          kind: .counter) { c.fastPathBytes.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_fast_path_holds", unit: "total",
                          help: "Times a fast-path direction was held because the kernel's queue toward its writer was over the limit.",
                          kind: .counter) { c.fastPathHolds.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_fast_path_refused", unit: "total",
                          help: "Connections the sockhash would not take (full, or a socket no longer established): copied, or reset if one of their sockets had gone in.",
                          kind: .counter) { c.fastPathRefused.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_inbound_namespaces", unit: "", help: "Network namespaces where inbound rules relay (each with its own sk_lookup program).",
                          kind: .gauge) { [weak self] in UInt64(self?.inboundCount.load(ordering: .relaxed) ?? 0) },
            ReportedValue(metric: "relay_listeners", unit: "", help: "Network namespaces with a relay listener.", kind: .gauge) { [weak self] in
                UInt64(self?.listenerCount.load(ordering: .relaxed) ?? 0) },
        ]
    }
    let listenerCount = Atomic<Int>(0)
}
