/// Counters the agent reports (`/v1/stats`, metrics). Optional parts of the agent (the
/// stream relay) add theirs to `extra`, which the JSON form flattens into the top level.
public struct AgentStats: Sendable, Codable, Hashable {
    public var activeFlows = 0
    public var flowsOpened = 0
    public var flowsClosed = 0
    public var bytesSent: UInt64 = 0
    public var bytesReceived: UInt64 = 0
    public var attribution: [String: Int] = [:]
    public var kernelEventsLost: UInt64 = 0
    /// Flows the kernel could not track: its flow map was full (the agent far behind).
    public var kernelFlowsDropped: UInt64 = 0
    public var resynchronisedFlows = 0
    public var watchers = 0
    /// Watchers dropped because they read too slowly (their backlog passed its budget).
    public var watchersDropped = 0
    /// Closed flows dropped unjournaled (writes failing for too long) and waiting to be written.
    public var journalRowsDropped = 0
    public var journalRowsWaiting = 0
    /// Events the agent dropped itself (its consumer too far behind), reported again by a
    /// reconcile with the kernel's maps; reconciliations and the flows they reported.
    public var eventsDroppedInAgent = 0
    public var reconciliations = 0
    public var reconciledFlows = 0
    /// Closes a previous agent left unjournaled, reported by this one at start.
    public var recoveredCloses = 0
    /// Flow contexts removed, their flowDelete run (the built-in tagging callout's: one
    /// per flow that ended while the agent ran).
    public var flowContextsDeleted = 0
    /// Counters of optional parts (`relayed_flows`, …), by their JSON key.
    public var extra: [String: UInt64] = [:]

    public init() {}

    enum CodingKeys: String, CodingKey, CaseIterable {
        case activeFlows = "active_flows", flowsOpened = "flows_opened", flowsClosed = "flows_closed"
        case bytesSent = "bytes_sent", bytesReceived = "bytes_received", attribution
        case kernelEventsLost = "kernel_events_lost", kernelFlowsDropped = "kernel_flows_dropped"
        case resynchronisedFlows = "resynchronised_flows", watchers, watchersDropped = "watchers_dropped"
        case journalRowsDropped = "journal_rows_dropped", journalRowsWaiting = "journal_rows_waiting"
        case eventsDroppedInAgent = "events_dropped_in_agent", reconciliations, reconciledFlows = "reconciled_flows"
        case recoveredCloses = "recovered_closes", flowContextsDeleted = "flow_contexts_deleted"
    }

    struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    /// Missing keys keep their zero: a CLI reads an older or newer agent's answer.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        func int(_ k: CodingKeys) throws -> Int { try c.decodeIfPresent(Int.self, forKey: k) ?? 0 }
        func u64(_ k: CodingKeys) throws -> UInt64 { try c.decodeIfPresent(UInt64.self, forKey: k) ?? 0 }
        activeFlows = try int(.activeFlows); flowsOpened = try int(.flowsOpened); flowsClosed = try int(.flowsClosed)
        bytesSent = try u64(.bytesSent); bytesReceived = try u64(.bytesReceived)
        attribution = try c.decodeIfPresent([String: Int].self, forKey: .attribution) ?? [:]
        kernelEventsLost = try u64(.kernelEventsLost); kernelFlowsDropped = try u64(.kernelFlowsDropped)
        resynchronisedFlows = try int(.resynchronisedFlows); watchers = try int(.watchers); watchersDropped = try int(.watchersDropped)
        journalRowsDropped = try int(.journalRowsDropped); journalRowsWaiting = try int(.journalRowsWaiting)
        eventsDroppedInAgent = try int(.eventsDroppedInAgent); reconciliations = try int(.reconciliations)
        reconciledFlows = try int(.reconciledFlows); recoveredCloses = try int(.recoveredCloses)
        flowContextsDeleted = try int(.flowContextsDeleted)
        let known = Set(CodingKeys.allCases.map(\.stringValue))
        let all = try decoder.container(keyedBy: AnyKey.self)
        for key in all.allKeys where !known.contains(key.stringValue) {
            if let v = try? all.decode(UInt64.self, forKey: key) { extra[key.stringValue] = v }
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(activeFlows, forKey: .activeFlows); try c.encode(flowsOpened, forKey: .flowsOpened)
        try c.encode(flowsClosed, forKey: .flowsClosed); try c.encode(bytesSent, forKey: .bytesSent)
        try c.encode(bytesReceived, forKey: .bytesReceived); try c.encode(attribution, forKey: .attribution)
        try c.encode(kernelEventsLost, forKey: .kernelEventsLost); try c.encode(kernelFlowsDropped, forKey: .kernelFlowsDropped)
        try c.encode(resynchronisedFlows, forKey: .resynchronisedFlows); try c.encode(watchers, forKey: .watchers)
        try c.encode(watchersDropped, forKey: .watchersDropped); try c.encode(journalRowsDropped, forKey: .journalRowsDropped)
        try c.encode(journalRowsWaiting, forKey: .journalRowsWaiting); try c.encode(eventsDroppedInAgent, forKey: .eventsDroppedInAgent)
        try c.encode(reconciliations, forKey: .reconciliations); try c.encode(reconciledFlows, forKey: .reconciledFlows)
        try c.encode(recoveredCloses, forKey: .recoveredCloses); try c.encode(flowContextsDeleted, forKey: .flowContextsDeleted)
        var all = encoder.container(keyedBy: AnyKey.self)
        for (k, v) in extra { try all.encode(v, forKey: AnyKey(stringValue: k)) }
    }
}
