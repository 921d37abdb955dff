#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import CFlowTagBPF
import CLinuxCalls
import FlowContext
import FlowTagKernel
import Synchronization

/// What the relay hears of its flows from the kernel (translated from the flow monitor's
/// events about flows flagged FT_FLOW_RELAYED).
enum RelayKernelEvent: Sendable {
    case opened(slot: UInt32, record: FlowRecord)
    /// The process half-closed (its FIN went out).
    case finSent(cookie: UInt64)
    /// The peer half-closed (its FIN arrived).
    case finReceived(cookie: UInt64)
    case closed(cookie: UInt64, slot: UInt32, reason: String)

    init?(_ e: FlaggedFlowEvent) {
        switch e.kind {
        case .opened: self = .opened(slot: e.flow.relay_slot, record: e.record)
        case .closed(let reason): self = .closed(cookie: e.flow.cookie, slot: e.flow.relay_slot, reason: reason)
        case .stateChanged(_, .finWait1): self = .finSent(cookie: e.flow.cookie)
        case .stateChanged(_, .closeWait): self = .finReceived(cookie: e.flow.cookie)
        case .stateChanged: return nil
        }
    }
}

/// Counters of the stream relay (exported as metrics).
public final class RelayCounters: Sendable {
    public let flows = Atomic<UInt64>(0)
    public let bytesFromProcess = Atomic<UInt64>(0)
    public let bytesFromPeer = Atomic<UInt64>(0)
    public let bytesToPeer = Atomic<UInt64>(0)
    public let bytesToProcess = Atomic<UInt64>(0)
    public let closedOnStop = Atomic<UInt64>(0)
    /// Bytes the callouts let through that could not be delivered because the flow had
    /// ended first (a FIN or reset overtook them: docs/stream-relay.md).
    public let bytesUndeliverable = Atomic<UInt64>(0)
    /// Relayed flows reset because a hop of their relay broke (StreamRelay.hopBroke).
    public let brokenHops = Atomic<UInt64>(0)
    public init() {}
}

/// The user-space half of the stream relay (see docs/stream-relay.md).
///
/// The kernel puts a selected flow's socket in a sockhash with a pre-made slot: two
/// connected loopback sockets of the agent. What the process sends arrives on the slot's
/// send socket, what the peer sends on its receive socket; both pass through a
/// `StreamSession` with the configured callouts, and what survives is written back on the
/// same socket, which the kernel redirects to the flow's egress (send) or into the
/// process's receive queue (receive). One thread runs every relayed flow with epoll.
public final class StreamRelay: @unchecked Sendable {
    public let kernel: RelayKernel
    public let counters = RelayCounters()
    private let logger = Logger(label: "flowtagd.relay")
    private let processes: ProcessTable
    private let monitor: FlowMonitor
    private let callouts: [StreamCallout]
    private let poolSize: Int
    private let epoll: Epoll
    private let inbox = Mutex<[RelayKernelEvent]>([])
    private let stopping = Atomic<Bool>(false)
    private let done = DispatchSemaphore(value: 0)
    private var thread: Thread?

    // Relay-thread state.
    private var slots: [UInt32: RelaySlot] = [:]
    private var byFD: [Int32: (slot: UInt32, direction: StreamDirection)] = [:]
    private var byCookie: [UInt64: UInt32] = [:]
    /// The slots' ends in the sockhash, watched for errors only.
    private var kernelEnds: [Int32: UInt32] = [:]
    private var unusedNumbers: [UInt32]
    private var offered = 0
    private var buffer = [UInt8](repeating: 0, count: 1 << 16)

    /// How long the relay thread keeps polling after an event before it sleeps in epoll.
    static let busyPoll: Duration = .microseconds(50)

    /// Bytes read from an agent socket at a time.
    static let readSize = 1 << 16

    /// Output held for one direction before the relay stops reading that direction's input.
    static let pendingLimit = 4 << 20

    public init(programs: KernelPrograms, monitor: FlowMonitor, rules: [StreamRule], callouts: [StreamCallout], poolSize: Int = 32) throws {
        self.kernel = RelayKernel(programs: programs)
        self.processes = ProcessTable(programs: programs)
        self.monitor = monitor
        self.callouts = callouts
        self.poolSize = max(1, min(poolSize, Int(RelayKernel.maxSlots) / 2))
        unusedNumbers = Array((0..<RelayKernel.maxSlots).reversed())
        epoll = try Epoll()
        try kernel.reset()
        try kernel.openListener()
        for _ in 0..<self.poolSize { try makeAndOffer() }
        // Rules last: no flow is selected before the pool is ready.
        try kernel.setRules(rules)
        monitor.watch(flags: UInt8(FT_FLOW_RELAYED.rawValue)) { [weak self] e in
            if let event = RelayKernelEvent(e) { self?.handle(event) }
        }
    }

    /// Kernel events about relayed flows (from the flow monitor's thread).
    func handle(_ event: RelayKernelEvent) {
        inbox.withLock { $0.append(event) }
        epoll.wake()
    }

    public func start() {
        let t = Thread { [self] in
            // Relayed bytes wait for this thread: it runs ahead of ordinary processes so a
            // busy machine does not slow every relayed flow (needs CAP_SYS_NICE; else as is).
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(lc_gettid()), -10)
            run()
            done.signal()
        }
        t.name = "flowtag-relay"
        thread = t
        t.start()
    }

    /// Stops selecting flows, delivers what the callouts hold, then closes each relayed
    /// flow cleanly (shutdown: FIN to the peer, EOF to the process) and frees every slot.
    public func stop() {
        guard !stopping.exchange(true, ordering: .relaxed), thread != nil else { return }
        epoll.wake()
        done.wait()
    }

    /// Flows being relayed now.
    public var activeFlows: Int { activeCount.load(ordering: .relaxed) }

    /// The relay's counters, for the agent's metrics and /v1/stats.
    public var reportedValues: [ReportedValue] {
        let c = counters, kernel = self.kernel
        let bytes = "Bytes through the stream relay, by hop."
        return [
            ReportedValue(metric: "relay_flows", unit: "total", help: "Flows the stream relay took.", kind: .counter,
                          statsField: "relayed_flows") { c.flows.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_active_flows", unit: "", help: "Flows relayed now.", kind: .gauge,
                          statsField: "active_relayed_flows") { [weak self] in UInt64(self?.activeFlows ?? 0) },
            ReportedValue(metric: "relay_bytes", unit: "total", help: bytes, labels: [("direction", "from_process")], kind: .counter) {
                c.bytesFromProcess.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_bytes", unit: "total", help: bytes, labels: [("direction", "to_peer")], kind: .counter) {
                c.bytesToPeer.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_bytes", unit: "total", help: bytes, labels: [("direction", "from_peer")], kind: .counter) {
                c.bytesFromPeer.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_bytes", unit: "total", help: bytes, labels: [("direction", "to_process")], kind: .counter) {
                c.bytesToProcess.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_undeliverable_bytes", unit: "total",
                          help: "Relayed bytes dropped because their flow ended first (a FIN or reset overtook them).",
                          kind: .counter, statsField: "relay_bytes_undeliverable") { c.bytesUndeliverable.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_hop_failures", unit: "total",
                          help: "Relayed flows reset because a hop of their relay failed (the kernel dropped their bytes).",
                          kind: .counter, statsField: "relay_hop_failures") { c.brokenHops.load(ordering: .relaxed) },
            ReportedValue(metric: "relay_retransmit_trims", unit: "total",
                          help: "Relayed segments whose head had already been received (a partial retransmission), cut before relaying.",
                          kind: .counter) { kernel.retransmitTrimCount },
            ReportedValue(metric: "relay_pool_empty", unit: "total", help: "Selected flows left direct because no relay slot was free.",
                          kind: .counter, statsField: "relay_pool_empty") { kernel.poolEmptyCount },
        ]
    }

    /// The record of a flow being relayed (for reports about it, e.g. captures).
    public func record(flow: UInt64) -> FlowRecord? { records.withLock { $0[flow] } }
    private let records = Mutex<[UInt64: FlowRecord]>([:])
    private let activeCount = Atomic<Int>(0)

    // MARK: - Relay thread

    private func run() {
        var lastBusy = ContinuousClock.now
        while !stopping.load(ordering: .relaxed) {
            let waiting = slots.values.contains { $0.hasPendingOutput || $0.isPaused }
            // Busy-poll briefly after activity: the answer to what was just relayed often
            // comes within tens of µs, and a sleeping thread's wake-up costs about that.
            let spinning = ContinuousClock.now - lastBusy < Self.busyPoll
            let n = epoll.wait(milliseconds: spinning ? 0 : waiting ? 1 : 100) { fd, events in
                if let number = kernelEnds[fd] {
                    if let s = slots[number] { hopBroke(s, why: "its kernel end: \(Self.socketError(fd))") }
                    return
                }
                if events.contains(.writable), let (number, _) = byFD[fd], let s = slots[number] { flush(s) }
                if !events.subtracting(.writable).isEmpty { readable(fd) }
            }
            if n > 0 { lastBusy = ContinuousClock.now }
            processInbox()
            // Also slots whose input is paused: their output may have drained meanwhile
            // (sessions deliver, and write, from inside indicate).
            for s in slots.values where s.hasPendingOutput || s.isPaused { flush(s) }
            for s in slots.values where s.session != nil && !s.hopBroken && (s.awaitingDrain || s.injectedSinceCheck >= Self.unreadCheckBytes) {
                boundUnread(s)
            }
            replenish()
        }
        shutdownAll()
    }

    private func processInbox() {
        let events = inbox.withLock { box -> [RelayKernelEvent] in
            let e = box
            box.removeAll()
            return e
        }
        for e in events {
            log("event \(e)")
            switch e {
            case .opened(let slot, let record):
                guard let s = slots[slot] else { continue }
                if let session = s.session {
                    if session.flow.cookie == record.flow {
                        session.metadata = Self.metadata(record)
                        s.ownerPID = record.process.pid // the accepting process, once known
                        records.withLock { $0[record.flow] = record }
                    }
                } else {
                    bind(s, record: record)
                }
            case .finSent(let cookie):
                guard let s = slot(cookie) else { continue }
                drain(s, .send)
                if !s.finIndicated[0] { s.finIndicated[0] = true; s.session?.indicate([], direction: .send, flags: .disconnect) }
            case .finReceived(let cookie):
                guard let s = slot(cookie) else { continue }
                drain(s, .receive)
                if !s.finIndicated[1] { s.finIndicated[1] = true; s.session?.indicate([], direction: .receive, flags: .disconnect) }
            case .closed(let cookie, let slotNumber, let reason):
                guard let s = slots[slotNumber], s.session == nil || s.session?.flow.cookie == cookie else { continue }
                if s.session == nil, let entry = kernel.slotEntry(slotNumber), entry.appCookie == cookie {
                    bindFromKernel(s) // closed before its first byte or its open was seen
                }
                drain(s, .send)
                drain(s, .receive)
                s.flowEnded = true
                if reason == "reset" {
                    s.session?.abort()
                } else {
                    for (i, d) in [StreamDirection.send, .receive].enumerated() where !s.finIndicated[i] {
                        s.finIndicated[i] = true
                        s.session?.indicate([], direction: d, flags: .disconnect)
                    }
                }
                retire(s)
            }
        }
    }

    private func slot(_ cookie: UInt64) -> RelaySlot? { byCookie[cookie].flatMap { slots[$0] } }

    func log(_ s: @autoclosure () -> String) { logger.trace("\(s())") }

    private func readable(_ fd: Int32) {
        guard let (number, direction) = byFD[fd], let s = slots[number] else { return }
        if s.session == nil { bindFromKernel(s) }
        guard s.session != nil else {
            // Bytes on a slot no flow holds: nothing may forward them.
            let n = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
            if n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) { retire(s) } // a broken spare: make a new one
            return
        }
        read(s, direction, rounds: 16)
        if s.hasPendingOutput { updateInterest(s) }
    }

    /// Reads what waits on one direction (up to `rounds` buffers) into the session.
    private func read(_ s: RelaySlot, _ direction: StreamDirection, rounds: Int) {
        let fd = direction == .send ? s.sendFD : s.receiveFD
        for _ in 0..<rounds {
            if s.pendingCount(direction) > Self.pendingLimit {
                setReading(s, direction, false)
                return
            }
            // Received straight into the array the session takes (no copy from a scratch
            // buffer); the stream engine passes whole arrays on without copying either.
            var n = 0, err: Int32 = 0
            let bytes = [UInt8](unsafeUninitializedCapacity: Self.readSize) { buf, count in
                n = recv(fd, buf.baseAddress, buf.count, Int32(MSG_DONTWAIT))
                err = n < 0 ? errno : 0
                count = max(n, 0)
            }
            log("slot \(s.number) \(direction) read \(n) errno \(err)")
            if n > 0 {
                if direction == .send { counters.bytesFromProcess.add(UInt64(n), ordering: .relaxed) }
                else { counters.bytesFromPeer.add(UInt64(n), ordering: .relaxed); s.bytesFromPeer += UInt64(n) }
                s.session?.indicate(bytes, direction: direction)
            } else {
                // The kernel end never closes while the agent lives: EOF or an error
                // here means the hop is broken, not that the flow ended.
                if n == 0 || (err != EAGAIN && err != EINTR) {
                    hopBroke(s, why: "its agent end (\(direction)): \(n == 0 ? "end of file" : String(cString: strerror(err)))")
                }
                return
            }
        }
    }

    /// A hop of the slot failed: the psock worker reported an error for what it puts into
    /// the agent's end (the socket's error), or a slot connection broke (an end of file).
    /// Bytes the process's socket has already acknowledged to the peer may be gone, so the
    /// flow cannot go on intact: it is reset (RST to the peer, an error to the process,
    /// abort to the callouts), logged and counted, instead of hanging.
    private func hopBroke(_ s: RelaySlot, why: String) {
        // Its sockets keep reporting the error or EOF: stop watching them.
        for fd in [s.sendFD, s.receiveFD] + s.sockets.kernelFDs {
            epoll.remove(fd)
            interest.removeValue(forKey: fd)
        }
        guard !s.hopBroken else { return }
        s.hopBroken = true
        guard let c = s.session?.flow.cookie else { retire(s); return } // a spare: make a new one
        counters.brokenHops.add(1, ordering: .relaxed)
        let alreadyEnded = s.flowEnded
        let how = alreadyEnded ? nil : AppSocket.reset(records.withLock { $0[c] }, pid: s.ownerPID, cookie: c)
        let outcome = alreadyEnded ? "the flow had already closed"
            : how.map { "the flow is reset (\($0))" } ?? "the flow's socket was not found to reset it: returned to direct mode, bytes may be missing"
        logger.error("relay: a relay hop broke; \(outcome)", metadata: ["flow": "\(c)", "pid": "\(s.ownerPID)", "why": "\(why)"])
        s.flowEnded = true
        s.session?.abort()
        if !alreadyEnded && how == nil { kernel.setSlot(s.number, .direct) }
        // Reset: the kernel reports the close, which retires the slot; the rest at once.
        if alreadyEnded || how == nil { retire(s) }
    }

    static func socketError(_ fd: Int32) -> String {
        var err: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 else { return "SO_ERROR: \(String(cString: strerror(errno)))" }
        return err == 0 ? "hung up" : String(cString: strerror(err))
    }

    /// Everything already relayed into the agent for one direction.
    private func drain(_ s: RelaySlot, _ direction: StreamDirection) {
        read(s, direction, rounds: Int.max)
    }

    private func flush(_ s: RelaySlot) {
        for d in [StreamDirection.send, .receive] {
            _ = s.flush(d)
            if !s.readingEnabled(d) && s.pendingCount(d) < Self.pendingLimit / 2 && !(d == .receive && s.awaitingDrain) {
                s.setReadingEnabled(d, true)
            }
        }
        updateInterest(s)
    }

    /// The receive direction's last hop puts bytes straight into the process's receive
    /// queue, which has no limit of its own: past its receive buffer (at least
    /// `unreadLimit`) of bytes the process has not read (FIONREAD through its own fd,
    /// pidfd_getfd), the relay stops reading that direction, so TCP holds the peer back,
    /// until the process has read three quarters of it.
    static let unreadCheckBytes = 1 << 20
    static let unreadLimit = 4 << 20

    private func boundUnread(_ s: RelaySlot) {
        guard let c = s.session?.flow.cookie else { return }
        var unread = s.ownerPID == 0 ? nil : AppSocket.unreadBytes(pid: s.ownerPID, cookie: c, hint: &s.appFDHint)
        if unread == nil, s.ownerPID != 0, !s.reportedLiveOwnerFailure, AppSocket.isRunning(pid: s.ownerPID) {
            // A running owner whose socket cannot be reached: say exactly what failed, once
            // per flow (the one case seen was a zombie, now counted as gone).
            s.reportedLiveOwnerFailure = true
            logger.warning("relay: the owner is alive but its socket was not reached",
                           metadata: ["flow": "\(c)", "pid": "\(s.ownerPID)", "why": "\(AppSocket.whyUnreachable(pid: s.ownerPID, cookie: c))"])
        }
        if unread == nil, let (_, record) = kernel.liveRelayedFlow(cookie: c, processes: processes), record.process.pid != 0, record.process.pid != s.ownerPID,
           AppSocket.isRunning(pid: record.process.pid) {
            // The socket changed hands (fd passing, the process that accepted): follow it.
            s.ownerPID = record.process.pid
            s.appFDHint = nil
            unread = AppSocket.unreadBytes(pid: s.ownerPID, cookie: c, hint: &s.appFDHint)
        }
        if unread == nil, let (pid, fd) = searchHolder(s, cookie: c) {
            // Handed to a process the kernel's stamp does not name (the one that connected
            // passed its fd on, and may have exited).
            logger.notice("relay: the socket moved to another process", metadata: ["flow": "\(c)", "pid": "\(s.ownerPID)", "to_pid": "\(pid)"])
            s.reportedUnreachable = false
            s.ownerPID = pid
            s.appFDHint = fd
            unread = AppSocket.unreadBytes(pid: pid, cookie: c, hint: &s.appFDHint)
        }
        guard let unread else {
            if !s.reportedUnreachable {
                s.reportedUnreachable = true
                let gone = !AppSocket.isRunning(pid: s.ownerPID)
                logger.warning("relay: the owner's socket is not reachable; delivering at most \(Self.unreadLimit >> 20) MiB per \(Self.blindPause) to it",
                               metadata: ["flow": "\(c)", "pid": "\(s.ownerPID)", "exited": "\(gone)", "inode": "\(s.appInode.map(String.init) ?? "not found")"])
            }
            boundBlind(s)
            return
        }
        log("slot \(s.number) unread \(unread) injected \(s.injectedSinceCheck) awaiting \(s.awaitingDrain)")
        s.blindSince = nil
        // At least the process's own receive buffer: the bytes waiting there count against
        // it, so once they fill it the socket's TCP window closes and the peer is held
        // back by TCP itself. Stopping earlier kept that window open when the kernel had
        // grown the buffer (autotuning, up to tcp_rmem's maximum): the peer went on
        // sending into the relay's kernel queue, which nothing bounds (a loaded run
        // pushed all 128 MiB at a sleeping reader). A direct socket holds as much.
        let limit = max(Self.unreadLimit, unread.receiveBuffer)
        if unread.unread >= limit {
            if !s.awaitingDrain { s.awaitingDrain = true; setReading(s, .receive, false) }
        } else if s.awaitingDrain {
            if unread.unread < limit / 4 { s.awaitingDrain = false; s.resetInjected(); setReading(s, .receive, true) }
        } else {
            s.resetInjected()
        }
    }

    /// Whoever holds the flow's socket now, found by its inode (from the socket table,
    /// sock_diag) in every process's fds (AppSocket.holder). The search walks all of
    /// /proc on the relay thread, so a flow that found nobody waits before the next one:
    /// 50 ms, doubling up to 5 s (a socket in flight between processes, inside an
    /// SCM_RIGHTS message, is held by nobody for a moment).
    private func searchHolder(_ s: RelaySlot, cookie c: UInt64) -> (pid: UInt32, fd: Int32)? {
        let now = ContinuousClock.now
        if let next = s.nextHolderSearch, now < next { return nil }
        if s.appInode == nil, let record = records.withLock({ $0[c] }) { s.appInode = AppSocket.inode(record) }
        if let inode = s.appInode, let holder = AppSocket.holder(inode: inode, cookie: c) {
            s.holderSearchWait = .zero
            s.nextHolderSearch = nil
            return holder
        }
        s.holderSearchWait = min(max(s.holderSearchWait * 2, .milliseconds(50)), .seconds(5))
        s.nextHolderSearch = now + s.holderSearchWait
        return nil
    }

    /// When the process's unread bytes cannot be read, delivery is paced instead of
    /// unbounded: an unbounded receive queue grew until the kernel's socket memory ran
    /// short, and the relay's own kernel hop then lost bytes (a stalled flow).
    static let blindPause = Duration.milliseconds(100)

    private func boundBlind(_ s: RelaySlot) {
        let now = ContinuousClock.now
        if s.awaitingDrain {
            if let since = s.blindSince, now - since < Self.blindPause { return }
            s.awaitingDrain = false
            s.blindSince = nil
            s.resetInjected()
            setReading(s, .receive, true)
        } else if s.injectedSinceCheck >= Self.unreadLimit {
            s.awaitingDrain = true
            s.blindSince = now
            setReading(s, .receive, false)
        }
    }

    /// epoll interest per agent socket: input unless paused.
    private var interest: [Int32: UInt32] = [:]
    private func updateInterest(_ s: RelaySlot) {
        guard !s.hopBroken else { return } // no longer watched
        for d in [StreamDirection.send, .receive] {
            let fd = d == .send ? s.sendFD : s.receiveFD
            // Writes of both directions land in the app socket (its send buffer, or its
            // receive queue through R'), whose room epoll cannot watch through the
            // agent's own socket: that one is always writable, and waiting for EPOLLOUT
            // on it spun. What could not be written is retried on the loop's 1 ms tick.
            let want: UInt32 = s.readingEnabled(d) ? Epoll.Events.readable.rawValue : 0
            if interest[fd] != want {
                epoll.change(fd, to: Epoll.Events(rawValue: want))
                interest[fd] = want
            }
        }
    }

    private func bindFromKernel(_ s: RelaySlot) {
        guard let entry = kernel.slotEntry(s.number), entry.active, entry.appCookie != 0 else { return }
        if let (slot, record) = kernel.liveRelayedFlow(cookie: entry.appCookie, processes: processes), slot == s.number {
            bind(s, record: record)
        } else {
            // The flow map entry is gone (closed already): relay with the cookie alone.
            bind(s, record: nil, cookie: entry.appCookie)
        }
    }

    private func bind(_ s: RelaySlot, record: FlowRecord?, cookie: UInt64? = nil) {
        guard let c = record?.flow ?? cookie else { return }
        let meta = record.map(Self.metadata) ?? Metadata(flow: FlowHandle(cookie: c), processID: 0, processPath: "")
        s.ownerPID = record?.process.pid ?? 0
        s.session = StreamSession(flow: FlowHandle(cookie: c, netns: record?.netns ?? 0), metadata: meta, callouts: callouts, sink: s)
        byCookie[c] = s.number
        if let record { records.withLock { $0[c] = record } }
        offered -= 1
        counters.flows.add(1, ordering: .relaxed)
        activeCount.add(1, ordering: .relaxed)
    }

    static func metadata(_ r: FlowRecord) -> Metadata {
        Metadata(flow: FlowHandle(cookie: r.flow, netns: r.netns), processID: r.process.pid, threadID: r.process.tid,
                 processPath: r.process.exe, userID: r.process.uid, cgroupID: r.process.cgroup)
    }

    /// The flow is gone: its slot's sockets are closed (which takes them out of the
    /// sockhash) and the slot number is reused for a fresh pair.
    private func retire(_ s: RelaySlot) {
        if let c = s.session?.flow.cookie {
            byCookie.removeValue(forKey: c)
            records.withLock { _ = $0.removeValue(forKey: c) }
        }
        if s.session != nil { activeCount.subtract(1, ordering: .relaxed) } else { offered -= 1 }
        for fd in [s.sendFD, s.receiveFD] + s.sockets.kernelFDs {
            epoll.remove(fd)
            byFD.removeValue(forKey: fd)
            kernelEnds.removeValue(forKey: fd)
            interest.removeValue(forKey: fd)
        }
        s.closed()
        kernel.destroy(s.sockets)
        slots.removeValue(forKey: s.number)
        kernel.setSlot(s.number, .free)
        unusedNumbers.append(s.number)
    }

    /// Keeps `poolSize` slots offered to the kernel.
    private func replenish() {
        while offered < poolSize && !unusedNumbers.isEmpty {
            do { try makeAndOffer() } catch {
                logger.error("relay pool: \(error)")
                return
            }
        }
    }

    private func makeAndOffer() throws {
        guard let number = unusedNumbers.popLast() else { return }
        do {
            let sockets = try kernel.makeSlot(number)
            let s = RelaySlot(sockets, counters: counters)
            slots[number] = s
            byFD[s.sendFD] = (number, .send)
            byFD[s.receiveFD] = (number, .receive)
            add(s.sendFD)
            add(s.receiveFD)
            for fd in sockets.kernelFDs {
                epoll.add(fd, for: []) // errors and hang-ups only: always reported
                kernelEnds[fd] = number
            }
            try kernel.offer(number)
            offered += 1
        } catch {
            unusedNumbers.append(number)
            throw error
        }
    }

    private func add(_ fd: Int32) {
        epoll.add(fd, for: .readable)
        interest[fd] = Epoll.Events.readable.rawValue
    }

    private func setReading(_ s: RelaySlot, _ d: StreamDirection, _ on: Bool) {
        s.setReadingEnabled(d, on)
        updateInterest(s)
    }

    /// Orderly stop: no new selections; then each relayed flow is closed the way TCP
    /// closes. First the process's side: what it sent is delivered, then the peer gets a
    /// FIN (shutdown(SHUT_WR) through the process's fd). Then the peer's side: what it
    /// still sends is relayed until its FIN came and every byte before the FIN reached
    /// the process, which then reads EOF. Shutting the read side at once instead made
    /// the process's socket answer the peer's last bytes with a reset. Both phases
    /// together are bounded by 2 s; flows still open then are shut for reading too.
    private func shutdownAll() {
        try? kernel.setRules([])
        kernel.withdrawPool()
        processInbox()
        let deadline = ContinuousClock.now.advanced(by: .seconds(2))
        var closing: [RelaySlot] = []
        for s in Array(slots.values) {
            guard let c = s.session?.flow.cookie, !s.flowEnded else { retire(s); continue }
            // Still relayed while it drains, so no byte of the process overtakes what the
            // agent holds; then FIN after the last delivered byte.
            drain(s, .send)
            while s.pendingCount(.send) > 0 && ContinuousClock.now < deadline {
                flush(s)
                if s.pendingCount(.send) > 0 { usleep(1000) }
            }
            if s.ownerPID != 0, AppSocket.shutdown(pid: s.ownerPID, cookie: c, how: Int32(SHUT_WR)) {
                counters.closedOnStop.add(1, ordering: .relaxed)
                closing.append(s)
            } else {
                kernel.setSlot(s.number, .direct) // no owner to close it through: direct mode
                s.flowEnded = true
                retire(s)
            }
        }
        var open = closing
        while !open.isEmpty && ContinuousClock.now < deadline {
            open.removeAll { s in
                drain(s, .receive)
                flush(s)
                guard !s.hasPendingOutput, let c = s.session?.flow.cookie else { return false }
                guard let p = AppSocket.peerProgress(pid: s.ownerPID, cookie: c, hint: &s.appFDHint) else {
                    return true // the socket is gone: nothing left to deliver to
                }
                return p.peerFinished && s.bytesFromPeer >= p.bytesReceived
            }
            if !open.isEmpty { usleep(1000) }
        }
        for s in closing {
            if open.contains(where: { $0 === s }), let c = s.session?.flow.cookie {
                AppSocket.shutdown(pid: s.ownerPID, cookie: c, how: Int32(SHUT_RDWR))
            }
            s.flowEnded = true
            retire(s)
        }
    }
}

/// One slot: its two sockets, the session of the flow that holds it, and the output
/// waiting to be written (sessions may deliver from callout threads: output is locked).
final class RelaySlot: StreamSink, @unchecked Sendable {
    let sockets: RelaySlotSockets
    var number: UInt32 { sockets.slot }
    var sendFD: Int32 { sockets.sendFD }
    var receiveFD: Int32 { sockets.receiveFD }
    var session: StreamSession?
    var ownerPID: UInt32 = 0
    var finIndicated = [false, false]
    /// The kernel reported the flow closed, or the agent reset it: nothing to shut any more.
    var flowEnded = false
    /// A hop of this slot broke (StreamRelay.hopBroke): handled once.
    var hopBroken = false
    /// Relay-thread state of the unread bound (see StreamRelay.boundUnread).
    var awaitingDrain = false
    var appFDHint: Int32?
    var reportedUnreachable = false
    var reportedLiveOwnerFailure = false
    /// The process's socket's inode (AppSocket.holder) and when to search for it again.
    var appInode: UInt64?
    var nextHolderSearch: ContinuousClock.Instant?
    var holderSearchWait = Duration.zero
    /// Since when delivery waits because the owner's unread bytes could not be read.
    var blindSince: ContinuousClock.Instant?
    /// Bytes read from the peer's direction (relay thread), compared with what the
    /// process's socket received when the agent stops.
    var bytesFromPeer: UInt64 = 0
    var injectedSinceCheck: Int { output.withLock { $0.injected } }
    func resetInjected() { output.withLock { $0.injected = 0 } }
    private let output = Mutex<Output>(Output())

    struct Output {
        var pending: [[UInt8]] = [[], []]
        var reading = [true, true]
        var closed = false
        /// A writer thread owns the send direction's output.
        var writerActive = false
        /// Receive-direction bytes written since the unread bound last looked.
        var injected = 0
    }

    let counters: RelayCounters
    init(_ sockets: RelaySlotSockets, counters: RelayCounters) { self.sockets = sockets; self.counters = counters }

    private static func index(_ d: StreamDirection) -> Int { d == .send ? 0 : 1 }

    var hasPendingOutput: Bool { output.withLock { !$0.pending[0].isEmpty || !$0.pending[1].isEmpty || $0.writerActive } }
    func pendingCount(_ d: StreamDirection) -> Int { output.withLock { $0.pending[Self.index(d)].count + (d == .send && $0.writerActive ? 1 : 0) } }
    var isPaused: Bool { output.withLock { !$0.reading[0] || !$0.reading[1] } }
    func readingEnabled(_ d: StreamDirection) -> Bool { output.withLock { $0.reading[Self.index(d)] } }
    func setReadingEnabled(_ d: StreamDirection, _ on: Bool) { output.withLock { $0.reading[Self.index(d)] = on } }
    func closed() {
        output.withLock { o in
            counters.bytesUndeliverable.add(UInt64(o.pending[0].count + o.pending[1].count), ordering: .relaxed)
            o.closed = true
            o.pending = [[], []]
        }
    }

    // StreamSink
    func deliver(_ bytes: [UInt8], direction: StreamDirection) {
        output.withLock { o in
            guard !o.closed else { return }
            let i = Self.index(direction)
            if o.pending[i].isEmpty && !(direction == .send && o.writerActive) {
                // Nothing waits before these bytes: they are written from where they are,
                // and only what the socket does not take is kept (one copy fewer).
                o.pending[i] = bytes
            } else {
                o.pending[i].append(contentsOf: bytes)
            }
        }
        _ = flush(direction)
    }

    /// The kernel carried the FIN itself (it is a TCP state, not data): nothing to write.
    func disconnect(direction: StreamDirection) {}

    /// A terminating callout dropped the connection: both directions are shut.
    func abort() {
        output.withLock { $0.pending = [[], []] }
        if let c = session?.flow.cookie, ownerPID != 0, !flowEnded { AppSocket.shutdown(pid: ownerPID, cookie: c) }
    }

    /// Writes what it can of one direction without blocking; returns the bytes written.
    /// Send-direction bytes leave by the app socket: when it is full the rest is handed
    /// to a writer thread that blocks on it (the kernel wakes it when there is room),
    /// keeping order, since no other write of that direction happens meanwhile.
    func flush(_ d: StreamDirection) -> Int {
        let fd = d == .send ? sendFD : receiveFD
        var handOff = false
        let written = output.withLock { o -> Int in
            let i = Self.index(d)
            guard !o.closed, !o.pending[i].isEmpty, !(d == .send && o.writerActive) else { return 0 }
            var total = 0
            while total < o.pending[i].count {
                let n = o.pending[i].withUnsafeBytes { buf in
                    send(fd, buf.baseAddress! + total, buf.count - total, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL))
                }
                if n <= 0 {
                    if n < 0 && errno != EAGAIN && errno != EINTR && errno != ENOMEM && errno != ENOBUFS {
                        // The flow is gone (EPIPE, EACCES): nothing can take these bytes.
                        counters.bytesUndeliverable.add(UInt64(o.pending[i].count - total), ordering: .relaxed)
                        o.pending[i].removeAll()
                        return total
                    }
                    break
                }
                total += n
            }
            if total == o.pending[i].count { o.pending[i] = [] } else { o.pending[i].removeFirst(total) }
            if d == .receive { o.injected += total }
            if total > 0 { if d == .send { counters.bytesToPeer.add(UInt64(total), ordering: .relaxed) } else { counters.bytesToProcess.add(UInt64(total), ordering: .relaxed) } }
            if d == .send && !o.pending[i].isEmpty {
                o.writerActive = true
                handOff = true
            }
            return total
        }
        if handOff {
            let t = Thread { [self] in blockingSendWriter() }
            t.name = "flowtag-relay-writer"
            t.start()
        }
        return written
    }

    /// Blocking writes of the send direction until nothing waits (or the flow is gone).
    private func blockingSendWriter() {
        while true {
            let chunk: [UInt8]? = output.withLock { o in
                if o.closed || o.pending[0].isEmpty { o.writerActive = false; return nil }
                let c = o.pending[0]
                o.pending[0].removeAll(keepingCapacity: true)
                return c
            }
            guard let chunk else { return }
            var total = 0
            while total < chunk.count {
                let n = chunk.withUnsafeBytes { send(sendFD, $0.baseAddress! + total, $0.count - total, Int32(MSG_NOSIGNAL)) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 {
                    let left = output.withLock { o -> Int in
                        defer { o.pending[0].removeAll(); o.writerActive = false }
                        return o.pending[0].count
                    }
                    counters.bytesUndeliverable.add(UInt64(chunk.count - total + left), ordering: .relaxed)
                    return // the flow is gone
                }
                total += n
            }
            counters.bytesToPeer.add(UInt64(total), ordering: .relaxed)
        }
    }

    var writerActive: Bool { output.withLock { $0.writerActive } }

}
