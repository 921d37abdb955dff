#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import FlowTagCore
import Synchronization

/// Closes the journal does not hold yet, and what keeps every flow reported exactly once.
///
/// A TCP close stays in the flow's kernel entry (marked `FT_FLOW_CLOSED`), a close the
/// agent makes itself in the pinned outbox, until the journal commits the row and gives
/// the receipt back (`release`); only then is the kernel copy deleted. A flow is named by
/// its cookie and the kernel's open time: a socket connected again after
/// connect(AF_UNSPEC) keeps its cookie (the kernel then moves the earlier close to the
/// outbox under `FT_OUTBOX_MOVED | cookie`).
/// Poll thread only, except `release`.
final class PendingCloses {
    struct FlowKey: Hashable {
        var cookie: UInt64
        var opened: UInt64
        init(_ f: ft_flow) { cookie = f.cookie; opened = f.opened_ns }
        init(cookie: UInt64, opened: UInt64) { self.cookie = cookie; self.opened = opened }
    }

    private let programs: KernelPrograms
    /// TCP flows whose open was reported and whose close was not.
    private var live: Set<FlowKey> = []
    /// TCP flows whose close was reported and whose kernel copy is not released yet.
    private var closed: Set<FlowKey> = []
    /// The agent's outbox keys reported and not released yet.
    private var agentKeys: Set<UInt64> = []
    private var nextAgentKey: UInt64 = 1
    private let released = Mutex<[CloseReceipt]>([])
    let outboxFull = Atomic<Int>(0)

    init(programs: KernelPrograms) { self.programs = programs }

    // MARK: deciding what to report

    /// A TCP open to report: not already live, not already closed.
    func opens(_ f: ft_flow) -> Bool {
        let key = FlowKey(f)
        return !closed.contains(key) && live.insert(key).inserted
    }

    /// A TCP close to report (`false`: reported already); `openLost` when its open never
    /// was (lost with a full ring buffer: report one first, so the close ends a flow).
    func closes(_ f: ft_flow) -> (report: Bool, openLost: Bool) {
        let key = FlowKey(f)
        guard closed.insert(key).inserted else { return (false, false) }
        return (true, live.remove(key) == nil)
    }

    func isPending(_ f: ft_flow) -> Bool { closed.contains(FlowKey(f)) }
    func isLive(_ f: ft_flow) -> Bool { live.contains(FlowKey(f)) }

    /// A close that was dropped before anyone saw it (the consumer was too far behind):
    /// forgotten here, so the next reconcile reports it again from its kernel copy.
    func forget(_ receipt: CloseReceipt) {
        switch receipt {
        case .tcpEntry(let cookie, let opened): closed.remove(FlowKey(cookie: cookie, opened: opened))
        case .outbox(let key): agentKeys.remove(key)
        }
    }

    /// Whether an outbox entry is one whose close was reported and not released.
    func isReported(outboxKey key: UInt64, _ ev: ft_event) -> Bool {
        key & FT_OUTBOX_MOVED != 0 ? closed.contains(FlowKey(ev.flow)) : agentKeys.contains(key)
    }

    /// Notes an outbox entry found at start or by a reconcile, reported now.
    func reporting(outboxKey key: UInt64, _ ev: ft_event) {
        if key & FT_OUTBOX_MOVED != 0 { closed.insert(FlowKey(ev.flow)) } else {
            agentKeys.insert(key)
            nextAgentKey = max(nextAgentKey, key + 1)
        }
    }

    /// Notes a live TCP entry found at start (adopted, not reported again).
    func adopting(_ f: ft_flow) { live.insert(FlowKey(f)) }

    // MARK: keeping and giving back

    /// Writes a close the agent made into the pinned outbox, where it survives a crash of
    /// the agent until journaled; nil when the outbox is full (counted: not crash-safe).
    func keep(_ ev: ft_event) -> CloseReceipt? {
        var key = nextAgentKey
        var value = ev
        guard key & FT_OUTBOX_MOVED == 0,
              ftbpf_map_update(programs.mapFD(FTBPF_MAP_OUTBOX), &key, &value, 1 /* BPF_NOEXIST */) == 0 else {
            outboxFull.add(1, ordering: .relaxed)
            return nil
        }
        nextAgentKey += 1
        agentKeys.insert(key)
        return .outbox(key: key)
    }

    /// Closes the journal now holds (or that need not be kept). Any thread.
    func release(_ receipts: [CloseReceipt]) {
        guard !receipts.isEmpty else { return }
        released.withLock { $0 += receipts }
    }

    var waitingRelease: Int { released.withLock { $0.count } }

    /// Deletes the kernel copies of released closes: a TCP entry only while it is still
    /// that flow's closed entry (a reconnected socket's live entry stays), else the copy
    /// the kernel moved to the outbox.
    func deleteReleased() {
        let receipts = released.withLock { r in defer { r.removeAll(keepingCapacity: true) }; return r }
        guard !receipts.isEmpty else { return }
        let flows = programs.mapFD(FTBPF_MAP_TCP_FLOWS)
        var cookies: [UInt64] = [], keys: [UInt64] = []
        for r in receipts {
            switch r {
            case .tcpEntry(let cookie, let opened):
                closed.remove(FlowKey(cookie: cookie, opened: opened))
                var k = cookie
                var e = ft_tcp_entry()
                if ftbpf_map_lookup(flows, &k, &e) == 0, e.flow.opened_ns == opened, e.flow.flags & UInt8(FT_FLOW_CLOSED.rawValue) != 0 {
                    cookies.append(cookie)
                    continue
                }
                var moved = FT_OUTBOX_MOVED | cookie
                var ev = ft_event()
                if ftbpf_map_lookup(programs.mapFD(FTBPF_MAP_OUTBOX), &moved, &ev) == 0, ev.flow.opened_ns == opened {
                    keys.append(moved)
                }
            case .outbox(let key):
                agentKeys.remove(key)
                keys.append(key)
            }
        }
        programs.deleteEntries(FTBPF_MAP_TCP_FLOWS, keys: cookies)
        programs.deleteEntries(FTBPF_MAP_OUTBOX, keys: keys)
    }
}
