/// Counters the agent reports (`/v1/stats`, metrics).
public struct AgentStats: Sendable, Codable, Hashable {
    public var activeFlows = 0
    public var flowsOpened = 0
    public var flowsClosed = 0
    public var bytesSent: UInt64 = 0
    public var bytesReceived: UInt64 = 0
    public var attribution: [String: Int] = [:]
    public var kernelEventsLost: UInt64 = 0
    public var resynchronisedFlows = 0
    public var watchers = 0
    /// Watchers dropped because they read too slowly (their backlog passed its budget).
    public var watchersDropped = 0
    /// Flows the stream relay has taken since the agent started, and those relayed now.
    public var relayedFlows: UInt64 = 0
    public var activeRelayedFlows = 0
    /// Selected flows left direct because no relay slot was free (kernel counter).
    public var relayPoolEmpty: UInt64 = 0
    /// Relayed bytes that could not be delivered because their flow ended first.
    public var relayBytesUndeliverable: UInt64 = 0
    /// Relayed flows reset because a hop of their relay failed.
    public var relayHopFailures: UInt64 = 0

    public init() {}

    enum CodingKeys: String, CodingKey {
        case activeFlows = "active_flows", flowsOpened = "flows_opened", flowsClosed = "flows_closed"
        case bytesSent = "bytes_sent", bytesReceived = "bytes_received", attribution
        case kernelEventsLost = "kernel_events_lost", resynchronisedFlows = "resynchronised_flows", watchers
        case watchersDropped = "watchers_dropped"
        case relayedFlows = "relayed_flows", activeRelayedFlows = "active_relayed_flows"
        case relayPoolEmpty = "relay_pool_empty", relayBytesUndeliverable = "relay_bytes_undeliverable"
        case relayHopFailures = "relay_hop_failures"
    }
}
