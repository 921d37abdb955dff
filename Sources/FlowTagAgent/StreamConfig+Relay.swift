import FlowTagWire
import Foundation
import FlowContext
import FlowTagCore
import FlowTagKernel
import FlowTagRelay

extension StreamConfig {
    /// The kernel selection rules; a missing executable or cgroup is a config error.
    public func kernelRules() throws(ConfigError) -> [StreamRule] {
        try rules.enumerated().map { (i, r) throws(ConfigError) -> StreamRule in
            let key = "stream.rules[\(i)]"
            var rule = StreamRule(uid: r.uid, localPort: r.localPort, remotePort: r.remotePort,
                                  remote: r.remote.flatMap(IPPrefix.init),
                                  direction: r.direction.flatMap(FlowDirection.init(rawValue:)))
            if let exe = r.exe {
                guard let id = ExecutableIdentity(path: exe) else { throw ConfigError(key: "\(key).exe", reason: "no such file: \(exe)") }
                rule.exe = id
            }
            if let cg = r.cgroup {
                guard let id = Cgroup2.id(of: cg) else { throw ConfigError(key: "\(key).cgroup", reason: "no such cgroup: \(cg)") }
                rule.cgroupID = id
            }
            return rule
        }
    }

    /// The configured callouts (none: the bytes pass unchanged).
    public func streamCallouts(capture: (@Sendable (PayloadCapture) -> Void)? = nil) -> [StreamCallout] {
        callouts.map { c in
            let dirs: Set<StreamDirection> = c.direction == "both" ? [.send, .receive] : [c.direction == "send" ? .send : .receive]
            switch c.type {
            case "edit":
                return BuiltinStreamCallouts.edit(name: c.name, weight: c.weight, pattern: Array(c.pattern!.utf8),
                                                  replacement: Array(c.replacement!.utf8), outOfBand: c.outOfBand, directions: dirs)
            case "block":
                return BuiltinStreamCallouts.blockOnPattern(name: c.name, weight: c.weight, pattern: Array(c.pattern!.utf8))
            case "allow":
                return BuiltinStreamCallouts.allowConnection(name: c.name, weight: c.weight)
            case "capture":
                return BuiltinStreamCallouts.capture(name: c.name, weight: c.weight, bytes: c.bytes, report: capture ?? { _ in })
            default:
                return BuiltinStreamCallouts.passThrough(name: c.name, weight: c.weight)
            }
        }
    }
}
