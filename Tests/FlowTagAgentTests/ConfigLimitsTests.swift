import Foundation
import Testing
import SeededRandom
@testable import FlowTagAgent

/// Hostile config files: every refusal names its key, nothing runs away.
@Suite("config limits")
struct ConfigLimitsTests {
    static func refusal(_ yaml: String) -> ConfigError? {
        do { _ = try AgentConfig.parse(yaml); return nil } catch { return error }
    }

    @Test("an alias bomb is refused before anything is built, also as a mapping key")
    func aliasBomb() {
        var yaml = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
        for i in 1...12 { yaml += "a\(i): &a\(i) [" + Array(repeating: "*a\(i - 1)", count: 10).joined(separator: ", ") + "]\n" }
        let e = Self.refusal(yaml)
        #expect(e?.reason.contains("YAML aliases") == true, "\(String(describing: e))")
        let key = Self.refusal("a0: &a0 [x, x, x]\na1: &a1 [*a0, *a0, *a0]\nk: {*a1: 1}\n")
        #expect(key?.reason.contains("YAML aliases") == true, "\(String(describing: key))")
    }

    @Test("more nodes than the limit, without aliases, are refused; at the limit they parse")
    func nodeBudget() {
        let over = "x: [" + Array(repeating: "1", count: AgentConfig.maxNodes).joined(separator: ",") + "]\n"
        #expect(Self.refusal(over)?.reason.contains("YAML nodes") == true)
        // The document, the mapping, the key and the list are 4 nodes: this many items fit.
        let at = "x: [" + Array(repeating: "1", count: AgentConfig.maxNodes - 4).joined(separator: ",") + "]\n"
        #expect(Self.refusal(at)?.reason.contains("YAML nodes") != true)
    }

    @Test("a file past 1 MiB is refused")
    func hugeFile() {
        let yaml = "output: text\n#" + String(repeating: "x", count: AgentConfig.maxFileBytes) + "\n"
        #expect(Self.refusal(yaml)?.reason.contains("larger than") == true)
    }

    @Test("strings past their limit are refused with their key",
          arguments: [("journal", 4097), ("bpffs", 5000), ("socket", 1 << 16), ("cgroup", 1 << 19)])
    func longStrings(_ key: String, _ length: Int) {
        let e = Self.refusal("\(key): \"/" + String(repeating: "p", count: length) + "\"\n")
        #expect(e?.key == key && e?.reason.contains("longer than") == true, "\(String(describing: e))")
    }

    @Test("socket_group: names as useradd takes them, or a gid; anything else refused with the key",
          arguments: ["", "$(reboot)", "a b", "-x", "1abc\u{0}", String(repeating: "g", count: 33), "g\u{e9}", String(repeating: "g", count: 500_000)])
    func badGroups(_ name: String) {
        let yaml = "socket_group: \"" + name.replacingOccurrences(of: "\u{0}", with: "\\0") + "\"\n"
        let e = Self.refusal(yaml)
        #expect(e?.key == "socket_group", "\(name.prefix(20)): \(String(describing: e))")
        #expect((e?.description.utf8.count ?? 0) < 512)
    }

    @Test("good group names and gids are taken, and remembered as given")
    func goodGroups() throws {
        for (yaml, name) in [("socket_group: flowtag", "flowtag"), ("socket_group: _svc.x-1", "_svc.x-1"),
                             ("socket_group: 998", "998"), ("socket_group: \"0\"", "0")] {
            let c = try AgentConfig.parse(yaml)
            #expect(c.socketGroup == name && c.socketGroupExplicit)
        }
        #expect(!AgentConfig().socketGroupExplicit)
    }

    @Test("a group the config names must exist; the default may be missing")
    func groupLookup() throws {
        var c = AgentConfig()
        c.socketGroup = "no-such-group-\(getpid())"
        #expect(try GroupLookup.socketGroup(c) == nil) // default: the socket is root's alone
        c.socketGroupExplicit = true
        #expect(throws: ConfigError.self) { try GroupLookup.socketGroup(c) }
        c.socketGroup = "4242"
        #expect(try GroupLookup.socketGroup(c) == 4242)
        c.socketGroup = "root"
        #expect(try GroupLookup.socketGroup(c) == 0)
    }

    @Test("numbers at and past their ranges", arguments: [
        ("udp_idle_seconds: 0", "udp_idle_seconds"), ("udp_idle_seconds: 86401", "udp_idle_seconds"),
        ("udp_idle_seconds: 99999999999999999999999", "udp_idle_seconds"), ("udp_idle_seconds: -1", "udp_idle_seconds"),
        ("journal_retention_days: 36501", "journal_retention_days"), ("journal_max_bytes: 1048575", "journal_max_bytes"),
        ("stream: {max_flows: 65537}", "stream.max_flows"), ("stream: {max_flows: 0}", "stream.max_flows"),
        ("stream: {drain_seconds: 3601}", "stream.drain_seconds"), ("stream: {drain_seconds: -1}", "stream.drain_seconds"),
        ("stream: {pool_size: 32}", "stream.pool_size"), ("stream: {rules: [{direction: inbound, local_port: 80, exe: /bin/sh}]}", "stream.rules[0].exe"), ("stream: {rules: [{direction: inbound}]}", "stream.rules[0].local_port"),
        ("stream: {fast_path: splice}", "stream.fast_path"), ("stream: {fast_path: 1}", "stream.fast_path"),
        ("stream: {fast_path: [sockmap]}", "stream.fast_path"), ("stream: {fast_path: \"\"}", "stream.fast_path"),
        ("log_level: loud", "log_level"), ("log_level: 3", "log_level"),
    ])
    func ranges(_ yaml: String, _ key: String) {
        #expect(Self.refusal(yaml)?.key == key, "\(yaml): \(String(describing: Self.refusal(yaml)))")
    }

    @Test("log_level is read")
    func logLevel() throws {
        #expect(try AgentConfig.parse("log_level: debug").logLevel == .debug)
        #expect(AgentConfig().logLevel == .info)
    }

    @Test("seeded random documents: parsed or refused with a key or reason, never a trap")
    func randomDocuments() {
        let seed = ProcessInfo.processInfo.environment["FLOWTAG_FUZZ_SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 1...UInt64(UInt32.max))
        print("config fuzz: seed \(seed) (replay with FLOWTAG_FUZZ_SEED=\(seed))")
        var rng = SeededGenerator(seed: seed)
        let keys = ["cgroup", "bpffs", "socket", "socket_group", "metrics_address", "journal", "journal_retention_days",
                    "journal_max_bytes", "output", "udp_idle_seconds", "log_level", "stream", "colour", ""]
        let values = ["", "~", "null", "true", "0", "-1", "1e999", "99999999999999999999", "\"/x\"", "relative", "[1, 2]",
                      "{a: 1}", "\"\\u0000\"", "&a x", "*a", "!!binary aGk=", "|\n  block", "'quoted'", "json", "[::1]:9742",
                      "{rules: [{exe: /usr/bin/curl}], callouts: [{type: edit, pattern: a}]}", "{rules: 5}", "{max_flows: x}", "{drain_seconds: 1e9}", "{fast_path: sockmap}", "{fast_path: SOCKMAP}"]
        for _ in 0..<2000 {
            var doc = ""
            for _ in 0..<Int.random(in: 0...6, using: &rng) {
                doc += "\(keys.randomElement(using: &rng)!): \(values.randomElement(using: &rng)!)\n"
            }
            if Int.random(in: 0..<10, using: &rng) == 0 { doc = String(doc.shuffled(using: &rng)) }
            do { _ = try AgentConfig.parse(doc) } catch {
                #expect(!error.description.isEmpty && error.description.utf8.count < 2048, "seed \(seed): \(doc)")
            }
        }
    }
}

