import FlowTagWire
import Dispatch
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Runs a handler on the first of the given signals (which are then ignored by default).
public final class SignalWatcher: @unchecked Sendable {
    private var sources: [DispatchSourceSignal] = []

    public init(signals: [Int32], handler: @escaping @Sendable () -> Void) {
        let queue = DispatchQueue(label: "flowtag.signals")
        for sig in signals {
            signal(sig, SIG_IGN)
            let src = DispatchSource.makeSignalSource(signal: sig, queue: queue)
            src.setEventHandler { handler() }
            src.resume()
            sources.append(src)
        }
    }

    public func cancel() { sources.forEach { $0.cancel() } }
}

/// A stop request that may come before there is anything to stop.
final class ShutdownRequest: Sendable {
    private let state = Mutex<(requested: Bool, action: (@Sendable () -> Void)?)>((false, nil))

    var isRequested: Bool { state.withLock { $0.requested } }

    func request() {
        let action = state.withLock { s -> (@Sendable () -> Void)? in s.requested = true; return s.action }
        action?()
    }

    /// Runs `action` at the request, or now if it came already.
    func whenRequested(_ action: @escaping @Sendable () -> Void) {
        let already = state.withLock { s -> Bool in s.action = action; return s.requested }
        if already { action() }
    }
}

/// A value set once, after the closures that read it were made.
final class LateBound<T: AnyObject & Sendable>: Sendable {
    private let box = Mutex<T?>(nil)
    var value: T? { box.withLock { $0 } }
    func set(_ v: T) { box.withLock { $0 = v } }
}
