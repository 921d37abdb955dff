import Foundation
import FlowTagAgent
import FlowTagKernel
import FlowTagClient

#if canImport(Glibc)
import Glibc
#endif

/// A listening TCP socket on a free loopback port (to take a port away from the agent).
func socketListener() -> (fd: Int32, port: UInt16) {
    // Close-on-exec, as every fd a test holds: a child spawned meanwhile by another test
    // would hold the listener too (and `ss` name it as the one listening).
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
    listen(fd, 1)
    _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    return (fd, UInt16(bigEndian: addr.sin_port))
}


/// The real agent on a private cgroup, pin directory, socket and journal (all unique to
/// the test), restartable on the same ones (kill -9 tests). The one agent fixture of the
/// kernel, agent and relay tests.
final class RunningAgent: @unchecked Sendable {
    let cgroup: TestCgroup
    let socket: String
    let pins: String
    let journal: String
    let process: Child
    private var ownsCgroup: Bool

    init(extra: [String] = [], journal: String? = nil, cgroup: TestCgroup? = nil, pins: String? = nil,
         socket: String? = nil) async throws {
        PoolWatchdog.start()
        try ensureBPFFS()
        ownsCgroup = cgroup == nil
        self.cgroup = try cgroup ?? TestCgroup()
        self.socket = socket ?? tempPath("api") + ".sock"
        self.pins = pins ?? "/sys/fs/bpf/" + uniqueName("pins")
        self.journal = journal ?? tempPath("journal") + ".db"
        process = try Child([Paths.flowtagd, "--cgroup", self.cgroup.path, "--pin-dir", self.pins, "--socket", self.socket,
                             "--output", "none", "--metrics-address", "127.0.0.1:0", "--journal", self.journal] + extra)
        var up = await answers()
        for _ in 0..<1000 where !up && process.isRunning {
            try await Task.sleep(for: .milliseconds(20))
            up = await answers()
        }
        guard up else {
            let err = process.stderrText
            process.kill()
            if ownsCgroup { self.cgroup.remove() }
            throw TestFailure("agent did not start: \(err)")
        }
    }

    /// The CLI against this agent, as root or as another user.
    func cli(_ args: [String], as user: UInt32? = nil) async throws -> (Int32, String, String) {
        var argv = [Paths.flowtag] + args + ["--socket", socket]
        if let user { argv = ["/usr/bin/setpriv", "--reuid=\(user)", "--regid=\(user)", "--clear-groups"] + argv }
        return try await runCommand(argv)
    }

    func answers() async -> Bool {
        let socket = self.socket
        return (try? await offPool { try APIClient(socketPath: socket).get("/v1/version", timeoutSeconds: 2) })?.status == 200
    }

    /// The same agent started again on the same cgroup, pins, socket and journal.
    /// The cgroup goes with the newest agent (the one a test cleans up).
    func restarted() async throws -> RunningAgent {
        let next = try await RunningAgent(journal: journal, cgroup: cgroup, pins: pins, socket: socket)
        next.ownsCgroup = ownsCgroup
        ownsCgroup = false
        return next
    }

    // The API and metrics are read without blocking a thread of Swift's cooperative pool
    // (one per core, shared by every test): tests polling them on a busy machine held the
    // whole pool, and other tests' awaits resumed tens of seconds late.
    func stats() async throws -> [String: Any] {
        let socket = self.socket
        let r = try await offPool { try APIClient(socketPath: socket).get("/v1/stats") }
        return (try JSONSerialization.jsonObject(with: Data(r.body)) as? [String: Any]) ?? [:]
    }

    func metrics() async throws -> String {
        try await runCommand(try metricsCommand()).1
    }

    /// `metrics()` for a failure message (an autoclosure cannot await): blocks its thread.
    func metricsForMessage() -> String {
        guard let command = try? metricsCommand() else { return "no metrics address" }
        return (try? runQuickCommand(command))?.1 ?? "curl failed"
    }

    /// curl of the agent's /metrics (its address is in the agent's first lines).
    private func metricsCommand() throws -> [String] {
        guard let line = process.stderrText.split(separator: "\n").first(where: { $0.contains("metrics on http://") }),
              let url = line.split(separator: " ").first(where: { $0.hasPrefix("http://") }) else { throw TestFailure("no metrics address") }
        return ["/usr/bin/curl", "-s", "-m", "10", String(url)]
    }

    /// Resident memory of the agent, bytes.
    var rss: Int {
        guard let status = try? String(contentsOfFile: "/proc/\(process.pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kb = Int(line.split(separator: " ").dropFirst().first ?? "") else { return 0 }
        return kb << 10
    }

    /// A connect loop inside the agent's cgroup (count connects, or for `seconds`).
    /// With `reportAt`, the storm prints {"reached": n} first, once it made that many connects.
    func storm(port: UInt16, count: Int = 0, seconds: Int = 0, portsFile: String? = nil, udpPort: UInt16 = 0,
               reportAt: Int = 0) throws -> Child {
        try Child(cgroup.wrap([Paths.python, Paths.peer, "connect-loop", "\(port)", "\(count)", portsFile ?? "/dev/null",
                               "\(seconds)", "\(udpPort)", "\(reportAt)"]))
    }

    /// A first storm, so the agent's memory is at its working size before a measurement.
    func warmUp(port: UInt16) async throws {
        let s = try storm(port: port, count: 5000)
        _ = try await s.waitForLines(1, timeout: 60)
        try await Task.sleep(for: .seconds(2))
    }

    /// Journal rows of one client process to one port: (rows, distinct flows: cookie and local port).
    func journalCount(pid: Int, remotePort: Int, proto: String = "tcp") async throws -> (rows: Int, distinct: Int) {
        let (rc, out, err) = try await runCommand(["/usr/bin/sqlite3", journal,
                                             "PRAGMA busy_timeout=5000; SELECT COUNT(*), COUNT(DISTINCT flow || ':' || local_port) FROM flows WHERE pid = \(pid) "
                                             + "AND remote_port = \(remotePort) AND protocol = '\(proto)'"])
        guard rc == 0 else { throw TestFailure("sqlite3: \(err)") }
        let parts = out.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: "|").compactMap { Int($0) }
        return (parts.first ?? 0, parts.last ?? 0)
    }

    func journalPorts(pid: Int, remotePort: Int, proto: String = "tcp") async throws -> Set<Int> {
        let (_, out, _) = try await runCommand(["/usr/bin/sqlite3", journal,
                                          "PRAGMA busy_timeout=5000; SELECT local_port FROM flows WHERE pid = \(pid) AND remote_port = \(remotePort) "
                                          + "AND protocol = '\(proto)'"])
        return Set(out.split(separator: "\n").compactMap { Int($0) })
    }

    /// Nothing attached to the cgroup, nothing pinned.
    var nothingLeft: Bool {
        ((try? attachedPrograms(cgroup.path)) ?? "x").isEmpty && access(pins, F_OK) != 0
    }

    /// SIGTERM, then the cgroup goes (whatever the agent did: see `stopCleanly`).
    func stop() async {
        kill(process.pid, SIGTERM)
        _ = try? await process.wait(timeout: 60)
        if ownsCgroup { cgroup.remove() }
    }

    /// SIGTERM; the agent must exit 0 and leave nothing attached or pinned.
    func stopCleanly() async throws {
        kill(process.pid, SIGTERM)
        let status = try await process.wait(timeout: 60)
        guard status == 0 else { throw TestFailure("the agent exited \(status): \(process.stderrText.suffix(1000))") }
        guard nothingLeft else { throw TestFailure("programs or pins left behind after SIGTERM") }
    }

    /// Whatever happened: the agent gone, its pins, cgroup and journal removed.
    func cleanUp() {
        process.kill()
        if access(pins, F_OK) == 0 { try? KernelPrograms.removePins(at: pins); rmdir(pins) }
        if ownsCgroup { cgroup.remove() }
        for s in ["", "-wal", "-shm"] { unlink(journal + s) }
        unlink(socket)
    }
}

/// Runs `body` with a fresh agent; stops it afterwards, also when `body` throws.
func withAgent(_ body: (RunningAgent) async throws -> Void) async throws {
    let a = try await RunningAgent()
    do { try await body(a) } catch { await a.stop(); a.cleanUp(); throw error }
    await a.stop()
    a.cleanUp()
}
