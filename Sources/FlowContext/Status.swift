/// Outcome of a flow-context or callout operation, named after WFP's NTSTATUS codes.
///
/// Keep the exact case: `objectNameExists` is a *success-class* status in WFP
/// (`NT_SUCCESS` is true for it) although nothing was stored, which is why a driver that
/// only tests for success gets associate-twice wrong. `isSuccess` mirrors `NT_SUCCESS`.
///
/// ```swift
/// let status = engine.associate(flow: f, layer: .stream(.v4), callout: id, context: ctx)
/// if status == .objectNameExists { /* one was already there; ctx was not stored */ }
/// ```
public enum Status: String, Sendable, Hashable, CaseIterable, Error {
    case success
    /// Informational: the object already existed (nothing changed). NT_SUCCESS is true.
    case objectNameExists
    case invalidParameter
    case unsuccessful
    /// The operation completes later (a remove raced a classify of the flow). NT_SUCCESS is true.
    case pending
    case deviceBusy
    case alreadyExists
    case calloutNotFound
    case nullPointer

    /// WFP's `NT_SUCCESS`: true for success, informational and pending statuses.
    public var isSuccess: Bool {
        switch self {
        case .success, .objectNameExists, .pending: return true
        default: return false
        }
    }
}
