import Foundation
import Testing
import Synchronization
@testable import FlowTagTestSupport

#if canImport(Glibc)
import Glibc
#endif

extension Paths {
    static let relayPeer = repo + "/Tests/Peers/relaypeer.py"
}

/// A relaypeer server outside the agent's cgroup (optionally in a network namespace).
func startServer(mode: String = "echo", bind: String = "127.0.0.1", netns: String? = nil, expect: Int = 0,
                 port: UInt16 = 0, in cgroup: TestCgroup? = nil) async throws -> (Child, UInt16) {
    let portFile = tempPath("port")
    var argv = [Paths.python, Paths.relayPeer, "server", portFile, "--bind", bind, "--mode", mode, "--expect", "\(expect)",
                "--port", "\(port)"]
    if let netns { argv = ["/usr/sbin/ip", "netns", "exec", netns] + argv }
    if let cgroup { argv = cgroup.wrap(argv) }
    defer { unlink(portFile) } // also when the server writes it after the test gave up
    let server = try Child(argv)
    return (server, try await waitForPort(portFile, peer: server))
}

/// A TCP port nothing is bound to now (127.0.0.1 and ::1), below the kernel's ephemeral
/// range: no client's source port can take it before the test's server binds it (other
/// suites run at the same time). Spread by process id and a counter, and claimed host-wide
/// (HostClaims), since being unbound is not enough: an inbound rule names a port nothing
/// may be bound to yet.
func freeTCPPort(claims: HostClaims = .shared) throws -> UInt16 {
    let range = (try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8)) ?? "32768"
    let low = range.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).first.flatMap { Int($0) } ?? 32768
    let span = max(1, low - 10_000)
    for _ in 0..<2000 {
        let n = Int(portCounter.add(1, ordering: .relaxed).newValue)
        let port = UInt16(10_000 + (Int(getpid()) * 7919 + n * 104_729) % span)
        guard bindable(port, family: AF_INET) && bindable(port, family: AF_INET6),
              let claim = try claims.claim(Int(port)) else { continue }
        heldPortClaims.withLock { $0.append(claim) }
        return port
    }
    throw TestFailure("no free, unclaimed TCP port below \(low) (claims in \(claims.path))")
}

private let portCounter = Atomic<Int>(0)
/// Held for the process's life: an inbound rule takes a port's connections host-wide, so
/// another test process must not pick the port while this one's agent may still steer it.
private let heldPortClaims = Mutex<[HostClaims.Claim]>([])

private func bindable(_ port: UInt16, family: Int32) -> Bool {
    let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { return family == AF_INET6 } // no IPv6 here: only IPv4 matters
    defer { close(fd) }
    if family == AF_INET {
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = port.bigEndian
        sin.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        return withUnsafePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 } }
    }
    var sin6 = sockaddr_in6()
    sin6.sin6_family = sa_family_t(AF_INET6)
    sin6.sin6_port = port.bigEndian
    withUnsafeMutableBytes(of: &sin6.sin6_addr) { $0[15] = 1 }
    return withUnsafePointer(to: &sin6) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) == 0 } }
}

/// Writes a config file with this `stream:` section (and any other top-level keys).
func relayConfig(_ stream: String, extra: String = "") throws -> String {
    let config = tempPath("config") + ".yaml"
    try (extra + "stream:\n" + stream).write(toFile: config, atomically: true, encoding: .utf8)
    return config
}

/// The agent with a stream section in its config file; stopped and cleaned up after,
/// also when `body` throws.
func withRelayAgent(_ stream: String, _ body: (RunningAgent) async throws -> Void) async throws {
    // Debug: a failure can quote the relay's per-flow lines (the fast path's counters).
    let config = try relayConfig(stream, extra: "log_level: debug\n")
    defer { unlink(config) }
    let a = try await RunningAgent(extra: ["--config", config])
    do { try await body(a) } catch { await a.stop(); a.cleanUp(); throw error }
    await a.stop()
    a.cleanUp()
}

/// A relaypeer server in `mode` and an agent whose rule selects its port; `more` is the
/// rest of the `stream:` section (callouts, limits), indented two spaces like `rules:`.
func withRelayedServer(mode: String = "echo", bind: String = "127.0.0.1", expect: Int = 0, _ more: String = "",
                       _ body: (RunningAgent, UInt16, Child) async throws -> Void) async throws {
    let (server, port) = try await startServer(mode: mode, bind: bind, expect: expect)
    defer { server.kill() }
    let stream = "  rules:\n    - remote_port: \(port)\n" + (more.isEmpty ? "" : more + "\n")
    try await withRelayAgent(stream) { a in try await body(a, port, server) }
}

/// The rest of a `stream:` section for a relay that copies (`pass`: every byte indicated)
/// or one on the sockmap fast path (`allow`: the kernel moves the bytes after the first).
func fastPathStream(_ fastPath: String) -> String {
    fastPath == "sockmap" ? "  fast_path: sockmap\n  callouts:\n    - type: allow\n" : "  callouts:\n    - type: pass\n"
}

/// Waits (up to 10 s) until the relay holds no connection: fast-path bytes are counted
/// as each connection ends, a moment after its ends saw their FINs.
func awaitRelayIdle(_ a: RunningAgent) async throws {
    let active = try await awaitMetric(a, "flowtag_relay_active_flows") { $0 == 0 }
    #expect(active == 0, "\(a.metricsForMessage())")
}

/// On the fast path, the kernel moved bytes of `flows` connections (checked once they ended).
func expectFastPathUsed(_ a: RunningAgent, _ fastPath: String, flows: Int, sourceLocation: SourceLocation = #_sourceLocation) async throws {
    guard fastPath == "sockmap" else { return }
    try await awaitRelayIdle(a)
    #expect(await metric(a, "flowtag_relay_fast_path_flows_total") == flows, "\(a.metricsForMessage())", sourceLocation: sourceLocation)
    #expect((await metric(a, "flowtag_relay_fast_path_bytes_total") ?? 0) > 0,
            "the kernel moved no byte: \(a.process.stderrText.split(separator: "\n").filter { $0.contains("fast path") }.suffix(20))",
            sourceLocation: sourceLocation)
}

/// An inbound rule for a server's port with relaypeer's `--edit` pair of callouts. Into
/// the local process is `receive`, out of it `send`: the client's bytes are edited on the
/// way in (rainy → cloudy), the server's answer on the way out (cloudy → sunny).
func inboundEditStream(port: UInt16) -> String {
    """
      rules:
        - direction: inbound
          local_port: \(port)
      callouts:
        - type: edit
          direction: receive
          pattern: rainy
          replacement: cloudy
        - type: edit
          direction: send
          pattern: cloudy
          replacement: sunny

    """
}

/// Runs a relaypeer client (`client`, `upload`, …) inside the agent's cgroup; returns its last JSON line.
func relayPeer(_ a: RunningAgent, _ command: String, _ args: [String], timeout: Double = 90) async throws -> [String: Any] {
    let c = try Child(a.cgroup.wrap([Paths.python, Paths.relayPeer, command] + args))
    let status = try await c.wait(timeout: timeout)
    guard status == 0, let report = c.jsonLines.last else {
        let hops = await relayHops(a)
        throw TestFailure("\(command) \(args) exited \(status): \(c.stdout) \(c.stderrText) hops \(hops)")
    }
    return report
}

func relayClient(_ a: RunningAgent, _ args: [String], timeout: Double = 90) async throws -> [String: Any] {
    try await relayPeer(a, "client", args, timeout: timeout)
}

func firstResult(_ report: [String: Any]) -> [String: Any] {
    (report["results"] as? [[String: Any]])?.first ?? [:]
}

/// The relay's byte counters per hop (metrics), for failure messages that say which hop
/// lost or added bytes.
func relayHops(_ a: RunningAgent) async -> [String: Int] {
    hops(inMetrics: (try? await a.metrics()) ?? "")
}

/// `relayHops` for a failure message (an autoclosure cannot await): blocks its thread.
func hopsForMessage(_ a: RunningAgent) -> [String: Int] {
    hops(inMetrics: a.metricsForMessage())
}

private func hops(inMetrics text: String) -> [String: Int] {
    var hops: [String: Int] = [:]
    for line in text.split(separator: "\n") where line.hasPrefix("flowtag_relay_bytes_total{direction=\"") {
        let name = line.split(separator: "\"")[1]
        hops[String(name)] = line.split(separator: " ").last.flatMap { Double($0) }.map { Int($0) }
    }
    return hops
}

/// The largest buffer TCP may give a socket: the third field of net.ipv4.`name`
/// (tcp_rmem or tcp_wmem); autotuning grows a socket's buffer up to it.
func socketBufferMax(_ name: String) throws -> Int {
    let text = try String(contentsOfFile: "/proc/sys/net/ipv4/" + name, encoding: .utf8)
    guard let max = text.split(whereSeparator: \.isWhitespace).compactMap({ Int($0) }).last else {
        throw TestFailure("/proc/sys/net/ipv4/\(name): no maximum in \(text.debugDescription)")
    }
    return max
}

/// One counter or gauge of the agent's metrics (nil when absent).
func metric(_ a: RunningAgent, _ name: String) async -> Int? {
    guard let text = try? await a.metrics() else { return nil }
    for line in text.split(separator: "\n") where line.hasPrefix(name + " ") {
        return line.split(separator: " ").last.flatMap { Double($0) }.map { Int($0) }
    }
    return nil
}

/// Reads one metric until `done` holds for it (up to `timeout` s); the last value read.
func awaitMetric(_ a: RunningAgent, _ name: String, timeout: Double = 10, every: Duration = .milliseconds(10),
                 until done: (Int?) -> Bool) async throws -> Int? {
    var last: Int?
    _ = try await poll(timeout: timeout, every: every) { () async -> Bool? in
        last = await metric(a, name)
        return done(last) ? true : nil
    }
    return last
}

/// Flows the relay has taken, from `flowtag stats -o json`.
func relayedFlowCount(_ a: RunningAgent) async throws -> Int {
    (try await a.stats()["relayed_flows"] as? Int) ?? -1
}

/// `ss` on both ends of the connections to `port`, for failure messages about stalls.
func socketState(port: UInt16) -> String {
    let filter = "( sport = :\(port) or dport = :\(port) )"
    return (try? runQuickCommand(["/usr/bin/ss", "-tnmi", filter]))?.1 ?? "ss failed"
}

/// Starts a server (`argv` for a port) on a free port and waits (up to 10 s) until it
/// listens. A port is free only when picked: a server that exits before it listens (another
/// suite bound the port first) is started again on the next port, up to `attempts` times;
/// any other server that does not listen fails the test here, with its stderr.
func startListening(attempts: Int = 5, ports: () throws -> UInt16 = { try freeTCPPort() },
                    _ argv: (UInt16) throws -> [String]) async throws -> (Child, UInt16) {
    var failures: [String] = []
    for _ in 0..<max(1, attempts) {
        let port = try ports()
        let server = try Child(try argv(port))
        if try await awaitListener(port: port, server: server) != nil {
            if !failures.isEmpty { print("started again on a new port: \(failures.joined(separator: "; "))") }
            return (server, port)
        }
        let failure = "port \(port): \(server.argv[0]) (pid \(server.pid), \(server.state)) did not listen: " +
            "stderr: \(server.stderrText.suffix(300)) sockets: \(socketState(port: port))"
        guard !server.isRunning else { server.kill(); throw TestFailure(failure) }
        failures.append(failure)
    }
    throw TestFailure("no server listened in \(failures.count) attempts: " + failures.joined(separator: "; "))
}

/// The inode of `server`'s listening socket on `port`, or nil while it has none.
func listenerInode(port: UInt16, server: Child) async -> String? {
    let out = (try? await runCommand(["/usr/bin/ss", "-Htlnpe", "sport = :\(port)"]))?.1 ?? ""
    for line in out.split(separator: "\n") where line.contains("pid=\(server.pid),") {
        if let field = line.split(separator: " ").first(where: { $0.hasPrefix("ino:") }) { return String(field.dropFirst(4)) }
    }
    return nil
}

/// The inode of `server`'s listener on `port` once it listens (within 10 s; nil at once if
/// it exits) with a socket other than `previous`: a server that closes its listener after
/// each client (iperf3) is ready again only then.
func awaitListener(port: UInt16, server: Child, replacing previous: String? = nil) async throws -> String? {
    func fresh() async -> String? {
        guard let inode = await listenerInode(port: port, server: server), inode != previous else { return nil }
        return inode
    }
    let deadline = ContinuousClock.now + .seconds(10)
    while server.isRunning, ContinuousClock.now < deadline {
        if let inode = await fresh() { return inode }
        try await Task.sleep(for: .milliseconds(20))
    }
    return await fresh()
}

/// A file of `size` seeded random bytes and its sha256 (hex).
func randomFile(size: Int, seed: UInt64) async throws -> (path: String, sha: String) {
    let path = tempPath("data")
    var g = SeededGenerator(seed: seed)
    var bytes = [UInt8](repeating: 0, count: size)
    for i in stride(from: 0, to: size, by: 8) {
        let v = g.next()
        for k in 0..<min(8, size - i) { bytes[i + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(k))) }
    }
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    return (path, try await sha256(path))
}

func sha256(_ path: String) async throws -> String {
    let (rc, out, err) = try await runCommand(["/usr/bin/sha256sum", path])
    guard rc == 0, let sum = out.split(separator: " ").first else { throw TestFailure("sha256sum \(path): \(err)") }
    return String(sum)
}
