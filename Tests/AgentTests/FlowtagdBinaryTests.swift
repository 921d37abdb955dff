import Foundation
import Testing
import FlowTagClient
@testable import FlowTagTestSupport
@testable import FlowTagKernel

#if canImport(Glibc)
import Glibc
#endif

/// The real `flowtagd` binary: its JSON stream, its shutdown, its errors.
@Suite("flowtagd binary", .serialized)
struct FlowtagdBinaryTests {
    static func attachedPrograms(_ cgroup: String) throws -> String { try FlowTagTestSupport.attachedPrograms(cgroup) }

    @Test("--json prints one object per event with the documented keys; SIGINT detaches")
    func jsonStream() async throws {
        try ensureBPFFS()
        let cg = try TestCgroup()
        defer { cg.remove() }
        let pins = "/sys/fs/bpf/" + uniqueName("pins")
        let agent = try Child([Paths.flowtagd, "--cgroup", cg.path, "--json", "--pin-dir", pins, "--socket", "", "--metrics-address", "", "--journal", ""])
        defer { agent.kill() }
        for _ in 0..<500 where access(pins + "/links", F_OK) != 0 { try await Task.sleep(for: .milliseconds(20)) }
        try #require(access(pins + "/links", F_OK) == 0, "agent did not start: \(agent.stderrText)")
        // Give the monitor a moment to seed the process table after pinning.
        try await Task.sleep(for: .milliseconds(300))

        let portFile = tempPath("port")
        defer { unlink(portFile) }
        let server = try Child([Paths.python, Paths.peer, "http", portFile, "100", "1"])
        defer { server.kill() }
        let port = try await waitForPort(portFile, peer: server)
        let (rc, _, _) = try await runCommand(cg.wrap(["/usr/bin/curl", "-s", "-o", "/dev/null", "http://127.0.0.1:\(port)/"]))
        #expect(rc == 0)
        let lines = try await agent.waitForLines(2)
        kill(agent.pid, SIGINT)
        #expect(try await agent.wait() == 0)

        let open = try #require(lines.first { $0["event"] as? String == "open" })
        for key in ["event", "flow", "netns", "protocol", "family", "direction", "local", "remote", "process",
                    "attribution", "bytes_sent", "bytes_received", "time"] {
            #expect(open[key] != nil, "missing \(key)")
        }
        let process = try #require(open["process"] as? [String: Any])
        for key in ["pid", "tid", "exe", "comm", "uid", "gid", "cgroup"] { #expect(process[key] != nil, "missing process.\(key)") }
        #expect(process["exe"] as? String == "/usr/bin/curl")
        #expect((open["remote"] as? [String: Any])?["port"] as? Int == Int(port))
        #expect(lines.contains { $0["event"] as? String == "close" })

        #expect(access(pins, F_OK) != 0, "pins remain after SIGINT")
        #expect(try Self.attachedPrograms(cg.path).isEmpty, "programs still attached")
    }

    @Test("a cgroup path that does not exist: clear error, non-zero exit")
    func missingCgroup() async throws {
        let (rc, _, err) = try await runCommand([Paths.flowtagd, "--cgroup", "/sys/fs/cgroup/does-not-exist-\(getpid())"])
        #expect(rc != 0)
        #expect(err.contains("cgroup path does not exist"), "\(err)")
    }

    @Test("a directory that is not a cgroup v2: clear error")
    func notACgroup() async throws {
        let (rc, _, err) = try await runCommand([Paths.flowtagd, "--cgroup", "/tmp"])
        #expect(rc != 0)
        #expect(err.contains("not a cgroup v2 directory"), "\(err)")
    }

    @Test("no bpffs where the pins go: clear error, nothing attached")
    func missingBPFFS() async throws {
        let cg = try TestCgroup()
        defer { cg.remove() }
        let dir = tempPath("nobpffs")
        let (rc, _, err) = try await runCommand([Paths.flowtagd, "--cgroup", cg.path, "--pin-dir", dir + "/flowtag"])
        #expect(rc != 0)
        #expect(err.contains("no BPF filesystem"), "\(err)")
        #expect(try Self.attachedPrograms(cg.path).isEmpty)
        #expect(access(dir, F_OK) != 0)
    }

    @Test("no privileges: clear error, nothing attached")
    func unprivileged() async throws {
        let cg = try TestCgroup()
        defer { cg.remove() }
        let (rc, _, err) = try await runCommand(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                           "--inh-caps=-all", Paths.flowtagd, "--cgroup", cg.path,
                                           "--pin-dir", "/sys/fs/bpf/" + uniqueName("pins")])
        #expect(rc != 0)
        #expect(err.contains("insufficient privileges"), "\(err)")
        #expect(try Self.attachedPrograms(cg.path).isEmpty)
    }

    @Test("bad arguments: usage error")
    func badArguments() async throws {
        let (rc, _, err) = try await runCommand([Paths.flowtagd, "--udp-idle-seconds", "0"])
        #expect(rc != 0)
        #expect(err.contains("--udp-idle-seconds"), "\(err)")
        let (rc2, _, err2) = try await runCommand([Paths.flowtagd, "--no-such-flag"])
        #expect(rc2 != 0)
        #expect(err2.contains("no-such-flag"), "\(err2)")
    }

    @Test("a pin directory already in use is refused, and the running agent is untouched")
    func pinDirectoryInUse() async throws {
        try ensureBPFFS()
        let cg = try TestCgroup()
        defer { cg.remove() }
        let pins = "/sys/fs/bpf/" + uniqueName("pins")
        let first = try Child([Paths.flowtagd, "--cgroup", cg.path, "--pin-dir", pins, "--socket", "", "--metrics-address", "", "--journal", ""])
        defer { first.kill() }
        for _ in 0..<500 where access(pins + "/links", F_OK) != 0 { try await Task.sleep(for: .milliseconds(20)) }
        let (rc, _, err) = try await runCommand([Paths.flowtagd, "--cgroup", cg.path, "--pin-dir", pins, "--socket", "", "--metrics-address", "", "--journal", ""])
        #expect(rc != 0)
        #expect(err.contains("another flowtag agent is running"), "\(err)")
        #expect(access(pins + "/links", F_OK) == 0, "the first agent's pins were removed")
        kill(first.pid, SIGTERM)
        #expect(try await first.wait() == 0)
        #expect(access(pins, F_OK) != 0)
    }
}
