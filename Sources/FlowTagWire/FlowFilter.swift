import FlowTagCore

/// Whether a flow is live or has ended.
public enum FlowState: String, Codable, Sendable, CaseIterable {
    case open, closed
}

/// A bad filter: names the parameter and the reason.
public struct FilterError: Error, CustomStringConvertible, Equatable {
    public let parameter: String
    public let reason: String
    public var description: String { "bad filter \(parameter): \(reason)" }
}

/// Filters shared by the API's query parameters and the CLI's flags: all given ones must hold.
public struct FlowFilter: Sendable, Equatable {
    public var pid: UInt32?
    public var exe: String?
    public var comm: String?
    public var uid: UInt32?
    public var cgroup: UInt64?
    public var proto: FlowProtocol?
    public var state: FlowState?
    public var local: IPPrefix?
    public var remote: IPPrefix?
    /// Matches either end's port.
    public var port: UInt16?

    public init() {}

    public static let parameters = ["pid", "exe", "comm", "uid", "cgroup", "proto", "state", "local", "remote", "port"]

    /// From query parameters (`pid=12&remote=10.0.0.0/8`); unknown keys are refused.
    public init(query: [(String, String)]) throws(FilterError) {
        for (key, value) in query {
            switch key {
            case "pid": pid = try Self.number(key, value)
            case "exe": exe = try Self.nonEmpty(key, value)
            case "comm": comm = try Self.nonEmpty(key, value)
            case "uid": uid = try Self.number(key, value)
            case "cgroup": cgroup = try Self.number(key, value)
            case "proto":
                guard let p = FlowProtocol(rawValue: value.lowercased()) else {
                    throw FilterError(parameter: key, reason: "\(value.clipped) is not tcp or udp")
                }
                proto = p
            case "state":
                guard let s = FlowState(rawValue: value.lowercased()) else {
                    throw FilterError(parameter: key, reason: "\(value.clipped) is not open or closed")
                }
                state = s
            case "local", "remote":
                guard let p = IPPrefix(value) else { throw FilterError(parameter: key, reason: "\(value.clipped) is not an address or CIDR prefix") }
                if key == "local" { local = p } else { remote = p }
            case "port": port = try Self.number(key, value)
            default:
                throw FilterError(parameter: key.clipped, reason: "unknown filter (known: \(Self.parameters.joined(separator: ", ")))")
            }
        }
    }

    static func number<T: FixedWidthInteger>(_ key: String, _ value: String) throws(FilterError) -> T {
        guard let v = T(value) else { throw FilterError(parameter: key, reason: "\(value.clipped) is not a number in range") }
        return v
    }

    static func nonEmpty(_ key: String, _ value: String) throws(FilterError) -> String {
        guard !value.isEmpty else { throw FilterError(parameter: key, reason: "empty") }
        return value
    }

    /// The query parameters that express this filter.
    public var query: [(String, String)] {
        var q: [(String, String)] = []
        if let pid { q.append(("pid", "\(pid)")) }
        if let exe { q.append(("exe", exe)) }
        if let comm { q.append(("comm", comm)) }
        if let uid { q.append(("uid", "\(uid)")) }
        if let cgroup { q.append(("cgroup", "\(cgroup)")) }
        if let proto { q.append(("proto", proto.rawValue)) }
        if let state { q.append(("state", state.rawValue)) }
        if let local { q.append(("local", local.description)) }
        if let remote { q.append(("remote", remote.description)) }
        if let port { q.append(("port", "\(port)")) }
        return q
    }

    public func matches(_ r: FlowRecord, state s: FlowState) -> Bool {
        if let pid, r.process.pid != pid { return false }
        if let exe, r.process.exe != exe { return false }
        if let comm, r.process.comm != comm { return false }
        if let uid, r.process.uid != uid { return false }
        if let cgroup, r.process.cgroup != cgroup { return false }
        if let proto, r.protocol != proto { return false }
        if let state, s != state { return false }
        if let local, !local.contains(r.local.address) { return false }
        if let remote, !remote.contains(r.remote.address) { return false }
        if let port, r.local.port != port && r.remote.port != port { return false }
        return true
    }
}
