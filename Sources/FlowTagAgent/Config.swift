import Foundation
import Yams
import FlowTagCore

/// A config file that cannot be used: names the key and the reason.
public struct ConfigError: Error, CustomStringConvertible, Equatable {
    public let key: String
    public let reason: String
    public var description: String { key.isEmpty ? "config: \(reason)" : "config key '\(key)': \(reason)" }
}

/// flowtagd's settings. Every default is here and in `deploy/flowtagd.yaml`; the config
/// file overrides the defaults and command-line flags override the file.
public struct AgentConfig: Sendable, Equatable {
    /// cgroup v2 directory to attach to; nil: the cgroup2 root found in /proc/mounts.
    public var cgroup: String? = nil
    /// Pin directory on a bpffs.
    public var bpffs = "/sys/fs/bpf/flowtag"
    /// Unix socket of the query API; nil: no API.
    public var socket: String? = "/run/flowtag/flowtag.sock"
    /// Group that may use the socket and see every flow.
    public var socketGroup = "flowtag"
    /// HOST:PORT of Prometheus' /metrics; nil: none.
    public var metricsAddress: String? = "127.0.0.1:9742"
    /// SQLite journal of closed flows; nil: none.
    public var journal: String? = "/var/lib/flowtag/flows.db"
    public var journalRetentionDays = 7
    public var journalMaxBytes: Int64 = 1 << 30
    /// Flow events on stdout: text, json or none.
    public var output = "text"
    public var udpIdleSeconds = 60
    /// Stream relay: which flows, and the callouts their bytes pass through.
    public var stream = StreamConfig()

    public init() {}

    public static let defaultPath = "/etc/flowtag/flowtagd.yaml"

    static let keys = ["cgroup", "bpffs", "socket", "socket_group", "metrics_address", "journal",
                       "journal_retention_days", "journal_max_bytes", "output", "udp_idle_seconds", "stream"]

    /// Reads a YAML file; unknown keys and wrong types are refused with the key and why.
    public static func load(path: String) throws(ConfigError) -> AgentConfig {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw ConfigError(key: "", reason: "cannot read \(path): \(error.localizedDescription)")
        }
        return try parse(text)
    }

    public static func parse(_ text: String) throws(ConfigError) -> AgentConfig {
        let node: Any?
        do { node = try Yams.load(yaml: text) } catch {
            throw ConfigError(key: "", reason: "not valid YAML: \(error)")
        }
        var c = AgentConfig()
        guard let node else { return c } // an empty file: all defaults
        guard let map = node as? [String: Any] else { throw ConfigError(key: "", reason: "the top level must be a mapping of keys to values") }
        for (key, value) in map {
            switch key {
            case "cgroup": c.cgroup = try optionalString(key, value)
            case "bpffs": c.bpffs = try path(key, value)
            case "socket": c.socket = try optionalString(key, value)
            case "socket_group": c.socketGroup = try string(key, value)
            case "metrics_address":
                c.metricsAddress = try optionalString(key, value)
                if let a = c.metricsAddress, parseHostPort(a) == nil { throw ConfigError(key: key, reason: "'\(a)' is not HOST:PORT") }
            case "journal": c.journal = try optionalString(key, value)
            case "journal_retention_days": c.journalRetentionDays = try int(key, value, 1...36500)
            case "journal_max_bytes": c.journalMaxBytes = Int64(try int(key, value, 1 << 20...Int.max))
            case "output":
                let o = try string(key, value)
                guard ["text", "json", "none"].contains(o) else { throw ConfigError(key: key, reason: "'\(o)' is not text, json or none") }
                c.output = o
            case "udp_idle_seconds": c.udpIdleSeconds = try int(key, value, 1...86400)
            case "stream": c.stream = try StreamConfig.parse(value)
            default:
                throw ConfigError(key: key, reason: "unknown key (known: \(keys.joined(separator: ", ")))")
            }
        }
        return c
    }

    static func string(_ key: String, _ v: Any) throws(ConfigError) -> String {
        guard let s = v as? String else { throw ConfigError(key: key, reason: "must be a string, not \(describe(v))") }
        return s
    }

    /// "" or null turn the feature off.
    static func optionalString(_ key: String, _ v: Any) throws(ConfigError) -> String? {
        if v is NSNull { return nil }
        let s = try string(key, v)
        return s.isEmpty ? nil : s
    }

    static func path(_ key: String, _ v: Any) throws(ConfigError) -> String {
        let s = try string(key, v)
        guard s.hasPrefix("/") else { throw ConfigError(key: key, reason: "must be an absolute path, not '\(s)'") }
        return s
    }

    static func int(_ key: String, _ v: Any, _ range: ClosedRange<Int>) throws(ConfigError) -> Int {
        guard let i = v as? Int, !(v is Bool) else { throw ConfigError(key: key, reason: "must be a whole number, not \(describe(v))") }
        guard range.contains(i) else { throw ConfigError(key: key, reason: "\(i) is out of range \(range.lowerBound)...\(range.upperBound)") }
        return i
    }

    static func describe(_ v: Any) -> String {
        switch v {
        case is String: return "a string"
        case is Bool: return "a boolean"
        case is Int, is Double: return "a number"
        case is [Any]: return "a list"
        case is [String: Any]: return "a mapping"
        default: return "\(type(of: v))"
        }
    }
}

/// `host:port` → (host, port), IPv6 hosts in brackets.
public func parseHostPort(_ s: String) -> (String, Int)? {
    guard let colon = s.lastIndex(of: ":"), let port = Int(s[s.index(after: colon)...]), (0...65535).contains(port) else { return nil }
    var host = String(s[..<colon])
    if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    return host.isEmpty ? nil : (host, port)
}

/// The `stream:` section: selection rules for the relay and its callouts.
public struct StreamConfig: Sendable, Equatable {
    public var poolSize = 32
    public var rules: [Rule] = []
    public var callouts: [CalloutSpec] = []

    public init() {}

    /// One selection rule (all given conditions must hold).
    public struct Rule: Sendable, Equatable {
        public var exe: String?
        public var uid: UInt32?
        public var cgroup: String?
        public var localPort: UInt16?
        public var remotePort: UInt16?
        public var remote: String?
        public var direction: String?
        public init() {}
    }

    public struct CalloutSpec: Sendable, Equatable {
        public var type: String
        public var name: String
        public var weight: UInt16
        public var pattern: String?
        public var replacement: String?
        public var outOfBand = false
        public var direction = "both"
        public var bytes = 256
    }

    static let ruleKeys = ["exe", "uid", "cgroup", "local_port", "remote_port", "remote", "direction"]
    static let calloutKeys = ["type", "name", "weight", "pattern", "replacement", "mode", "direction", "bytes"]

    static func parse(_ value: Any) throws(ConfigError) -> StreamConfig {
        if value is NSNull { return StreamConfig() }
        guard let map = value as? [String: Any] else { throw ConfigError(key: "stream", reason: "must be a mapping (pool_size, rules, callouts)") }
        var c = StreamConfig()
        for (key, v) in map {
            let k = "stream.\(key)"
            switch key {
            case "pool_size": c.poolSize = try AgentConfig.int(k, v, 1...2048)
            case "rules":
                guard let list = v as? [Any] else { throw ConfigError(key: k, reason: "must be a list of rules") }
                guard list.count <= 16 else { throw ConfigError(key: k, reason: "at most 16 rules, not \(list.count)") }
                c.rules = try list.enumerated().map { (i, item) throws(ConfigError) in try parseRule(item, "\(k)[\(i)]") }
            case "callouts":
                guard let list = v as? [Any] else { throw ConfigError(key: k, reason: "must be a list of callouts") }
                c.callouts = try list.enumerated().map { (i, item) throws(ConfigError) in try parseCallout(item, "\(k)[\(i)]", index: i) }
                let names = c.callouts.map(\.name)
                if Set(names).count != names.count { throw ConfigError(key: k, reason: "callout names must be unique") }
            default:
                throw ConfigError(key: k, reason: "unknown key (known: pool_size, rules, callouts)")
            }
        }
        return c
    }

    static func parseRule(_ item: Any, _ k: String) throws(ConfigError) -> Rule {
        guard let m = item as? [String: Any] else { throw ConfigError(key: k, reason: "must be a mapping (\(ruleKeys.joined(separator: ", ")))") }
        var r = Rule()
        for (key, v) in m {
            let kk = "\(k).\(key)"
            switch key {
            case "exe": r.exe = try AgentConfig.path(kk, v)
            case "uid": r.uid = UInt32(try AgentConfig.int(kk, v, 0...Int(UInt32.max - 1)))
            case "cgroup": r.cgroup = try AgentConfig.path(kk, v)
            case "local_port": r.localPort = UInt16(try AgentConfig.int(kk, v, 1...65535))
            case "remote_port": r.remotePort = UInt16(try AgentConfig.int(kk, v, 1...65535))
            case "remote":
                let text = try AgentConfig.string(kk, v)
                guard IPPrefix(text) != nil else { throw ConfigError(key: kk, reason: "'\(text)' is not an address or CIDR prefix") }
                r.remote = text
            case "direction":
                let d = try AgentConfig.string(kk, v)
                guard d == "outbound" || d == "inbound" else { throw ConfigError(key: kk, reason: "'\(d)' is not outbound or inbound") }
                r.direction = d
            default: throw ConfigError(key: kk, reason: "unknown key (known: \(ruleKeys.joined(separator: ", ")))")
            }
        }
        return r
    }

    static func parseCallout(_ item: Any, _ k: String, index: Int) throws(ConfigError) -> CalloutSpec {
        guard let m = item as? [String: Any] else { throw ConfigError(key: k, reason: "must be a mapping (\(calloutKeys.joined(separator: ", ")))") }
        guard let t = m["type"] else { throw ConfigError(key: "\(k).type", reason: "missing (pass, edit, block or capture)") }
        let type = try AgentConfig.string("\(k).type", t)
        guard ["pass", "edit", "block", "capture"].contains(type) else { throw ConfigError(key: "\(k).type", reason: "'\(type)' is not pass, edit, block or capture") }
        var c = CalloutSpec(type: type, name: "\(type)-\(index)", weight: UInt16(100 - min(index, 99)))
        for (key, v) in m {
            let kk = "\(k).\(key)"
            switch key {
            case "type": break
            case "name": c.name = try AgentConfig.string(kk, v)
            case "weight": c.weight = UInt16(try AgentConfig.int(kk, v, 0...65535))
            case "pattern":
                c.pattern = try AgentConfig.string(kk, v)
                if c.pattern!.isEmpty { throw ConfigError(key: kk, reason: "must not be empty") }
            case "replacement": c.replacement = try AgentConfig.string(kk, v)
            case "mode":
                let mode = try AgentConfig.string(kk, v)
                guard mode == "inline" || mode == "out-of-band" else { throw ConfigError(key: kk, reason: "'\(mode)' is not inline or out-of-band") }
                c.outOfBand = mode == "out-of-band"
            case "direction":
                let d = try AgentConfig.string(kk, v)
                guard ["both", "send", "receive"].contains(d) else { throw ConfigError(key: kk, reason: "'\(d)' is not both, send or receive") }
                c.direction = d
            case "bytes": c.bytes = try AgentConfig.int(kk, v, 1...(1 << 20))
            default: throw ConfigError(key: kk, reason: "unknown key (known: \(calloutKeys.joined(separator: ", ")))")
            }
        }
        switch type {
        case "edit":
            guard c.pattern != nil else { throw ConfigError(key: "\(k).pattern", reason: "an edit callout needs a pattern") }
            guard c.replacement != nil else { throw ConfigError(key: "\(k).replacement", reason: "an edit callout needs a replacement") }
        case "block":
            guard c.pattern != nil else { throw ConfigError(key: "\(k).pattern", reason: "a block callout needs a pattern") }
        default: break
        }
        return c
    }
}
