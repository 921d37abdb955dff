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

    @Flag(name: .long, help: "Print one JSON object per flow event.")
    var json = false

    @Option(name: .long, help: "Seconds a UDP flow may stay idle before it ends.")
    var udpIdleSeconds: Int = 60

    func validate() throws {
        guard udpIdleSeconds > 0 else { throw ValidationError("--udp-idle-seconds must be positive") }
    }

    func run() async throws {
        let code = await EventStreamRunner.run(.init(
            cgroup: cgroup, pinDirectory: pinDir, format: json ? .json : .text,
            udpIdleTimeout: .seconds(udpIdleSeconds)))
        if code != 0 { throw ExitCode(code) }
    }
}

