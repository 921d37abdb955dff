import Foundation
import Synchronization

/// Run-time identifier of a registered callout (WFP's `calloutId`): nonzero and unique.
public struct CalloutID: Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt32
    public var description: String { "callout#\(rawValue)" }
}

/// Callout flags (`FWP_CALLOUT_FLAG_*`).
public struct CalloutFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Classify runs only for flows that hold a context for this callout at the layer.
    public static let conditionalOnFlow = CalloutFlags(rawValue: 1)
    /// The callout may take flows that already existed when it was registered.
    public static let allowMidStreamInspection = CalloutFlags(rawValue: 2)
}

/// What a classify decides (`FWP_ACTION_*`).
public enum Action: String, Sendable, Hashable {
    case permit, block
    /// No decision: later filters decide (the only result an inspection callout may give).
    case `continue`
}

/// Why notify is called.
public enum NotifyKind: String, Sendable, Hashable {
    case addFilter, deleteFilter
}

/// Everything a callout's classify receives besides its flow context.
public struct ClassifyRequest: Sendable {
    public var layer: Layer
    public var values: IncomingValues
    public var metadata: Metadata
    public var filter: Filter
    public var calloutID: CalloutID
}

/// The arguments of a flow-delete callback: one per association, exactly once.
public struct FlowDeletion<Context: Sendable>: Sendable {
    public var flow: FlowHandle
    public var layer: Layer
    public var calloutID: CalloutID
    public var context: Context
}

/// A callout to register (`FWPS_CALLOUT`): its key, flags and functions. Contexts that
/// flows associate with it are of type `Context`.
///
/// ```swift
/// let tagger = Callout<Owner>(key: UUID(), flags: [],
///     classify: { request, _ in .continue },
///     flowDelete: { deletion in print("flow \(deletion.flow) ended, owner \(deletion.context)") })
/// let id = try engine.register(tagger).get()
/// ```
public struct Callout<Context: Sendable>: Sendable {
    public var key: UUID
    public var flags: CalloutFlags
    public var classify: @Sendable (ClassifyRequest, Context?) -> Action
    public var notify: @Sendable (NotifyKind, Filter) -> Status
    public var flowDelete: (@Sendable (FlowDeletion<Context>) -> Void)?

    public init(key: UUID, flags: CalloutFlags = [],
                classify: @escaping @Sendable (ClassifyRequest, Context?) -> Action,
                notify: @escaping @Sendable (NotifyKind, Filter) -> Status = { _, _ in .success },
                flowDelete: (@Sendable (FlowDeletion<Context>) -> Void)? = nil) {
        self.key = key; self.flags = flags; self.classify = classify
        self.notify = notify; self.flowDelete = flowDelete
    }
}

/// A registered callout with its context type erased, and its live association count.
final class CalloutRecord: @unchecked Sendable {
    let key: UUID
    let id: CalloutID
    let flags: CalloutFlags
    let classify: @Sendable (ClassifyRequest, (any Sendable)?) -> Action
    let notify: @Sendable (NotifyKind, Filter) -> Status
    let flowDelete: (@Sendable (FlowHandle, Layer, CalloutID, any Sendable) -> Void)?
    let acceptsContext: @Sendable (any Sendable) -> Bool
    /// Associations linked to this callout: raised under the registry lock (so unregister
    /// cannot race an associate), lowered lock-free when one ends.
    let associations = Atomic<Int>(0)

    init<C: Sendable>(_ c: Callout<C>, id: CalloutID) {
        key = c.key
        self.id = id
        flags = c.flags
        let classify = c.classify
        self.classify = { req, ctx in classify(req, ctx as? C) }
        notify = c.notify
        if let fd = c.flowDelete {
            flowDelete = { flow, layer, id, ctx in
                if let ctx = ctx as? C { fd(FlowDeletion(flow: flow, layer: layer, calloutID: id, context: ctx)) }
            }
        } else {
            flowDelete = nil
        }
        acceptsContext = { $0 is C }
    }
}
