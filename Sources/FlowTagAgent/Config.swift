import FlowTagWire
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Yams
import FlowTagRelay
import CYaml
import Logging
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
    /// Group that may use the socket and see every flow: a name or a numeric gid.
    public var socketGroup = "flowtag"
    /// Whether the config named `socketGroup` (then it must exist) or it is the default
    /// (then a missing group leaves the socket to root, with a warning).
    public var socketGroupExplicit = false
    /// HOST:PORT of Prometheus' /metrics; nil: none.
    public var metricsAddress: String? = "127.0.0.1:9742"
    /// SQLite journal of closed flows; nil: none.
    public var journal: String? = "/var/lib/flowtag/flows.db"
    public var journalRetentionDays = 7
    public var journalMaxBytes: Int64 = 1 << 30
    /// Flow events on stdout: text, json or none.
    public var output = "text"
    public var udpIdleSeconds = 60
    /// The least severe diagnostic printed on stderr.
    public var logLevel: Logger.Level = .info
    /// Stream relay: which flows, and the callouts their bytes pass through.
    public var stream = StreamConfig()

    public init() {}

    public static let defaultPath = "/etc/flowtag/flowtagd.yaml"

    static let keys = ["cgroup", "bpffs", "socket", "socket_group", "metrics_address", "journal",
                       "journal_retention_days", "journal_max_bytes", "output", "udp_idle_seconds", "log_level", "stream"]

    /// Limits on what a config may hold: the file, the YAML nodes after alias expansion
    /// (an alias bomb expands exponentially), and any one string.
    public static let maxFileBytes = 1 << 20
    public static let maxNodes = 10_000
    public static let maxStringBytes = 4096

    /// Reads a YAML file; unknown keys and wrong types are refused with the key and why.
    public static func load(path: String) throws(ConfigError) -> AgentConfig {
        try parse(readBounded(path))
    }

    /// The file's text, refused past `maxFileBytes` (read through one descriptor, so a
    /// file that grows meanwhile cannot slip past the check).
    static func readBounded(_ path: String) throws(ConfigError) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ConfigError(key: "", reason: "cannot read \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw ConfigError(key: "", reason: "cannot read \(path): \(String(cString: strerror(errno)))") }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw ConfigError(key: "", reason: "\(path) is not a regular file") }
        var bytes = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &chunk, chunk.count)
            if n < 0 {
                if errno == EINTR { continue }
                throw ConfigError(key: "", reason: "cannot read \(path): \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            bytes += chunk[0..<n]
            guard bytes.count <= maxFileBytes else {
                throw ConfigError(key: "", reason: "\(path) is larger than \(maxFileBytes) bytes")
            }
        }
        guard let text = String(validating: bytes, as: UTF8.self) else { throw ConfigError(key: "", reason: "\(path) is not UTF-8 text") }
        return text
    }

    public static func parse(_ text: String) throws(ConfigError) -> AgentConfig {
        guard text.utf8.count <= maxFileBytes else { throw ConfigError(key: "", reason: "larger than \(maxFileBytes) bytes") }
        try refuseAliases(text)
        let root: Node?
        do { root = try Yams.compose(yaml: text) } catch {
            throw ConfigError(key: "", reason: "not valid YAML: \(String(describing: error).prefix(512))")
        }
        var c = AgentConfig()
        guard let root else { return c } // an empty file: all defaults
        var budget = maxNodes
        guard fitsBudget(root, &budget) else {
            throw ConfigError(key: "", reason: "more than \(maxNodes) YAML nodes once aliases are expanded")
        }
        let node = root.any
        guard let map = node as? [String: Any] else { throw ConfigError(key: "", reason: "the top level must be a mapping of keys to values") }
        for (key, value) in map {
            switch key {
            case "cgroup": c.cgroup = try optionalString(key, value)
            case "bpffs": c.bpffs = try path(key, value)
            case "socket": c.socket = try optionalString(key, value)
            case "socket_group":
                c.socketGroup = try groupName(key, value)
                c.socketGroupExplicit = true
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
            case "log_level":
                let l = try string(key, value)
                guard let level = Logger.Level(rawValue: l) else {
                    throw ConfigError(key: key, reason: "'\(l.clipped)' is not one of \(AgentLog.levels.joined(separator: ", "))")
                }
                c.logLevel = level
            case "stream": c.stream = try StreamConfig.parse(value)
            default:
                throw ConfigError(key: key, reason: "unknown key (known: \(keys.joined(separator: ", ")))")
            }
        }
        return c
    }

    /// Refuses YAML aliases (`*name`) before anything is built: composing a document hashes
    /// mapping keys with their aliases expanded, so a few hundred bytes could take hours.
    /// flowtagd's settings never need one. Malformed YAML is left to the parser's message.
    static func refuseAliases(_ text: String) throws(ConfigError) {
        var parser = yaml_parser_t()
        guard yaml_parser_initialize(&parser) == 1 else { throw ConfigError(key: "", reason: "cannot start the YAML parser") }
        defer { yaml_parser_delete(&parser) }
        var bytes = Array(text.utf8)
        var alias = false
        bytes.withUnsafeMutableBufferPointer { buf in
            yaml_parser_set_input_string(&parser, buf.baseAddress, buf.count)
            var event = yaml_event_t()
            while yaml_parser_parse(&parser, &event) == 1 {
                let type = event.type
                yaml_event_delete(&event)
                if type == YAML_ALIAS_EVENT { alias = true; break }
                if type == YAML_STREAM_END_EVENT { break }
            }
        }
        if alias { throw ConfigError(key: "", reason: "YAML aliases (*name) are not accepted in flowtagd's config") }
    }

    /// Counts nodes depth-first, aliases expanded, stopping as soon as the budget is spent.
    static func fitsBudget(_ node: Node, _ budget: inout Int) -> Bool {
        budget -= 1
        guard budget >= 0 else { return false }
        switch node {
        case .scalar, .alias: return true
        case .sequence(let seq):
            for child in seq where !fitsBudget(child, &budget) { return false }
            return true
        case .mapping(let map):
            for (k, v) in map where !fitsBudget(k, &budget) || !fitsBudget(v, &budget) { return false }
            return true
        }
    }

    static func string(_ key: String, _ v: Any, maxBytes: Int = maxStringBytes) throws(ConfigError) -> String {
        guard let s = v as? String else { throw ConfigError(key: key, reason: "must be a string, not \(describe(v))") }
        guard s.utf8.count <= maxBytes else { throw ConfigError(key: key, reason: "longer than \(maxBytes) bytes") }
        return s
    }

    /// A group name as useradd accepts it (at most 32 characters), or a numeric gid.
    static func groupName(_ key: String, _ v: Any) throws(ConfigError) -> String {
        if let n = v as? Int, !(v is Bool) {
            guard (0...Int(UInt32.max - 1)).contains(n) else { throw ConfigError(key: key, reason: "gid \(n) is out of range") }
            return String(n)
        }
        let s = try string(key, v, maxBytes: 32)
        let ok = !s.isEmpty && s.utf8.enumerated().allSatisfy { i, b in
            (b >= 97 && b <= 122) || (b >= 65 && b <= 90) || b == 95 || (i > 0 && ((b >= 48 && b <= 57) || b == 45 || b == 46))
        }
        guard ok || UInt32(s) != nil else {
            throw ConfigError(key: key, reason: "'\(s)' is not a group name (letters, digits, _ . -, at most 32) or a gid")
        }
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
    /// Connections relayed at once (more are reset, counted).
    public var maxFlows = 4096
    /// On stop, seconds relayed flows may take to end by themselves.
    public var drainSeconds = 10
    /// After the callouts allow a direction: `copy` (the relay thread) or `sockmap` (the kernel).
    public var fastPath = FastPath.copy
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

    static let keys = "max_flows, drain_seconds, fast_path, rules, callouts"
    static let ruleKeys = ["exe", "uid", "cgroup", "local_port", "remote_port", "remote", "direction"]
    static let calloutKeys = ["type", "name", "weight", "pattern", "replacement", "mode", "direction", "bytes"]

    static func parse(_ value: Any) throws(ConfigError) -> StreamConfig {
        if value is NSNull { return StreamConfig() }
        guard let map = value as? [String: Any] else { throw ConfigError(key: "stream", reason: "must be a mapping (\(keys))") }
        var c = StreamConfig()
        for (key, v) in map {
            let k = "stream.\(key)"
            switch key {
            case "max_flows": c.maxFlows = try AgentConfig.int(k, v, 1...65536)
            case "drain_seconds": c.drainSeconds = try AgentConfig.int(k, v, 0...3600)
            case "fast_path":
                let text = try AgentConfig.string(k, v)
                guard let f = FastPath(rawValue: text) else {
                    throw ConfigError(key: k, reason: "'\(text)' is not \(FastPath.allCases.map(\.rawValue).joined(separator: " or "))")
                }
                c.fastPath = f
            case "pool_size":
                throw ConfigError(key: k, reason: "no longer used: the relay keeps no slot pool since connect-redirect (remove the key; see max_flows)")
            case "rules":
                guard let list = v as? [Any] else { throw ConfigError(key: k, reason: "must be a list of rules") }
                guard list.count <= RelayKernel.maxRules else {
                    throw ConfigError(key: k, reason: "at most \(RelayKernel.maxRules) rules, not \(list.count)")
                }
                c.rules = try list.enumerated().map { (i, item) throws(ConfigError) in try parseRule(item, "\(k)[\(i)]") }
            case "callouts":
                guard let list = v as? [Any] else { throw ConfigError(key: k, reason: "must be a list of callouts") }
                c.callouts = try list.enumerated().map { (i, item) throws(ConfigError) in try parseCallout(item, "\(k)[\(i)]", index: i) }
                let names = c.callouts.map(\.name)
                if Set(names).count != names.count { throw ConfigError(key: k, reason: "callout names must be unique") }
            default:
                throw ConfigError(key: k, reason: "unknown key (known: \(keys))")
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
        if r.direction == "inbound" && r.localPort == nil {
            throw ConfigError(key: "\(k).local_port", reason: "an inbound rule needs the server's port (local_port)")
        }
        if r.direction == "inbound", let named = ["exe", "uid", "cgroup"].first(where: { m[$0] != nil }) {
            throw ConfigError(key: "\(k).\(named)", reason: "inbound rules select by local_port, remote and remote_port: "
                              + "the process that will accept a connection is not known when it arrives (docs/stream-relay.md)")
        }
        return r
    }

    static func parseCallout(_ item: Any, _ k: String, index: Int) throws(ConfigError) -> CalloutSpec {
        guard let m = item as? [String: Any] else { throw ConfigError(key: k, reason: "must be a mapping (\(calloutKeys.joined(separator: ", ")))") }
        guard let t = m["type"] else { throw ConfigError(key: "\(k).type", reason: "missing (pass, allow, edit, block or capture)") }
        let type = try AgentConfig.string("\(k).type", t)
        guard ["pass", "allow", "edit", "block", "capture"].contains(type) else { throw ConfigError(key: "\(k).type", reason: "'\(type)' is not pass, allow, edit, block or capture") }
        var c = CalloutSpec(type: type, name: "\(type)-\(index)", weight: UInt16(100 - min(index, 99)))
        for (key, v) in m {
            let kk = "\(k).\(key)"
            switch key {
            case "type": break
            case "name": c.name = try AgentConfig.string(kk, v, maxBytes: 128)
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
