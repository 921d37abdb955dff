import FlowTagWire
import FlowContext
import FlowTagKernel
import Foundation
import Synchronization

/// A flow with its state, as the API returns it.
public struct FlowEntry: Sendable, Hashable {
    public var record: FlowRecord
    public var state: FlowState
}

/// The agent's live view: every open flow with its owner, the most recent closed ones,
/// and the watchers to tell. Mirrors each flow into the FlowContext engine: a built-in
/// process-tagging callout associates the owner at flow-established, and the context is
/// removed (flowDelete fires) when the kernel reports the flow gone.
public final class FlowTable: Sendable {
    private struct State {
        var live = LiveFlows()
        /// Network namespaces seen: a lookup without netns tries each (a handful), never a scan.
        var namespaces: Set<UInt64> = []
        var closed: [FlowRecord] = []
        var closedHead = 0
        var stats = AgentStats()
        /// Opened flows per Attribution case (in `allCases` order): a string-keyed
        /// dictionary update per event showed in B3's profile; `stats` builds one on demand.
        var attributionCounts = [Int](repeating: 0, count: Attribution.allCases.count)
        var watchers: [UInt64: Watcher] = [:] { didSet { watcherList = Array(watchers.values) } }
        /// `watchers.values`, kept as an array: each event reads it, watchers change rarely.
        var watcherList: [Watcher] = []
        var nextWatcher: UInt64 = 1
        var statsSources: [@Sendable (inout AgentStats) -> Void] = []
    }

    /// Adds counters kept elsewhere (the kernel's, the journal's, an optional part's) to
    /// what `stats` reports.
    public func addStatsSource(_ fill: @escaping @Sendable (inout AgentStats) -> Void) {
        state.withLock { $0.statsSources.append(fill) }
    }

    /// Registers an optional part's values that have a stats field (see `ReportedValue`).
    public func register(_ values: [ReportedValue]) {
        let shown = values.filter { $0.statsField != nil }
        guard !shown.isEmpty else { return }
        addStatsSource { st in for v in shown { st.extra[v.statsField!] = v.value() } }
    }

    struct Watcher {
        let filter: FlowFilter
        let uid: UInt32?
        var payload = false
        let sink: any WatchSink
    }

    private let state = Mutex(State())
    public let closedCapacity: Int
    public let metrics: AgentMetrics?
    public let journal: Journal?
    public let engine = FilterEngine()
    public let taggerID: CalloutID
    private let deletes = Counter()

    final class Counter: Sendable { let value = Atomic<Int>(0) }

    /// Where closes go once handled when there is no journal (their kernel entries are
    /// then given back at once).
    private let release: @Sendable ([CloseReceipt]) -> Void

    public init(closedCapacity: Int = 4096, metrics: AgentMetrics? = nil, journal: Journal? = nil,
                release: @escaping @Sendable ([CloseReceipt]) -> Void = { _ in }) {
        self.closedCapacity = closedCapacity
        self.metrics = metrics
        self.journal = journal
        self.release = release
        let deletes = self.deletes
        let engine = self.engine
        // The built-in process-tagging callout: the owner rides on the flow to later layers.
        taggerID = try! engine.register(Callout<OwnerTag>(
            key: UUID(uuidString: "6b8e1c3a-1f0e-4a7e-9a51-000000000001")!, flags: [],
            classify: { _, _ in .continue },
            flowDelete: { _ in deletes.value.add(1, ordering: .relaxed) })).get()
        let tagger = taggerID
        let tags = self.tags
        let estKey = UUID(uuidString: "6b8e1c3a-1f0e-4a7e-9a51-000000000002")!
        _ = try! engine.register(Callout<OwnerTag>(key: estKey, classify: { req, _ in
            engine.associate(flow: req.metadata.flow, layer: .stream(req.layer.version), callout: tagger, context: tags.tag(req.metadata))
            return .continue
        }, flowDelete: { _ in })).get()
        let sub = UUID()
        engine.addSublayer(Sublayer(key: sub, weight: 0xffff))
        for v in IPVersion.allCases {
            _ = engine.addFilter(Filter(layer: .aleFlowEstablished(v), sublayer: sub, action: .calloutInspection(estKey)))
        }
    }

    private let tags = OwnerTags()

    /// flowDelete callbacks of the tagging callout so far (one per ended flow).
    public var taggedFlowsEnded: Int { deletes.value.load(ordering: .relaxed) }

    static func handle(_ r: FlowRecord) -> FlowHandle { FlowHandle(cookie: r.flow, netns: r.netns) }

    static func classifyValues(_ r: FlowRecord) -> (Layer, IncomingValues, Metadata) {
        let v: IPVersion = r.family == .ipv4 ? .v4 : .v6
        let values = IncomingValues(localAddress: r.local.address, localPort: r.local.port, remoteAddress: r.remote.address,
                                    remotePort: r.remote.port, protocol: r.protocol, direction: r.direction)
        let meta = Metadata(flow: handle(r), processID: r.process.pid, threadID: r.process.tid, processPath: r.process.exe,
                            userID: r.process.uid, cgroupID: r.process.cgroup)
        return (.aleFlowEstablished(v), values, meta)
    }

    /// A flow found in the kernel's maps at start (resynchronisation): live, not re-announced.
    public func adopt(_ r: FlowRecord) {
        let inserted: Bool = state.withLock { s in
            guard s.live.upsert(r) else { return false }
            s.namespaces.insert(r.netns)
            s.stats.resynchronisedFlows += 1
            s.stats.activeFlows = s.live.count
            return true
        }
        if inserted {
            let (l, v, m) = Self.classifyValues(r)
            _ = engine.classify(layer: l, values: v, metadata: m)
        }
    }

    /// Applies one kernel event and tells the watchers.
    public func apply(_ event: FlowEvent) {
        guard event.kind != .payload else { return publish(event) }
        let r = event.record
        if event.kind == .open {
            let (l, v, m) = Self.classifyValues(r)
            let start = ContinuousClock.now
            _ = engine.classify(layer: l, values: v, metadata: m)
            metrics?.classifyDuration.record(ContinuousClock.now - start)
            metrics?.flowOpened(r)
        } else {
            engine.endFlow(Self.handle(r))
            metrics?.flowClosed(r)
            if let journal {
                journal.append(r, receipt: event.receipt)
            } else if let receipt = event.receipt {
                release([receipt])
            }
        }
        let watchers: [Watcher] = state.withLock { s in
            switch event.kind {
            case .open:
                if s.live.upsert(r) { s.stats.flowsOpened += 1 }
                s.namespaces.insert(r.netns)
                s.attributionCounts[Attribution.allCases.firstIndex(of: r.attribution) ?? 0] += 1
            case .payload:
                break
            case .close:
                s.live.remove(r)
                s.stats.flowsClosed += 1
                s.stats.bytesSent += r.bytesSent
                s.stats.bytesReceived += r.bytesReceived
                if s.closed.count < closedCapacity { s.closed.append(r) } else {
                    s.closed[s.closedHead] = r
                    s.closedHead = (s.closedHead + 1) % closedCapacity
                }
            }
            s.stats.activeFlows = s.live.count
            return s.watcherList
        }
        let state: FlowState = event.kind == .open ? .open : .closed
        Self.deliver(event, to: watchers) { $0.filter.matches(r, state: state) && ($0.uid == nil || $0.uid == r.process.uid) }
    }

    /// Gives an event to the watchers that take it, rendered once for all of them.
    private static func deliver(_ event: FlowEvent, to watchers: [Watcher], where takes: (Watcher) -> Bool) {
        var line: [UInt8]?
        for w in watchers where takes(w) {
            if line == nil {
                var bytes = [UInt8]()
                EventLine.appendJSON(event, to: &bytes)
                bytes.append(10)
                line = bytes
            }
            w.sink.deliver(line!)
        }
    }

    /// A capture's bytes, to the watchers that asked for payloads (and may see the flow).
    public func publish(_ event: FlowEvent) {
        let r = event.record
        let watchers = state.withLock { $0.watcherList }
        Self.deliver(event, to: watchers) { $0.payload && $0.filter.matches(r, state: .open) && ($0.uid == nil || $0.uid == r.process.uid) }
    }

    /// Flows matching a filter; `uid` restricts to one user's flows (access control).
    public func flows(_ filter: FlowFilter, uid: UInt32? = nil) -> [FlowEntry] {
        let (live, closed) = state.withLock { s in
            (filter.state == .closed ? [] : s.live.records(), filter.state == .open ? [] : s.closed)
        }
        var out: [FlowEntry] = []
        out += live.filter { filter.matches($0, state: .open) }.map { FlowEntry(record: $0, state: .open) }
        out += closed.filter { filter.matches($0, state: .closed) }.map { FlowEntry(record: $0, state: .closed) }
        if let uid { out = out.filter { $0.record.process.uid == uid } }
        return out.sorted { ($0.record.openedAt, $0.record.flow) < ($1.record.openedAt, $1.record.flow) }
    }

    /// The live flow with this 5-tuple; without a netns, the only one there is.
    public func lookup(proto: FlowProtocol, local: Endpoint, remote: Endpoint, netns: UInt64?) -> [FlowRecord] {
        state.withLock { s in
            if let netns { return s.live.find(netns: netns, proto: proto, local: local, remote: remote).map { [$0] } ?? [] }
            return s.namespaces.compactMap { s.live.find(netns: $0, proto: proto, local: local, remote: remote) }
        }
    }

    public var activeCount: Int { state.withLock { $0.live.count } }

    public func stats() -> AgentStats {
        let (st, sources) = state.withLock { s -> (AgentStats, [@Sendable (inout AgentStats) -> Void]) in
            var st = s.stats
            for (i, a) in Attribution.allCases.enumerated() where s.attributionCounts[i] > 0 {
                st.attribution[a.rawValue] = s.attributionCounts[i]
            }
            st.watchers = s.watchers.count
            st.flowContextsDeleted = taggedFlowsEnded
            return (st, s.statsSources)
        }
        var out = st
        for fill in sources { fill(&out) }
        return out
    }

    /// Sends matching events, as JSON lines, to `sink` until the returned cancel is called.
    public func watch(_ filter: FlowFilter, uid: UInt32?, payload: Bool = false, sink: any WatchSink) -> @Sendable () -> Void {
        let id = state.withLock { s in
            defer { s.nextWatcher += 1 }
            s.watchers[s.nextWatcher] = Watcher(filter: filter, uid: uid, payload: payload, sink: sink)
            return s.nextWatcher
        }
        return { [weak self] in _ = self?.state.withLock { $0.watchers.removeValue(forKey: id) } }
    }

    /// Watchers dropped because they read too slowly (see `WatchStream`).
    public func countDroppedWatcher() { state.withLock { $0.stats.watchersDropped += 1 } }
    public var droppedWatchers: Int { state.withLock { $0.stats.watchersDropped } }

    /// Ends every watcher and removes every association (orderly shutdown).
    public func shutdown() async {
        let ws = state.withLock { s in defer { s.watchers.removeAll() }; return Array(s.watchers.values) }
        ws.forEach { $0.sink.finish() }
        _ = await engine.unload()
    }
}

/// Where a watcher's events go: called on the thread that applies events, so it must
/// not block (`WatchStream` buffers within a budget and drops a watcher that falls behind).
public protocol WatchSink: AnyObject, Sendable {
    /// One event as a JSON line (newline included).
    func deliver(_ line: [UInt8])
    /// The agent is stopping: end the stream.
    func finish()
}

/// The owner the tagging callout associates with a flow. One instance per process is
/// shared by all its flows (a class reference: no per-flow copy or boxing).
public final class OwnerTag: Sendable {
    public let owner: ProcessOwner
    init(_ owner: ProcessOwner) { self.owner = owner }
}

/// Interned owner tags, by process; bounded (emptied when it grows past its limit).
final class OwnerTags: Sendable {
    private let byPID = Mutex<[UInt32: OwnerTag]>([:])
    static let limit = 1 << 16

    func tag(_ m: Metadata) -> OwnerTag {
        byPID.withLock { tags in
            // Same process, same executable, uid and cgroup: the same tag (its tid is the
            // first thread seen; per-flow thread ids are in the flow records).
            if let t = tags[m.processID], t.owner.exe == m.processPath, t.owner.uid == m.userID, t.owner.cgroup == m.cgroupID {
                return t
            }
            if tags.count >= Self.limit { tags.removeAll(keepingCapacity: true) }
            let t = OwnerTag(ProcessOwner(pid: m.processID, tid: m.threadID, exe: m.processPath, comm: "",
                                          uid: m.userID, gid: 0, cgroup: m.cgroupID))
            tags[m.processID] = t
            return t
        }
    }
}
