import FlowTagWire
import ArgumentParser
import FlowTagAgent

import Logging
import Foundation

@main
struct FlowtagdCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flowtagd",
        abstract: "flowtag agent: attributes every network flow to the process that owns it.",
        discussion: """
        Settings come from the config file (default \(AgentConfig.defaultPath) when it exists;
        every key and default is documented in deploy/flowtagd.yaml); flags override it.
        """)

    @Option(name: .long, help: "YAML config file.")
    var config: String?

    @Option(name: .long, help: "cgroup v2 directory to attach to (default: the cgroup2 root from /proc/mounts).")
    var cgroup: String?

    @Option(name: [.customLong("bpffs"), .customLong("pin-dir")], help: "Pin directory on a bpffs (default /sys/fs/bpf/flowtag).")
    var bpffs: String?

    @Option(name: .long, help: "Unix socket of the query API, '' for none (default /run/flowtag/flowtag.sock).")
    var socket: String?

    @Option(name: .long, help: "HOST:PORT for Prometheus /metrics, '' for none (default 127.0.0.1:9742).")
    var metricsAddress: String?

    @Option(name: .long, help: "SQLite journal of closed flows, '' for none (default /var/lib/flowtag/flows.db).")
    var journal: String?

    @Flag(name: .long, help: "Print one JSON object per flow event (same as --output json).")
    var json = false

    @Option(name: .long, help: "Flow events on stdout: text, json or none (default text).")
    var output: String?

    @Option(name: .long, help: "Seconds a UDP flow may stay idle before it ends (default 60).")
    var udpIdleSeconds: Int?

    @Option(name: .long, help: "Least severe diagnostic printed: trace, debug, info, notice, warning, error, critical (default info).")
    var logLevel: String?

    @Flag(name: .long, help: "Check the config file and flags, then exit: 0 when usable, 78 naming the key when not.")
    var checkConfig = false

    func validate() throws {
        if let u = udpIdleSeconds, u <= 0 { throw ValidationError("--udp-idle-seconds must be positive") }
        if let o = output, !["text", "json", "none"].contains(o) { throw ValidationError("--output must be text, json or none, not '\(o)'") }
        if let m = metricsAddress, !m.isEmpty, parseHostPort(m) == nil { throw ValidationError("--metrics-address '\(m.clipped)' is not HOST:PORT") }
        if let l = logLevel, !AgentLog.levels.contains(l) { throw ValidationError("--log-level must be one of \(AgentLog.levels.joined(separator: ", ")), not '\(l.clipped)'") }
    }

    func settings() throws -> AgentConfig {
        var c = AgentConfig()
        if let path = config {
            c = try AgentConfig.load(path: path)
        } else if FileManager.default.fileExists(atPath: AgentConfig.defaultPath) {
            c = try AgentConfig.load(path: AgentConfig.defaultPath)
        }
        if let cgroup { c.cgroup = cgroup }
        if let bpffs { c.bpffs = bpffs }
        if let socket { c.socket = socket.isEmpty ? nil : socket }
        if let metricsAddress { c.metricsAddress = metricsAddress.isEmpty ? nil : metricsAddress }
        if let journal { c.journal = journal.isEmpty ? nil : journal }
        if let output { c.output = output }
        if json { c.output = "json" }
        if let udpIdleSeconds { c.udpIdleSeconds = udpIdleSeconds }
        if let l = logLevel, let level = Logger.Level(rawValue: l) { c.logLevel = level }
        return c
    }

    func run() async throws {
        AgentLog.bootstrap(level: logLevel.flatMap(Logger.Level.init(rawValue:)) ?? .info)
        let log = Logger(label: "flowtagd")
        let c: AgentConfig
        do { c = try settings() } catch let e as ConfigError {
            log.error("\(e)")
            throw ExitCode(78) // EX_CONFIG
        }
        AgentLog.bootstrap(level: c.logLevel)
        if checkConfig {
            do { try AgentRunner.check(c) } catch {
                log.error("\(error)")
                throw ExitCode(78)
            }
            print("flowtagd: config OK")
            return
        }
        let code = await AgentRunner.run(c)
        if code != 0 { throw ExitCode(code) }
    }
}
