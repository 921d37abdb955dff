import Foundation
import FlowTagCore

/// A sublayer: filters are grouped in sublayers, evaluated from the highest weight down.
public struct Sublayer: Sendable, Hashable {
    public var key: UUID
    public var weight: UInt16
    public init(key: UUID = UUID(), weight: UInt16) { self.key = key; self.weight = weight }
}

/// A condition on incoming values or metadata; a filter matches when all of its hold.
public enum FilterCondition: Sendable, Hashable {
    case localAddress(IPPrefix)
    case remoteAddress(IPPrefix)
    case localPort(ClosedRange<UInt16>)
    case remotePort(ClosedRange<UInt16>)
    case `protocol`(TransportProtocol)
    case direction(Direction)
    case processID(UInt32)
    case processPath(String)
    case userID(UInt32)
    case cgroupID(UInt64)

    func matches(_ v: IncomingValues, _ m: Metadata) -> Bool {
        switch self {
        case .localAddress(let p): return p.contains(v.localAddress)
        case .remoteAddress(let p): return p.contains(v.remoteAddress)
        case .localPort(let r): return r.contains(v.localPort)
        case .remotePort(let r): return r.contains(v.remotePort)
        case .protocol(let p): return v.protocol == p
        case .direction(let d): return v.direction == d
        case .processID(let pid): return m.processID == pid
        case .processPath(let path): return m.processPath == path
        case .userID(let uid): return m.userID == uid
        case .cgroupID(let id): return m.cgroupID == id
        }
    }
}

/// What a filter does when it matches (`FWP_ACTION_TYPE`).
public enum FilterAction: Sendable, Hashable {
    case permit
    case block
    /// The callout decides permit or block. Unregistered: the filter blocks.
    case calloutTerminating(UUID)
    /// The callout only inspects: its result never permits or blocks. Unregistered: skipped.
    case calloutInspection(UUID)
    /// The callout may decide or not. Unregistered: the filter blocks.
    case calloutUnknown(UUID)

    var calloutKey: UUID? {
        switch self {
        case .calloutTerminating(let k), .calloutInspection(let k), .calloutUnknown(let k): return k
        default: return nil
        }
    }

    /// Whether decisions of this filter's callout count (inspection ones do not).
    public var isTerminating: Bool {
        if case .calloutInspection = self { return false }
        return true
    }
}

/// A filter (`FWPM_FILTER`): layer, sublayer, weight, conditions, action.
public struct Filter: Sendable, Hashable {
    public var id: UInt64
    public var layer: Layer
    public var sublayer: UUID
    public var weight: UInt64
    public var conditions: [FilterCondition]
    public var action: FilterAction

    public init(id: UInt64 = 0, layer: Layer, sublayer: UUID, weight: UInt64 = 0,
                conditions: [FilterCondition] = [], action: FilterAction) {
        self.id = id; self.layer = layer; self.sublayer = sublayer; self.weight = weight
        self.conditions = conditions; self.action = action
    }

    func matches(_ v: IncomingValues, _ m: Metadata) -> Bool { conditions.allSatisfy { $0.matches(v, m) } }
}
