import ArgumentParser
import FlowTagAgent
import Foundation

@main
struct FlowtagdCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flowtagd",
        abstract: "flowtag agent: attributes every network flow to the process that owns it.")

    @Option(name: .long, help: "cgroup v2 directory to attach to (default: the cgroup2 root from /proc/mounts).")
    var cgroup: String?

    @Option(name: .long, help: "Directory on a bpffs where maps and links are pinned.")
    var pinDir: String = "/sys/fs/bpf/flowtag"

    @Flag(name: .long, help: "Print one JSON object per flow event (same as --output json).")
    var json = false

    @Option(name: .long, help: "Flow events on stdout: text, json or none.")
    var output: String = "text"

    @Option(name: .long, help: "Unix socket of the query API ('' for none).")
    var socket: String = "/run/flowtag/flowtag.sock"

    @Option(name: .long, help: "HOST:PORT for Prometheus /metrics ('' for none).")
    var metricsAddress: String = "127.0.0.1:9742"

    @Option(name: .long, help: "Seconds a UDP flow may stay idle before it ends.")
    var udpIdleSeconds: Int = 60

    func validate() throws {
        guard udpIdleSeconds > 0 else { throw ValidationError("--udp-idle-seconds must be positive") }
        guard ["text", "json", "none"].contains(output) else { throw ValidationError("--output must be text, json or none, not '\(output)'") }
    }

    func run() async throws {
        let format: EventFormat? = json ? .json : (output == "none" ? nil : EventFormat(rawValue: output))
        let code = await AgentRunner.run(.init(
            cgroup: cgroup, pinDirectory: pinDir, socketPath: socket.isEmpty ? nil : socket, format: format,
            udpIdleTimeout: .seconds(udpIdleSeconds), metricsAddress: metricsAddress.isEmpty ? nil : metricsAddress))
        if code != 0 { throw ExitCode(code) }
    }
}

