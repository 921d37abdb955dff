import Foundation
import Yams

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

    public init() {}

    public static let defaultPath = "/etc/flowtag/flowtagd.yaml"

    static let keys = ["cgroup", "bpffs", "socket", "socket_group", "metrics_address", "journal",
                       "journal_retention_days", "journal_max_bytes", "output", "udp_idle_seconds"]

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
