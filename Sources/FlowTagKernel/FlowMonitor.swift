#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import FlowTagCore
import Foundation
import Synchronization

/// Turns the kernel's ring-buffer records into `FlowEvent`s with the owner resolved,
/// ends UDP flows (socket released, or idle for `udpIdleTimeout`), and reports every
/// close exactly once, also across a crash or a ring-buffer overflow (`PendingCloses`).
///
/// It runs on a thread of its own (ring-buffer polling blocks); events reach Swift
/// concurrency through `events`, an `AsyncStream` that ends when `stop()` is called.
public final class FlowMonitor: @unchecked Sendable {
    public let programs: KernelPrograms
    public let events: FlowEvents
    public var udpIdleTimeout: Duration
    /// Events cross to the consumer in batches (one per ring-buffer poll): a hand-off per
    /// event cost more than the event (B3 profile).
    private let continuation: AsyncStream<[FlowEvent]>.Continuation
    private let bufferLimit: Int
    private var batch: [FlowEvent] = []
    private let queued = EventCounter()

    /// When set (before `start()`): TCP connections already open in this cgroup subtree are
    /// reported at start (attribution `seeded`) and followed with sock_diag until they end.
    public var seedExistingFlows: String?

    /// Events handed to `events` and not yet taken by its consumer.
    public var pendingEvents: Int { queued.value.load(ordering: .relaxed) }
    private let processes: ProcessTable
    private let pending: PendingCloses
    private let stopping = Atomic<Bool>(false)
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)
    /// Live flows the kernel's maps held at `start()` (the caller adopts them).
    public private(set) var initialLiveRecords: [FlowRecord] = []
    /// Closes a previous agent left unjournaled, reported at `start()`.
    public private(set) var recoveredCloses = 0
    private let counters = MonitorCounters()
    // Poll-thread state.
    private var lostSeen: UInt64 = 0
    private var lastLossCheck: UInt64 = 0
    /// Set when this agent dropped events itself: reconcile at the next check.
    private var mustReconcile = false
    private var udpByCookie: [UInt64: Set<UDPKey>] = [:]
    private var seededTCP: [UInt64: FlowRecord] = [:]
    private var lastSeededScan: UInt64 = 0
    /// How often flows found at start are checked for their end.
    static let seededScanNanoseconds: UInt64 = 2_000_000_000
    private var lastIdleScan: UInt64 = 0

    /// The kernel wakes the reader only for large batches (a wakeup per event costs more
    /// than the event), so the reader also looks every few milliseconds.
    static let pollMilliseconds: Int32 = 20

    public init(programs: KernelPrograms, udpIdleTimeout: Duration = .seconds(60), bufferLimit: Int = 1 << 20) {
        self.programs = programs
        self.udpIdleTimeout = udpIdleTimeout
        self.processes = ProcessTable(programs: programs)
        pending = PendingCloses(programs: programs)
        let (stream, continuation) = AsyncStream.makeStream(of: [FlowEvent].self, bufferingPolicy: .unbounded)
        self.continuation = continuation
        self.bufferLimit = bufferLimit
        events = FlowEvents(base: stream, counter: queued)
    }

    /// Seeds the process table from /proc (after attach), reports the closes a previous
    /// agent left unjournaled, and starts reading events.
    public func start() throws {
        processes.seedFromProc()
        lostSeen = programs.lostEvents
        let entries = programs.tcpEntries()
        recoverPending(entries)
        if let cgroup = seedExistingFlows {
            let known = Set(entries.map(\.flow.cookie))
            let now = BootClock.nowNanoseconds()
            for (_, record) in (try? ExistingFlows.find(cgroup: cgroup, known: known, processes: processes)) ?? [] {
                seededTCP[record.flow] = record
                emit(FlowEvent(kind: .open, time: WallTime(bootNanoseconds: now), record: record))
            }
            lastSeededScan = now
        }
        flushBatch()
        let ctx = Unmanaged.passUnretained(self).toOpaque()
        let rc = programs.openEvents({ ctx, data, len in
            guard let ctx, let data else { return 0 }
            let monitor = Unmanaged<FlowMonitor>.fromOpaque(ctx).takeUnretainedValue()
            monitor.handle(data, len)
            return 0
        }, context: ctx)
        guard rc == 0 else { throw KernelError.system("open ring buffer", -rc) }
        let t = Thread { [self] in
            while !stopping.load(ordering: .relaxed) {
                let n = programs.pollEvents(timeoutMilliseconds: Self.pollMilliseconds)
                if n < 0 && n != -EINTR { break }
                reconcileAfterLoss()
                expireIdleUDP()
                followSeededTCP()
                flushBatch()
                pending.deleteReleased()
            }
            _ = programs.pollEvents(timeoutMilliseconds: 0) // drain what is left
            flushBatch()
            pending.deleteReleased()
            continuation.finish()
            done.signal()
        }
        t.name = "flowtag-events"
        thread = t
        t.start()
    }

    /// Stops reading, drains the ring buffer and ends `events`. Idempotent.
    public func stop() {
        let wasStopped = stopping.exchange(true, ordering: .relaxed)
        guard !wasStopped, thread != nil else { return }
        done.wait()
    }

    /// Gives back closes the journal now holds (or that need not be kept): their kernel
    /// copies are deleted by the poll thread. Any thread.
    public func release(_ receipts: [CloseReceipt]) { pending.release(receipts) }

    /// Closes released whose kernel copies are still waiting to be deleted.
    public var pendingReleases: Int { pending.waitingRelease }

    /// What went wrong and was recovered, as counters (stats and metrics).
    public var health: MonitorHealth {
        MonitorHealth(eventsDroppedInAgent: counters.droppedEvents.load(ordering: .relaxed),
                      outboxFull: pending.outboxFull.load(ordering: .relaxed),
                      reconciliations: counters.reconciled.load(ordering: .relaxed),
                      reconciledFlows: counters.reconciledFlows.load(ordering: .relaxed),
                      recoveredCloses: recoveredCloses)
    }

    // MARK: - Recovery

    /// The closes pinned maps hold that no journal has (their agent died), read without
    /// taking the maps over: for pins about to be replaced (another cgroup).
    public static func unjournaledCloses(in programs: KernelPrograms) -> [FlowRecord] {
        let processes = ProcessTable(programs: programs)
        var out: [FlowRecord] = []
        for e in programs.tcpEntries() where e.flow.flags & UInt8(FT_FLOW_CLOSED.rawValue) != 0 {
            var r = FlowRecordBuilder.record(e.flow, processes: processes)
            applyClose(e.stats, at: e.closed_ns, to: &r)
            out.append(r)
        }
        for (_, ev) in programs.outboxEntries() {
            var r = FlowRecordBuilder.record(ev.flow, processes: processes)
            applyClose(ev.stats, at: ev.time_ns, to: &r)
            if let reason = outboxReason(ev.close_reason) { r.closeReason = reason }
            out.append(r)
        }
        return out
    }

    /// Closes a previous agent reported but did not journal (kill -9): the TCP map's
    /// closed entries and the outbox, reported first; live flows are kept for adoption.
    private func recoverPending(_ entries: [ft_tcp_entry]) {
        var live: [FlowRecord] = []
        for e in entries {
            if e.flow.flags & UInt8(FT_FLOW_CLOSED.rawValue) != 0 {
                _ = pending.closes(e.flow)
                emitClose(e.flow, e.stats, at: e.closed_ns)
                recoveredCloses += 1
            } else {
                if e.flow.flags & UInt8(FT_FLOW_PENDING_ACCEPT.rawValue) == 0 { pending.adopting(e.flow) }
                live.append(makeRecord(e.flow))
            }
        }
        for (key, ev) in programs.outboxEntries() {
            pending.reporting(outboxKey: key, ev)
            emitOutboxClose(key, ev)
            recoveredCloses += 1
        }
        for (_, u) in programs.liveUDPFlows() {
            var r = makeRecord(u.flow)
            r.bytesSent = u.bytes_sent
            r.bytesReceived = u.bytes_received
            live.append(r)
            udpByCookie[u.flow.cookie, default: []].insert(UDPKey(u.flow))
        }
        initialLiveRecords = live
    }

    /// After lost events (the ring buffer was full: the agent stopped or too slow, or this
    /// agent dropped a batch itself) the kernel's maps are the truth: closes never
    /// reported come from their closed entries and the outbox, opens from live entries.
    /// Checked once a second.
    private func reconcileAfterLoss() {
        let now = BootClock.nowNanoseconds()
        guard now &- lastLossCheck >= 1_000_000_000 else { return }
        lastLossCheck = now
        let lost = programs.lostEvents
        guard lost != lostSeen || mustReconcile else { return }
        lostSeen = lost
        mustReconcile = false
        var found = 0
        for e in programs.tcpEntries() {
            if e.flow.flags & UInt8(FT_FLOW_CLOSED.rawValue) != 0 {
                let (report, openLost) = pending.closes(e.flow)
                guard report else { continue }
                if openLost { emitOpen(e.flow) }
                emitClose(e.flow, e.stats, at: e.closed_ns)
                found += 1
            } else if e.flow.flags & UInt8(FT_FLOW_PENDING_ACCEPT.rawValue) == 0, pending.opens(e.flow) {
                emitOpen(e.flow)
                found += 1
            }
        }
        for (key, ev) in programs.outboxEntries() where !pending.isReported(outboxKey: key, ev) {
            pending.reporting(outboxKey: key, ev)
            emitOutboxClose(key, ev)
            found += 1
        }
        counters.reconciled.add(1, ordering: .relaxed)
        counters.reconciledFlows.add(found, ordering: .relaxed)
    }

    // MARK: - Poll thread

    private func emit(_ e: FlowEvent) {
        batch.append(e)
    }

    /// Hands the events gathered since the last call to the consumer. Past `bufferLimit`
    /// waiting events a batch is dropped (counted), and its closes are forgotten so the
    /// next reconcile reports them again from their kernel copies.
    private func flushBatch() {
        guard !batch.isEmpty else { return }
        let n = batch.count
        if queued.value.load(ordering: .relaxed) + n > bufferLimit {
            counters.droppedEvents.add(n, ordering: .relaxed)
            for e in batch { if let r = e.receipt { pending.forget(r) } }
            mustReconcile = true
        } else {
            queued.value.add(n, ordering: .relaxed)
            if case .terminated = continuation.yield(batch) { queued.value.subtract(n, ordering: .relaxed) }
        }
        batch = []
        batch.reserveCapacity(64)
    }

    private func handle(_ data: UnsafeRawPointer, _ len: Int) {
        guard len >= MemoryLayout<ft_event>.size else { return }
        let ev = data.loadUnaligned(as: ft_event.self)
        let tcp = ev.flow.tuple.protocol == UInt8(IPPROTO_TCP)
        switch ev.kind {
        case FT_EV_OPEN.rawValue:
            // A TCP open reported already (adopted at start, by a reconcile) or closed already.
            guard !tcp || pending.opens(ev.flow) else { return }
            let record = emitOpen(ev.flow, at: ev.time_ns)
            if record.protocol == .udp { udpByCookie[ev.flow.cookie, default: []].insert(UDPKey(ev.flow)) }
        case FT_EV_CLOSE.rawValue:
            let (report, openLost) = pending.closes(ev.flow)
            guard report else { return } // reported at start or by a reconcile
            if openLost { emitOpen(ev.flow) }
            emitClose(ev.flow, ev.stats, at: ev.time_ns)
        case FT_EV_SOCK_RELEASE.rawValue:
            closeUDP(cookie: ev.flow.cookie, at: ev.time_ns)
        default:
            break
        }
    }

    @discardableResult
    private func emitOpen(_ flow: ft_flow, at time: UInt64? = nil) -> FlowRecord {
        let record = makeRecord(flow)
        emit(FlowEvent(kind: .open, time: WallTime(bootNanoseconds: time ?? flow.opened_ns), record: record))
        return record
    }

    private func emitClose(_ flow: ft_flow, _ stats: ft_close_stats, at time: UInt64) {
        var record = makeRecord(flow)
        Self.applyClose(stats, at: time, to: &record)
        emit(FlowEvent(kind: .close, time: WallTime(bootNanoseconds: time), record: record,
                       receipt: .tcpEntry(cookie: flow.cookie, openedNanoseconds: flow.opened_ns)))
    }

    private func emitOutboxClose(_ key: UInt64, _ ev: ft_event) {
        var record = makeRecord(ev.flow)
        Self.applyClose(ev.stats, at: ev.time_ns, to: &record)
        if let reason = Self.outboxReason(ev.close_reason) { record.closeReason = reason }
        emit(FlowEvent(kind: .close, time: WallTime(bootNanoseconds: ev.time_ns), record: record,
                       receipt: key & FT_OUTBOX_MOVED != 0 ? .tcpEntry(cookie: ev.flow.cookie, openedNanoseconds: ev.flow.opened_ns)
                                                           : .outbox(key: key)))
    }

    static func outboxReason(_ reason: UInt32) -> String? {
        switch reason {
        case FT_CLOSE_UDP_IDLE.rawValue: return "idle"
        case FT_CLOSE_UDP_RELEASED.rawValue: return "released"
        case FT_CLOSE_SEEDED.rawValue: return "closed"
        default: return nil
        }
    }

    static func applyClose(_ s: ft_close_stats, at time: UInt64, to record: inout FlowRecord) {
        record.bytesSent = s.bytes_sent
        record.bytesReceived = s.bytes_received
        record.closedAt = WallTime(bootNanoseconds: time)
        record.closeReason = TCPState(s.last_state).closeReason
        record.stats = CloseStats(segmentsOut: s.segs_out, segmentsIn: s.segs_in, retransmits: s.retransmits,
                                  smoothedRTTMicroseconds: s.srtt_us)
    }

    // MARK: - Flows older than the agent, and UDP

    /// Flows found at start end when sock_diag no longer lists them (they get no
    /// sock_ops callback); their counters are the last seen.
    private func followSeededTCP() {
        guard !seededTCP.isEmpty else { return }
        let now = BootClock.nowNanoseconds()
        guard now &- lastSeededScan >= Self.seededScanNanoseconds else { return }
        lastSeededScan = now
        guard let sockets = try? SockDiag.tcpSockets(states: DiagSocket.connectedStates) else { return }
        var alive: [UInt64: DiagSocket] = [:]
        for s in sockets where seededTCP[s.cookie] != nil { alive[s.cookie] = s }
        for (cookie, var record) in seededTCP {
            if let s = alive[cookie] {
                record.bytesSent = s.bytesAcked
                record.bytesReceived = s.bytesReceived
                seededTCP[cookie] = record
                continue
            }
            seededTCP.removeValue(forKey: cookie)
            record.closedAt = WallTime(bootNanoseconds: now)
            record.closeReason = "closed"
            var stats = ft_close_stats()
            stats.bytes_sent = record.bytesSent
            stats.bytes_received = record.bytesReceived
            let receipt = pending.keep(Self.outboxEvent(FlowRecordBuilder.kernelFlow(record), stats, at: now, reason: FT_CLOSE_SEEDED))
            emit(FlowEvent(kind: .close, time: WallTime(bootNanoseconds: now), record: record, receipt: receipt))
        }
    }

    private func closeUDP(cookie: UInt64, at time: UInt64) {
        guard let keys = udpByCookie.removeValue(forKey: cookie) else { return }
        let fd = programs.mapFD(FTBPF_MAP_UDP_FLOWS)
        for key in keys {
            var raw = key.raw
            var value = ft_udp_flow()
            guard ftbpf_map_lookup(fd, &raw, &value) == 0, value.flow.cookie == cookie else { continue }
            emitUDPClose(value, at: time, reason: FT_CLOSE_UDP_RELEASED) // kept in the outbox first,
            _ = ftbpf_map_delete(fd, &raw)                             // then gone from the flow map
        }
    }

    private func emitUDPClose(_ value: ft_udp_flow, at time: UInt64, reason: ft_close_reason) {
        var stats = ft_close_stats()
        stats.bytes_sent = value.bytes_sent
        stats.bytes_received = value.bytes_received
        stats.segs_out = UInt32(truncatingIfNeeded: value.packets_sent)
        stats.segs_in = UInt32(truncatingIfNeeded: value.packets_received)
        var record = makeRecord(value.flow)
        Self.applyClose(stats, at: time, to: &record)
        record.closeReason = Self.outboxReason(reason.rawValue)
        record.stats = CloseStats(segmentsOut: stats.segs_out, segmentsIn: stats.segs_in)
        let receipt = pending.keep(Self.outboxEvent(value.flow, stats, at: time, reason: reason))
        emit(FlowEvent(kind: .close, time: WallTime(bootNanoseconds: time), record: record, receipt: receipt))
    }

    static func outboxEvent(_ flow: ft_flow, _ stats: ft_close_stats, at time: UInt64, reason: ft_close_reason) -> ft_event {
        var ev = ft_event()
        ev.kind = FT_EV_CLOSE.rawValue
        ev.close_reason = reason.rawValue
        ev.time_ns = time
        ev.flow = flow
        ev.stats = stats
        return ev
    }

    /// UDP has no close: a flow idle for `udpIdleTimeout` ends (checked every second).
    private func expireIdleUDP() {
        let now = BootClock.nowNanoseconds()
        guard now - lastIdleScan >= 1_000_000_000 else { return }
        lastIdleScan = now
        let (secs, attos) = udpIdleTimeout.components
        let idle = UInt64(secs) * 1_000_000_000 + UInt64(attos / 1_000_000_000)
        let fd = programs.mapFD(FTBPF_MAP_UDP_FLOWS)
        for (key, value) in programs.liveUDPFlows() where now > value.flow.last_ns && now - value.flow.last_ns >= idle {
            var k = key
            emitUDPClose(value, at: now, reason: FT_CLOSE_UDP_IDLE)
            _ = ftbpf_map_delete(fd, &k)
            udpByCookie[value.flow.cookie]?.remove(UDPKey(raw: key))
        }
    }

    /// Builds the user-facing record of a kernel flow, resolving the owner's executable.
    func makeRecord(_ f: ft_flow) -> FlowRecord {
        FlowRecordBuilder.record(f, processes: processes)
    }
}

/// What the monitor had to recover from, for stats and metrics.
public struct MonitorHealth: Sendable, Equatable {
    /// Events dropped because the consumer fell too far behind (reported again by a reconcile).
    public var eventsDroppedInAgent: Int
    /// Agent-made closes that found the outbox full (not crash-safe).
    public var outboxFull: Int
    /// Reconciliations with the kernel's maps after lost events, and the flows they reported.
    public var reconciliations: Int
    public var reconciledFlows: Int
    /// Closes a previous agent left unjournaled, reported at start.
    public var recoveredCloses: Int
}

final class MonitorCounters: Sendable {
    let droppedEvents = Atomic<Int>(0)
    let reconciled = Atomic<Int>(0)
    let reconciledFlows = Atomic<Int>(0)
}
