#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import FlowTagCore
import Foundation
import Synchronization

/// What the stream relay hears of its flows from the kernel.
public enum RelayKernelEvent: Sendable {
    case opened(slot: UInt32, record: FlowRecord)
    /// The process half-closed (its FIN went out).
    case finSent(cookie: UInt64)
    /// The peer half-closed (its FIN arrived).
    case finReceived(cookie: UInt64)
    case closed(cookie: UInt64, slot: UInt32, reason: String)
}

/// Turns the kernel's ring-buffer records into `FlowEvent`s with the owner resolved,
/// and ends UDP flows (socket released, or idle for `udpIdleTimeout`).
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

    /// Relayed flows' lifecycle, for the stream relay, called on the poll thread. Set
    /// before `start()`.
    public var relayHandler: (@Sendable (RelayKernelEvent) -> Void)?

    /// When set (before `start()`): TCP connections already open in this cgroup subtree are
    /// reported at start (attribution `seeded`) and followed with sock_diag until they end.
    public var seedExistingFlows: String?

    /// Events handed to `events` and not yet taken by its consumer.
    public var pendingEvents: Int { queued.value.load(ordering: .relaxed) }
    private let processes: ProcessTable
    private let stopping = Atomic<Bool>(false)
    private let finished = Mutex<Bool>(false)
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)
    /// Live flows the kernel's maps held at `start()` (the caller adopts them).
    public private(set) var initialLiveRecords: [FlowRecord] = []
    /// Closes handed back once journaled (`release`), deleted from the maps by the poll thread.
    private let releases = Mutex<[CloseReceipt]>([])
    // Poll-thread state.
    /// TCP flows whose open was reported and whose close was not: a replayed or late
    /// ring-buffer open for one of them is not reported twice.
    private var liveTCP: Set<UInt64> = []
    /// TCP flows whose close was reported and whose map entry is not yet released: their
    /// ring-buffer events (replayed after a restart, or seen again by a reconcile) are
    /// not reported twice.
    private var closedTCP: Set<UInt64> = []
    private var nextOutboxKey: UInt64 = 1
    private var lostSeen: UInt64 = 0
    private var lastLossCheck: UInt64 = 0
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
            flushBatch()
        }
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
                deleteReleased()
            }
            _ = programs.pollEvents(timeoutMilliseconds: 0) // drain what is left
            flushBatch()
            deleteReleased()
            continuation.finish()
            done.signal()
        }
        t.name = "flowtag-events"
        thread = t
        t.start()
    }

    /// Closes a previous agent reported but did not journal (kill -9): the TCP map's
    /// closed entries and the outbox, reported first; live flows are kept for adoption.
    private func recoverPending(_ entries: [ft_tcp_entry]) {
        var live: [FlowRecord] = []
        for e in entries {
            if e.flow.flags & UInt8(FT_FLOW_CLOSED.rawValue) != 0 {
                closedTCP.insert(e.flow.cookie)
                var record = makeRecord(e.flow)
                Self.applyClose(e.stats, at: e.closed_ns, to: &record)
                emit(FlowEvent(kind: .close, time: WallTime(bootNanoseconds: e.closed_ns), record: record,
                               receipt: .tcpEntry(cookie: e.flow.cookie)))
            } else {
                if e.flow.flags & UInt8(FT_FLOW_PENDING_ACCEPT.rawValue) == 0 { liveTCP.insert(e.flow.cookie) }
                live.append(makeRecord(e.flow))
            }
        }
        for (key, ev) in programs.outboxEntries() {
            nextOutboxKey = max(nextOutboxKey, key + 1)
            var record = makeRecord(ev.flow)
            record.bytesSent = ev.stats.bytes_sent
            record.bytesReceived = ev.stats.bytes_received
            record.closedAt = WallTime(bootNanoseconds: ev.time_ns)
            record.closeReason = Self.outboxReason(ev.close_reason) ?? Self.tcpCloseReason(lastState: ev.stats.last_state)
            record.stats = CloseStats(segmentsOut: ev.stats.segs_out, segmentsIn: ev.stats.segs_in,
                                      retransmits: ev.stats.retransmits, smoothedRTTMicroseconds: ev.stats.srtt_us)
            emit(FlowEvent(kind: .close, time: WallTime(bootNanoseconds: ev.time_ns), record: record, receipt: .outbox(key: key)))
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
        record.closeReason = tcpCloseReason(lastState: s.last_state)
        record.stats = CloseStats(segmentsOut: s.segs_out, segmentsIn: s.segs_in, retransmits: s.retransmits,
                                  smoothedRTTMicroseconds: s.srtt_us)
    }

    /// Gives back closes the journal now holds (or that need not be kept): their kernel
    /// entries are deleted by the poll thread. Any thread.
    public func release(_ receipts: [CloseReceipt]) {
        guard !receipts.isEmpty else { return }
        releases.withLock { $0 += receipts }
    }

    /// Closes released so far whose entries are still waiting to be deleted.
    public var pendingReleases: Int { releases.withLock { $0.count } }

    private func deleteReleased() {
        let receipts = releases.withLock { r in defer { r.removeAll(keepingCapacity: true) }; return r }
        guard !receipts.isEmpty else { return }
        var cookies: [UInt64] = [], keys: [UInt64] = []
        for r in receipts {
            switch r {
            case .tcpEntry(let cookie): cookies.append(cookie); closedTCP.remove(cookie)
            case .outbox(let key): keys.append(key)
            }
        }
        programs.deleteEntries(FTBPF_MAP_TCP_FLOWS, keys: cookies)
        programs.deleteEntries(FTBPF_MAP_OUTBOX, keys: keys)
    }

    /// After the kernel lost events (ring buffer full: the agent was stopped or too slow),
    /// the TCP map is the truth: closes never reported are reported from their closed
    /// entries, opens never reported from live ones. Checked once a second.
    private func reconcileAfterLoss() {
        let now = BootClock.nowNanoseconds()
        guard now &- lastLossCheck >= 1_000_000_000 else { return }
        lastLossCheck = now
        let lost = programs.lostEvents
        guard lost != lostSeen else { return }
        lostSeen = lost
        var opened = 0, closed = 0
        for e in programs.tcpEntries() {
            let cookie = e.flow.cookie
            if e.flow.flags & UInt8(FT_FLOW_CLOSED.rawValue) != 0 {
                guard !closedTCP.contains(cookie) else { continue }
                closedTCP.insert(cookie)
                if liveTCP.remove(cookie) == nil {
                    // Its open was lost too: report it, so the close has a flow to end.
                    emit(FlowEvent(kind: .open, time: WallTime(bootNanoseconds: e.flow.opened_ns), record: makeRecord(e.flow)))
                }
                var record = makeRecord(e.flow)
                Self.applyClose(e.stats, at: e.closed_ns, to: &record)
                emit(FlowEvent(kind: .close, time: WallTime(bootNanoseconds: e.closed_ns), record: record, receipt: .tcpEntry(cookie: cookie)))
                closed += 1
            } else if e.flow.flags & UInt8(FT_FLOW_PENDING_ACCEPT.rawValue) == 0, !liveTCP.contains(cookie) {
                liveTCP.insert(cookie)
                emit(FlowEvent(kind: .open, time: WallTime(bootNanoseconds: e.flow.opened_ns), record: makeRecord(e.flow)))
                opened += 1
            }
        }
        reconciled.add(1, ordering: .relaxed)
        reconciledFlows.add(opened + closed, ordering: .relaxed)
    }

    /// Times the live flows were reconciled with the kernel's map after lost events, and
    /// the opens and closes that recovered.
    public var reconciliations: Int { reconciled.load(ordering: .relaxed) }
    public var reconciledFlowCount: Int { reconciledFlows.load(ordering: .relaxed) }
    private let reconciled = Atomic<Int>(0)
    private let reconciledFlows = Atomic<Int>(0)

    /// Stops reading, drains the ring buffer and ends `events`. Idempotent.
    public func stop() {
        let wasStopped = stopping.exchange(true, ordering: .relaxed)
        guard !wasStopped, thread != nil else { return }
        done.wait()
    }

    // MARK: - Poll thread

    private func emit(_ e: FlowEvent) {
        batch.append(e)
    }

    /// Hands the events gathered since the last call to the consumer. Past `bufferLimit`
    /// waiting events a batch is dropped (and counted) rather than growing without bound.
    private func flushBatch() {
        guard !batch.isEmpty else { return }
        let n = batch.count
        if queued.value.load(ordering: .relaxed) + n > bufferLimit {
            droppedEvents.add(n, ordering: .relaxed)
        } else {
            queued.value.add(n, ordering: .relaxed)
            if case .terminated = continuation.yield(batch) { queued.value.subtract(n, ordering: .relaxed) }
        }
        batch = []
        batch.reserveCapacity(64)
    }

    /// Events dropped because the consumer fell more than `bufferLimit` behind.
    public var eventsDroppedInAgent: Int { droppedEvents.load(ordering: .relaxed) }
    private let droppedEvents = Atomic<Int>(0)

    private func handle(_ data: UnsafeRawPointer, _ len: Int) {
        guard len >= MemoryLayout<ft_event>.size else { return }
        let ev = data.loadUnaligned(as: ft_event.self)
        switch ev.kind {
        case FT_EV_OPEN.rawValue:
            if ev.flow.tuple.protocol == 6 {
                // Already reported (adopted at start, or by a reconcile), or closed already.
                guard !closedTCP.contains(ev.flow.cookie), liveTCP.insert(ev.flow.cookie).inserted else { return }
            }
            let record = makeRecord(ev.flow)
            if ev.flow.flags & UInt8(FT_FLOW_RELAYED.rawValue) != 0 {
                relayHandler?(.opened(slot: ev.flow.relay_slot, record: record))
            }
            if record.protocol == .udp { udpByCookie[ev.flow.cookie, default: []].insert(UDPKey(ev.flow)) }
            emit(FlowEvent(kind: .open, time: WallTime(bootNanoseconds: ev.time_ns), record: record))
        case FT_EV_CLOSE.rawValue:
            let cookie = ev.flow.cookie
            guard closedTCP.insert(cookie).inserted else { return } // reported at start or by a reconcile
            if liveTCP.remove(cookie) == nil {
                // Its open was lost (ring buffer full): report it first, so the close ends a flow.
                emit(FlowEvent(kind: .open, time: WallTime(bootNanoseconds: ev.flow.opened_ns), record: makeRecord(ev.flow)))
            }
            var record = makeRecord(ev.flow)
            Self.applyClose(ev.stats, at: ev.time_ns, to: &record)
            if ev.flow.flags & UInt8(FT_FLOW_RELAYED.rawValue) != 0 {
                relayHandler?(.closed(cookie: cookie, slot: ev.flow.relay_slot, reason: record.closeReason ?? "closed"))
            }
            emit(FlowEvent(kind: .close, time: WallTime(bootNanoseconds: ev.time_ns), record: record,
                           receipt: .tcpEntry(cookie: cookie)))
        case FT_EV_RELAY_STATE.rawValue:
            // FIN_WAIT1: the process sent its FIN; CLOSE_WAIT: the peer's arrived.
            let cookie = ev.flow.cookie
            relayHandler?(ev.stats.pad == 4 ? .finSent(cookie: cookie) : .finReceived(cookie: cookie))
        case FT_EV_SOCK_RELEASE.rawValue:
            closeUDP(cookie: ev.flow.cookie, at: ev.time_ns)
        default:
            break
        }
    }

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
            let receipt = keep(FlowRecordBuilder.kernelFlow(record), stats: nil, at: now, reason: FT_CLOSE_SEEDED, bytes: (record.bytesSent, record.bytesReceived))
            emit(FlowEvent(kind: .close, time: WallTime(bootNanoseconds: now), record: record, receipt: receipt))
        }
    }

    /// A live relayed TCP flow as the kernel holds it now (its open may not be reported
    /// yet: inbound flows are reported at accept, their bytes can come first).
    public func liveRelayedFlow(cookie: UInt64) -> (slot: UInt32, record: FlowRecord)? {
        var key = cookie
        var entry = ft_tcp_entry()
        guard ftbpf_map_lookup(programs.mapFD(FTBPF_MAP_TCP_FLOWS), &key, &entry) == 0,
              entry.flow.flags & UInt8(FT_FLOW_RELAYED.rawValue) != 0,
              entry.flow.flags & UInt8(FT_FLOW_CLOSED.rawValue) == 0 else { return nil }
        return (entry.flow.relay_slot, makeRecord(entry.flow))
    }

    /// From the TCP state before TCP_CLOSE: straight from ESTABLISHED or a handshake state
    /// is a reset; from the FIN states an orderly close.
    static func tcpCloseReason(lastState: UInt32) -> String {
        switch lastState {
        case 1, 2, 3: return "reset"        // ESTABLISHED, SYN_SENT, SYN_RECV
        case 4, 5, 6, 8, 9, 11: return "fin" // FIN_WAIT1/2, TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING
        default: return "closed"
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
        var record = makeRecord(value.flow)
        record.closeReason = Self.outboxReason(reason.rawValue)
        record.bytesSent = value.bytes_sent
        record.bytesReceived = value.bytes_received
        record.closedAt = WallTime(bootNanoseconds: time)
        record.stats = CloseStats(segmentsOut: UInt32(truncatingIfNeeded: value.packets_sent),
                                  segmentsIn: UInt32(truncatingIfNeeded: value.packets_received))
        var stats = ft_close_stats()
        stats.segs_out = UInt32(truncatingIfNeeded: value.packets_sent)
        stats.segs_in = UInt32(truncatingIfNeeded: value.packets_received)
        let receipt = keep(value.flow, stats: stats, at: time, reason: reason, bytes: (value.bytes_sent, value.bytes_received))
        emit(FlowEvent(kind: .close, time: WallTime(bootNanoseconds: time), record: record, receipt: receipt))
    }

    /// Writes a close the agent made into the pinned outbox, where it survives a crash of
    /// the agent until journaled; nil when the outbox is full (counted).
    private func keep(_ flow: ft_flow, stats: ft_close_stats?, at time: UInt64, reason: ft_close_reason,
                      bytes: (UInt64, UInt64)) -> CloseReceipt? {
        var ev = ft_event()
        ev.kind = FT_EV_CLOSE.rawValue
        ev.close_reason = reason.rawValue
        ev.time_ns = time
        ev.flow = flow
        if let stats { ev.stats = stats }
        ev.stats.bytes_sent = bytes.0
        ev.stats.bytes_received = bytes.1
        var key = nextOutboxKey
        guard ftbpf_map_update(programs.mapFD(FTBPF_MAP_OUTBOX), &key, &ev, 1 /* BPF_NOEXIST */) == 0 else {
            outboxFull.add(1, ordering: .relaxed)
            return nil
        }
        nextOutboxKey += 1
        return .outbox(key: key)
    }

    /// Agent-made closes that found the outbox full (journal far behind): not crash-safe.
    public var outboxFullCount: Int { outboxFull.load(ordering: .relaxed) }
    private let outboxFull = Atomic<Int>(0)

    /// UDP has no close: a flow idle for `udpIdleTimeout` ends (checked every few seconds).
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

/// Converts kernel flows into records (shared by the monitor and resynchronisation).
public enum FlowRecordBuilder {
    /// The kernel form of a record made in user space (a flow older than the agent), for
    /// the outbox: the owner is found again by pid in the process table.
    static func kernelFlow(_ r: FlowRecord) -> ft_flow {
        var f = ft_flow()
        f.cookie = r.flow
        f.netns_cookie = r.netns
        f.opened_ns = r.openedBootNanoseconds != 0 ? r.openedBootNanoseconds
            : UInt64(bitPattern: r.openedAt.nanoseconds &- BootClock.realtimeOffset)
        f.direction = UInt8(r.direction == .inbound ? FT_DIR_INBOUND.rawValue : FT_DIR_OUTBOUND.rawValue)
        let v4 = r.local.address.isIPv4 && r.remote.address.isIPv4
        f.tuple.family = UInt8(v4 ? AF_INET : AF_INET6)
        f.tuple.protocol = r.protocol == .udp ? 17 : 6
        f.tuple.local_port = r.local.port
        f.tuple.remote_port = r.remote.port
        withUnsafeMutableBytes(of: &f.tuple.local) { raw in for (i, b) in r.local.address.bytes(v4: v4).enumerated() { raw[i] = b } }
        withUnsafeMutableBytes(of: &f.tuple.remote) { raw in for (i, b) in r.remote.address.bytes(v4: v4).enumerated() { raw[i] = b } }
        f.owner.tgid = r.process.pid
        f.owner.tid = r.process.tid
        f.owner.uid = r.process.uid
        f.owner.gid = r.process.gid
        f.owner.cgroup_id = r.process.cgroup
        f.owner.attribution = UInt8(r.attribution == .unknown ? FT_ATTR_UNKNOWN.rawValue : FT_ATTR_KERNEL.rawValue)
        setCString(&f.owner.comm, r.process.comm)
        return f
    }

    public static func record(_ f: ft_flow, processes: ProcessTable) -> FlowRecord {
        var f = f
        let t = f.tuple
        let family = Int32(t.family)
        let local = withUnsafeBytes(of: t.local) { IPAddress(raw: $0, family: family) }
        let remote = withUnsafeBytes(of: t.remote) { IPAddress(raw: $0, family: family) }
        let wireFamily: AddressFamily = (remote.isIPv4 || (local.isIPv4 && remote.isUnspecified)) ? .ipv4 : .ipv6
        let owner = f.owner
        let entry = processes.resolve(tgid: owner.tgid, startNanoseconds: owner.proc_start_ns)
        let attribution: Attribution
        switch owner.attribution {
        case UInt8(FT_ATTR_KERNEL.rawValue): attribution = entry?.seeded == true ? .seeded : .kernel
        case UInt8(FT_ATTR_INHERITED.rawValue): attribution = .inherited
        default: attribution = .unknown
        }
        let process = ProcessOwner(pid: owner.tgid, tid: owner.tid, exe: entry?.exe ?? "",
                                   comm: cString(&f.owner.comm), uid: owner.uid, gid: owner.gid,
                                   cgroup: owner.cgroup_id)
        var record = FlowRecord(
            flow: f.cookie, netns: f.netns_cookie,
            protocol: t.protocol == 17 ? .udp : .tcp, family: wireFamily,
            direction: f.direction == UInt8(FT_DIR_INBOUND.rawValue) ? .inbound : .outbound,
            local: Endpoint(address: local, port: t.local_port),
            remote: Endpoint(address: remote, port: t.remote_port),
            process: process, attribution: attribution,
            openedAt: WallTime(bootNanoseconds: f.opened_ns))
        record.openedBootNanoseconds = f.opened_ns
        return record
    }
}

/// A UDP flow-map key as a hashable value (its raw bytes).
struct UDPKey: Hashable {
    var raw: ft_udp_key

    init(raw: ft_udp_key) { self.raw = raw }
    init(_ f: ft_flow) {
        raw = ft_udp_key()
        raw.netns_cookie = f.netns_cookie
        raw.tuple = f.tuple
    }

    static func == (a: UDPKey, b: UDPKey) -> Bool {
        var x = a.raw, y = b.raw
        return memcmp(&x, &y, MemoryLayout<ft_udp_key>.size) == 0
    }

    func hash(into h: inout Hasher) {
        var x = raw
        withUnsafeBytes(of: &x) { h.combine(bytes: $0) }
    }
}

final class EventCounter: Sendable {
    let value = Atomic<Int>(0)
}

/// The monitor's events; counts what its consumer takes, so a consumer can tell when a
/// burst has ended (`FlowMonitor.pendingEvents == 0`) and flush its output then.
public struct FlowEvents: AsyncSequence, Sendable {
    public typealias Element = FlowEvent
    let base: AsyncStream<[FlowEvent]>
    let counter: EventCounter

    public struct AsyncIterator: AsyncIteratorProtocol {
        var base: AsyncStream<[FlowEvent]>.AsyncIterator
        let counter: EventCounter
        var current: [FlowEvent] = []
        var index = 0

        public mutating func next() async -> FlowEvent? {
            while index == current.count {
                guard let batch = await base.next() else { return nil }
                current = batch
                index = 0
            }
            defer { index += 1 }
            counter.value.subtract(1, ordering: .relaxed)
            return current[index]
        }
    }

    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(base: base.makeAsyncIterator(), counter: counter)
    }
}

extension IPAddress {
    /// The 16 ABI bytes for a socket of family AF_INET (`v4`) or AF_INET6 (an IPv4
    /// address then as `::ffff:a.b.c.d`).
    func bytes(v4: Bool) -> [UInt8] {
        guard !v4, case .v4(let a) = self else { return bytes }
        return Array(repeating: 0, count: 10) + [0xff, 0xff, UInt8(a >> 24), UInt8(a >> 16 & 0xff), UInt8(a >> 8 & 0xff), UInt8(a & 0xff)]
    }
}
