import Synchronization

/// A context object with Filter Manager's reference counting (`FltAllocateContext`,
/// `FltGetContext`, `FltReleaseContext`, `FltDeleteContext`).
///
/// Creating it links it (the link holds one reference). `get()` takes a reference and
/// fails once the context is deleted; `release()` drops one; `delete()` unlinks and drops
/// the link's reference. `cleanup` runs exactly once, when the count reaches zero.
///
/// ```swift
/// let ctx = ReferencedContext(value: Buffer()) { buffer in buffer.free() }
/// if let v = ctx.get() { use(v); ctx.release() }
/// ctx.delete()   // cleanup runs now, or when the last get is released
/// ```
public final class ReferencedContext<Value: Sendable>: Sendable {
    private struct State { var count = 1; var linked = true; var cleaned = false }
    private let state = Mutex(State())
    private let value: Value
    private let cleanup: @Sendable (Value) -> Void

    public init(value: Value, cleanup: @escaping @Sendable (Value) -> Void) {
        self.value = value
        self.cleanup = cleanup
    }

    /// Takes a reference; nil after `delete()`.
    public func get() -> Value? {
        state.withLock { s -> Bool in
            guard s.linked else { return false }
            s.count += 1
            return true
        } ? value : nil
    }

    /// Drops a reference taken by `get()`. Extra releases are ignored (counted as misuse).
    public func release() { drop(unlink: false) }

    /// Unlinks: later gets fail; drops the link's reference. Idempotent.
    public func delete() { drop(unlink: true) }

    public var referenceCount: Int { state.withLock { $0.count } }
    public var isLinked: Bool { state.withLock { $0.linked } }

    private func drop(unlink: Bool) {
        let runCleanup: Bool = state.withLock { s in
            if unlink {
                guard s.linked else { return false }
                s.linked = false
            }
            guard s.count > 0 else { return false }
            s.count -= 1
            if s.count == 0 && !s.cleaned {
                s.cleaned = true
                return true
            }
            return false
        }
        if runCleanup { cleanup(value) }
    }
}
