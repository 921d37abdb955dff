import Foundation
import Synchronization

/// The result of classifying at a layer.
public struct ClassifyOutcome: Sendable, Hashable {
    /// The final action after arbitration across sublayers (block wins).
    public var action: Action
    /// Filters whose callouts were invoked, in order.
    public var invokedFilters: [UInt64]
    /// The filter that decided, if any.
    public var decidingFilter: UInt64?
}

/// What an orderly unload did.
public struct UnloadReport: Sendable, Hashable {
    public var flowDeletes: Int
    public var calloutsUnregistered: Int
}

/// WFP's filter engine and flow-context store, for callouts written in Swift.
///
/// - Flow contexts are keyed by (flow, layer, callout) and follow WFP's rules exactly:
///   see `associate(flow:layer:callout:context:)` and `remove(flow:layer:callout:)`.
/// - Classify runs filters by sublayer weight, then filter weight, with WFP's meaning of
///   terminating, inspection and unknown callout filters and of unregistered callouts.
/// - Concurrency: flows live in 64 independently locked shards and each layer's filters
///   in a snapshot of their own, so classifies of different flows never wait on one lock.
///
/// ```swift
/// let engine = FilterEngine()
/// let id = try engine.register(Callout<String>(key: UUID(), flags: .conditionalOnFlow,
///     classify: { req, ctx in print(req.metadata.processPath, ctx ?? "-"); return .continue },
///     flowDelete: { print("gone:", $0.context) })).get()
/// engine.addSublayer(Sublayer(key: sub, weight: 1))
/// _ = engine.addFilter(Filter(layer: .stream(.v4), sublayer: sub, action: .calloutInspection(key)))
/// engine.associate(flow: f, layer: .stream(.v4), callout: id, context: "curl")   // .success
/// engine.classify(layer: .stream(.v4), values: v, metadata: m)                   // ctx is "curl"
/// engine.endFlow(f)                                                               // flowDelete runs once
/// ```
public final class FilterEngine: Sendable {
    private struct Slot: Hashable { var layer: Layer; var callout: CalloutID }

    /// A stored context with its callout, so ending it needs no registry lookup.
    private struct Stored {
        var context: any Sendable
        var callout: CalloutRecord
    }

    /// A flow's contexts: nearly every flow holds one, kept inline (a dictionary would
    /// cost a heap allocation per flow); more go to a dictionary.
    private struct ContextSlots {
        private var first: (slot: Slot, stored: Stored)?
        private var more: [Slot: Stored]?

        subscript(slot: Slot) -> Stored? {
            get {
                if let f = first, f.slot == slot { return f.stored }
                return more?[slot]
            }
            set {
                if let f = first, f.slot == slot {
                    first = newValue.map { (slot, $0) }
                    return
                }
                if let newValue, first == nil, more?[slot] == nil {
                    first = (slot, newValue)
                    return
                }
                var m = more ?? [:]
                m[slot] = newValue
                more = m.isEmpty ? nil : m
            }
        }

        mutating func removeValue(forKey slot: Slot) -> Stored? {
            let old = self[slot]
            if old != nil { self[slot] = nil }
            return old
        }

        var isEmpty: Bool { first == nil && more == nil }
        var count: Int { (first == nil ? 0 : 1) + (more?.count ?? 0) }
        var entries: [(Slot, Stored)] {
            var out: [(Slot, Stored)] = []
            if let f = first { out.append((f.slot, f.stored)) }
            if let more { out += more.map { ($0.key, $0.value) } }
            return out
        }
        mutating func removeAll() { first = nil; more = nil }
    }

    private struct FlowState {
        var contexts = ContextSlots()
        var activeClassifies = 0
        /// Removed while a classify ran: their flowDelete runs when the last classify returns.
        var deferred: [(Slot, Stored)] = []
        var isEmpty: Bool { contexts.isEmpty && activeClassifies == 0 && deferred.isEmpty }
    }

    private struct Registry {
        var byKey: [UUID: CalloutRecord] = [:]
        var byID: [CalloutID: CalloutRecord] = [:]
        var nextID: UInt32 = 1
        var closing = false
    }

    /// A layer's filters in evaluation order, with their callouts resolved.
    private struct LayerPlan: Sendable {
        var groups: [[(Filter, CalloutRecord?)]] = []
    }

    private struct FilterSet {
        var sublayers: [UUID: Sublayer] = [:]
        var filters: [UInt64: Filter] = [:]
        var nextFilterID: UInt64 = 1
    }

    /// A Mutex cannot live in an array (it is not copyable): box it.
    private final class Box<Value>: Sendable {
        let lock: Mutex<Value>
        init(_ v: sending Value) { lock = Mutex(v) }
        func withLock<R>(_ body: (inout sending Value) throws -> sending R) rethrows -> sending R {
            try lock.withLock(body)
        }
    }

    private static let shardCount = 64
    private let shards: [Box<[FlowHandle: FlowState]>]
    private let registry = Mutex(Registry())
    private let filterSet = Mutex(FilterSet())
    private let plans: [Layer: Box<LayerPlan>]

    public init() {
        shards = (0..<Self.shardCount).map { _ in Box([:]) }
        var p: [Layer: Box<LayerPlan>] = [:]
        for l in Layer.all { p[l] = Box(LayerPlan()) }
        plans = p
    }

    @inline(__always)
    private func shard(_ f: FlowHandle) -> Box<[FlowHandle: FlowState]> {
        var h = f.cookie &* 0x9E37_79B9_7F4A_7C15 ^ f.netns
        h ^= h >> 29
        return shards[Int(h % UInt64(Self.shardCount))]
    }

    // MARK: Callouts

    /// Registers a callout (`FwpsCalloutRegister`): a new nonzero run-time id, or
    /// `alreadyExists` when the key is registered.
    public func register<C: Sendable>(_ callout: Callout<C>) -> Result<CalloutID, Status> {
        let result: Result<CalloutID, Status> = registry.withLock { r in
            if r.closing { return .failure(.unsuccessful) }
            if r.byKey[callout.key] != nil { return .failure(.alreadyExists) }
            let id = CalloutID(rawValue: r.nextID)
            r.nextID += 1
            let rec = CalloutRecord(callout, id: id)
            r.byKey[callout.key] = rec
            r.byID[id] = rec
            return .success(id)
        }
        if case .success = result { rebuildPlans() }
        return result
    }

    /// Unregisters (`FwpsCalloutUnregisterByKey`): `deviceBusy` while any flow still holds
    /// a context for it (nothing changes), `calloutNotFound` when not registered.
    @discardableResult
    public func unregister(key: UUID) -> Status {
        let status: Status = registry.withLock { r in
            guard let rec = r.byKey[key] else { return .calloutNotFound }
            if rec.associations.load(ordering: .acquiring) > 0 { return .deviceBusy }
            r.byKey[key] = nil
            r.byID[rec.id] = nil
            return .success
        }
        if status == .success { rebuildPlans() }
        return status
    }

    public func isRegistered(key: UUID) -> Bool { registry.withLock { $0.byKey[key] != nil } }

    // MARK: Filters

    public func addSublayer(_ s: Sublayer) {
        filterSet.withLock { $0.sublayers[s.key] = s }
        rebuildPlans()
    }

    /// Adds a filter; its id is assigned here. A callout whose notify(.addFilter) fails
    /// stops the add and its status is returned. The sublayer must exist.
    public func addFilter(_ filter: Filter) -> Result<UInt64, Status> {
        guard filterSet.withLock({ $0.sublayers[filter.sublayer] != nil }) else { return .failure(.invalidParameter) }
        var f = filter
        f.id = filterSet.withLock { s in defer { s.nextFilterID += 1 }; return s.nextFilterID }
        if let key = f.action.calloutKey, let rec = registry.withLock({ $0.byKey[key] }) {
            let st = rec.notify(.addFilter, f)
            if !st.isSuccess { return .failure(st) }
        }
        filterSet.withLock { $0.filters[f.id] = f }
        rebuildPlans()
        return .success(f.id)
    }

    /// Deletes a filter. notify(.deleteFilter) is told but cannot stop it.
    @discardableResult
    public func deleteFilter(id: UInt64) -> Status {
        guard let f = filterSet.withLock({ $0.filters.removeValue(forKey: id) }) else { return .invalidParameter }
        if let key = f.action.calloutKey, let rec = registry.withLock({ $0.byKey[key] }) {
            _ = rec.notify(.deleteFilter, f)
        }
        rebuildPlans()
        return .success
    }

    private func rebuildPlans() {
        let (subs, filters) = filterSet.withLock { ($0.sublayers, Array($0.filters.values)) }
        let callouts = registry.withLock { $0.byKey }
        for layer in Layer.all {
            let mine = filters.filter { $0.layer == layer && subs[$0.sublayer] != nil }
            let bySub = Dictionary(grouping: mine, by: \.sublayer)
            let ordered = bySub.keys.sorted { (subs[$0]!.weight, $0.uuidString) > (subs[$1]!.weight, $1.uuidString) }
            let groups = ordered.map { key in
                bySub[key]!.sorted { ($0.weight, $1.id) > ($1.weight, $0.id) }.map { f in
                    (f, f.action.calloutKey.flatMap { callouts[$0] })
                }
            }
            plans[layer]!.withLock { $0 = LayerPlan(groups: groups) }
        }
    }

    // MARK: Flow contexts

    /// Associates a context with (flow, layer, callout) (`FwpsFlowAssociateContext`).
    /// - `invalidParameter`: no context (nil), a callout without flowDelete, a context of
    ///   another type than the callout's, or the engine is unloading. Nothing is stored.
    /// - `calloutNotFound`: no such callout.
    /// - `objectNameExists`: one is already there; it stays and `context` is not stored.
    @discardableResult
    public func associate<C: Sendable>(flow: FlowHandle, layer: Layer, callout: CalloutID, context: C?) -> Status {
        guard let context else { return .invalidParameter }
        let check: Result<CalloutRecord, Status> = registry.withLock { r in
            if r.closing { return .failure(.invalidParameter) }
            guard let rec = r.byID[callout] else { return .failure(.calloutNotFound) }
            guard rec.flowDelete != nil, rec.acceptsContext(context) else { return .failure(.invalidParameter) }
            rec.associations.add(1, ordering: .acquiringAndReleasing) // reserved now: unregister cannot race us
            return .success(rec)
        }
        guard case .success(let rec) = check else {
            if case .failure(let st) = check { return st }
            return .unsuccessful
        }
        let slot = Slot(layer: layer, callout: callout)
        let stored: Bool = shard(flow).withLock { flows in
            if flows[flow]?.contexts[slot] != nil { return false }
            flows[flow, default: FlowState()].contexts[slot] = Stored(context: context, callout: rec)
            return true
        }
        if stored { return .success }
        rec.associations.subtract(1, ordering: .acquiringAndReleasing)
        return .objectNameExists
    }

    /// Removes an association (`FwpsFlowRemoveContext`).
    /// - `unsuccessful`: none there; no callback.
    /// - `success`: flowDelete has run before this returns.
    /// - `pending`: a classify of the flow is running; flowDelete runs once, after it returns.
    @discardableResult
    public func remove(flow: FlowHandle, layer: Layer, callout: CalloutID) -> Status {
        let slot = Slot(layer: layer, callout: callout)
        enum Outcome { case none, now(Stored), pending }
        let outcome: Outcome = shard(flow).withLock { flows in
            guard var st = flows[flow], let ctx = st.contexts.removeValue(forKey: slot) else { return .none }
            if st.activeClassifies > 0 {
                st.deferred.append((slot, ctx))
                flows[flow] = st
                return .pending
            }
            flows[flow] = st.isEmpty ? nil : st
            return .now(ctx)
        }
        switch outcome {
        case .none: return .unsuccessful
        case .pending: return .pending
        case .now(let ctx):
            runFlowDelete(flow, slot, ctx)
            return .success
        }
    }

    private func runFlowDelete(_ flow: FlowHandle, _ slot: Slot, _ stored: Stored) {
        stored.callout.flowDelete?(flow, slot.layer, slot.callout, stored.context)
        stored.callout.associations.subtract(1, ordering: .acquiringAndReleasing)
    }

    /// The context a flow holds for (layer, callout), if any.
    public func context<C: Sendable>(flow: FlowHandle, layer: Layer, callout: CalloutID, as type: C.Type = C.self) -> C? {
        shard(flow).withLock { $0[flow]?.contexts[Slot(layer: layer, callout: callout)]?.context } as? C
    }

    /// Number of associations a flow holds.
    public func associationCount(flow: FlowHandle) -> Int {
        shard(flow).withLock { $0[flow]?.contexts.count ?? 0 }
    }

    /// Total associations across all flows.
    public var totalAssociations: Int {
        shards.reduce(0) { acc, s in acc + s.withLock { $0.values.reduce(0) { $0 + $1.contexts.count } } }
    }

    /// The flow is gone (TCP socket released, UDP closed or idle): one flowDelete per
    /// association. A FIN alone is not an end. Returns how many associations ended.
    @discardableResult
    public func endFlow(_ flow: FlowHandle) -> Int {
        let ended: [(Slot, Stored)] = shard(flow).withLock { flows in
            guard var st = flows[flow] else { return [] }
            let all = st.contexts.entries
            st.contexts.removeAll()
            if st.activeClassifies > 0 {
                st.deferred.append(contentsOf: all)
                flows[flow] = st
                return []
            }
            flows[flow] = nil
            return all
        }
        for (slot, ctx) in ended { runFlowDelete(flow, slot, ctx) }
        return ended.count
    }

    // MARK: Classify

    /// Runs the layer's filters for one classify. Process metadata is present at every
    /// layer. Callouts flagged conditional-on-flow run only for flows holding their context.
    public func classify(layer: Layer, values: IncomingValues, metadata: Metadata) -> ClassifyOutcome {
        let plan = plans[layer]!.withLock { $0 }
        let flow = metadata.flow
        let sh = shard(flow)
        sh.withLock { $0[flow, default: FlowState()].activeClassifies += 1 }
        defer { finishClassify(flow, sh) }

        var invoked: [UInt64] = []
        var final: Action = .permit
        var decider: UInt64?
        var anyDecision = false
        for group in plan.groups {
            var decision: Action = .continue
            var decidedBy: UInt64?
            for (filter, rec) in group where filter.matches(values, metadata) {
                switch filter.action {
                case .permit: decision = .permit
                case .block: decision = .block
                case .calloutTerminating, .calloutInspection, .calloutUnknown:
                    guard let rec else {
                        // Unregistered: terminating and unknown filters block, inspection is skipped.
                        if filter.action.isTerminating { decision = .block }
                        break
                    }
                    let ctx = sh.withLock { $0[flow]?.contexts[Slot(layer: layer, callout: rec.id)]?.context }
                    if rec.flags.contains(.conditionalOnFlow) && ctx == nil { break }
                    invoked.append(filter.id)
                    let req = ClassifyRequest(layer: layer, values: values, metadata: metadata, filter: filter, calloutID: rec.id)
                    let a = rec.classify(req, ctx)
                    if filter.action.isTerminating { decision = a }
                }
                if decision != .continue { decidedBy = filter.id; break }
            }
            if decision == .continue { continue }
            // Arbitration across sublayers: a block anywhere wins.
            if !anyDecision || decision == .block && final != .block {
                final = decision
                decider = decidedBy
            }
            anyDecision = true
        }
        return ClassifyOutcome(action: final, invokedFilters: invoked, decidingFilter: decider)
    }

    private func finishClassify(_ flow: FlowHandle, _ sh: Box<[FlowHandle: FlowState]>) {
        let due: [(Slot, Stored)] = sh.withLock { flows in
            guard var st = flows[flow] else { return [] }
            st.activeClassifies -= 1
            var due: [(Slot, Stored)] = []
            if st.activeClassifies == 0 {
                due = st.deferred
                st.deferred.removeAll()
            }
            flows[flow] = st.isEmpty ? nil : st
            return due
        }
        for (slot, ctx) in due { runFlowDelete(flow, slot, ctx) }
    }

    // MARK: Unload

    /// Orderly unload, WFP's order: stop new associations, remove every context (each
    /// flowDelete runs, waiting for classifies in progress), then unregister every callout.
    public func unload() async -> UnloadReport {
        registry.withLock { $0.closing = true }
        var deletes = 0
        for s in shards {
            let flows = s.withLock { Array($0.keys) }
            for f in flows { deletes += endFlow(f) }
        }
        // Wait for deferred deletes of classifies still running.
        while shards.contains(where: { $0.withLock { !$0.isEmpty } }) {
            try? await Task.sleep(for: .milliseconds(1))
        }
        let keys = registry.withLock { Array($0.byKey.keys) }
        var unregistered = 0
        for k in keys where unregister(key: k) == .success { unregistered += 1 }
        return UnloadReport(flowDeletes: deletes, calloutsUnregistered: unregistered)
    }
}
