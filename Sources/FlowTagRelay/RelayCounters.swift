import FlowTagCore
import Synchronization

/// Counters of the stream relay (exported as metrics and in /v1/stats).
public final class RelayCounters: Sendable {
    public let flows = Atomic<UInt64>(0)
    public let bytesFromProcess = Atomic<UInt64>(0)
    public let bytesFromPeer = Atomic<UInt64>(0)
    public let bytesToPeer = Atomic<UInt64>(0)
    public let bytesToProcess = Atomic<UInt64>(0)
    /// Connections reset (by either side, a callout, or the agent's stop deadline).
    public let resets = Atomic<UInt64>(0)
    /// Connects to the original destination that failed (refused, unreachable, timed out).
    public let connectFailures = Atomic<UInt64>(0)
    /// Accepted connections without a hand-over entry (not redirected by the hook): reset.
    public let unknownConnections = Atomic<UInt64>(0)
    /// Redirected connections reset because `maxFlows` were relayed already.
    public let overLimit = Atomic<UInt64>(0)
    /// Bytes the relay held when their connection was reset (both sides saw the reset).
    public let bytesUndeliverable = Atomic<UInt64>(0)
    /// Outgoing connections that could not use the process's port (another socket held
    /// the same 4-tuple): the peer saw another source port.
    public let sourcePortChanged = Atomic<UInt64>(0)
    /// Inbound flows whose server side sockops had not named yet when the callouts began:
    /// their session shows no process.
    public let inboundOwnerUnknown = Atomic<UInt64>(0)
    /// Flows whose sockets went on the sockmap fast path, and the bytes the kernel moved
    /// between them (counted as each flow ends).
    public let fastPathFlows = Atomic<UInt64>(0)
    public let fastPathBytes = Atomic<UInt64>(0)
    /// Fast-path directions held because the kernel's queue toward the writer was full.
    public let fastPathHolds = Atomic<UInt64>(0)
    /// Flows the sockhash would not take (full): they were copied.
    public let fastPathRefused = Atomic<UInt64>(0)
    public init() {}
}
