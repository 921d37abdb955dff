#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF

/// Inbound relaying in one network namespace: the agent's inbound listeners made there
/// (its 127.0.0.1 and ::1; sk_lookup assigns them connections to any address) and, for
/// a namespace other than the agent's, the relay object's instance whose sk_lookup
/// program is attached there (an sk_lookup program cannot tell which namespace it runs
/// in, so each namespace has its own, with its own listeners).
final class InboundNamespace {
    let ns: NetworkNamespace
    var listeners: [Int32] = []
    /// The per-namespace program's object (nil in the agent's namespace: the main object's).
    var instance: OpaquePointer?

    init(ns: NetworkNamespace) { self.ns = ns }

    /// Detaches this namespace's program, then closes the listeners.
    func close() {
        if let instance { ftrelay_destroy(instance) }
        instance = nil
        for fd in listeners { Glibc.close(fd) }
        listeners = []
    }
}
