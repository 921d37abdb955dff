import Foundation
import Testing
import FlowTagAgent
@testable import FlowTagTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// The relay when the agent stops or dies, across network namespaces, and with bad config.
@Suite("Stream relay: faults, namespaces, config (real agent)", .serialized)
struct RelayFaultTests {
    @Test("kill -9 mid-transfer resets both ends (no hang, no silent cut); a restarted agent relays the next connect at once",
          arguments: ["copy", "sockmap"])
    func killNineResetsBothEnds(fastPath: String) async throws {
        let (server, port) = try await startServer()
        defer { server.kill() }
        let config = try relayConfig("  rules:\n    - remote_port: \(port)\n" + (fastPath == "sockmap" ? fastPathStream(fastPath) : ""))
        defer { unlink(config) }
        let a = try await RunningAgent(extra: ["--config", config])
        defer { a.cleanUp() }
        let client = try Child(a.cgroup.wrap([Paths.python, Paths.relayPeer, "stream", "127.0.0.1", "\(port)"]))
        defer { client.kill() }
        _ = try await client.waitForLines(1, timeout: 30) // bytes are flowing through the relay
        if fastPath == "sockmap" {
            #expect(try await awaitMetric(a, "flowtag_relay_fast_path_flows_total") { $0 == 1 } == 1, "the flow is on the fast path when the agent dies")
        }
        kill(a.process.pid, SIGKILL)
        _ = try await a.process.wait(timeout: 20)
        #expect(try await client.wait(timeout: 30) == 0)
        let end = client.jsonLines.last ?? [:]
        #expect((end["end"] as? String ?? "").contains("reset"), "the process sees a reset: \(end)")
        #expect(end["prefix_equal"] as? Bool == true, "\(end)")
        let served = try await server.waitForLines(1).first ?? [:]
        #expect(served["eof"] as? Bool != true && served["error"] != nil, "the peer sees a reset, not a clean end: \(served)")
        // The hooks died with the agent: a connect now goes direct, unedited and unrelayed.
        let direct = firstResult(try await relayClient(a, ["127.0.0.1", "\(port)", "--size", "100000"]))
        #expect(direct["echo_equal"] as? Bool == true && direct["eof"] as? Bool == true, "\(direct)")
        // A new agent on the same pins relays the very next connect.
        let b = try await RunningAgent(extra: ["--config", config], cgroup: a.cgroup, pins: a.pins)
        defer { b.cleanUp() }
        let r = firstResult(try await relayClient(b, ["127.0.0.1", "\(port)", "--size", "1000000"]))
        #expect(r["echo_equal"] as? Bool == true && r["eof"] as? Bool == true, "\(r)")
        #expect(try await relayedFlowCount(b) == 1)
        await b.stop()
    }

    @Test("SIGTERM mid-upload drains: every byte the process sent arrives (sha256), then the FIN; the agent exits 0",
          arguments: ["copy", "sockmap"])
    func sigtermDrainsUploads(fastPath: String) async throws {
        let (server, port) = try await startServer(mode: "digest")
        defer { server.kill() }
        let config = try relayConfig("  drain_seconds: 60\n  rules:\n    - remote_port: \(port)\n" + fastPathStream(fastPath))
        defer { unlink(config) }
        let a = try await RunningAgent(extra: ["--config", config])
        defer { a.cleanUp() }
        var clients: [Child] = []
        for i in 0..<2 {
            clients.append(try Child(a.cgroup.wrap([Paths.python, Paths.relayPeer, "upload", "127.0.0.1", "\(port)",
                                                    "--size", "\(100 << 20)", "--seed", "\(i + 7)"])))
        }
        defer { clients.forEach { $0.kill() } }
        if fastPath == "sockmap" {
            // Fast-path bytes are counted at the end: wait for the flows to be on it and moving.
            #expect(try await awaitMetric(a, "flowtag_relay_fast_path_flows_total") { $0 == 2 } == 2)
        }
        if fastPath == "copy" { _ = try await poll(timeout: 10) { (await relayHops(a)["from_process"] ?? 0) >= 20 << 20 ? true : nil } }
        kill(a.process.pid, SIGTERM)
        #expect(try await a.process.wait(timeout: 90) == 0, "\(a.process.stderrText.suffix(2000))")
        for c in clients {
            #expect(try await c.wait(timeout: 60) == 0, "\(c.stderrText)")
            let r = c.jsonLines.last ?? [:]
            #expect(r["equal"] as? Bool == true, "\(r)")
        }
        #expect(a.nothingLeft, "SIGTERM detaches every program, the relay's included")
    }

    @Test("SIGTERM with an open connection: past drain_seconds each side gets every byte the relay took, then a FIN",
          arguments: ["copy", "sockmap"])
    func sigtermEndsLongConnections(fastPath: String) async throws {
        // The echo reads before it writes: its echoes after our FIN are reset, and a
        // blocking echo stuck in sendall would see that reset instead of the FIN.
        let (server, port) = try await startServer(mode: "stream")
        defer { server.kill() }
        let config = try relayConfig("  drain_seconds: 1\n  rules:\n    - remote_port: \(port)\n" + (fastPath == "sockmap" ? fastPathStream(fastPath) : ""),
                                     extra: "log_level: debug\n")
        defer { unlink(config) }
        let a = try await RunningAgent(extra: ["--config", config])
        defer { a.cleanUp() }
        let client = try Child(a.cgroup.wrap([Paths.python, Paths.relayPeer, "stream", "127.0.0.1", "\(port)"]))
        defer { client.kill() }
        _ = try await client.waitForLines(1, timeout: 30)
        // The moment the agent exits, from a thread of its own: a test's await can resume
        // late on a busy pool, and the message must tell the agent's time from the test's.
        let exitedAt = Locked<String?>(nil)
        let pid = a.process.pid
        Thread {
            var info = siginfo_t()
            _ = waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT)
            exitedAt.withLock { $0 = AgentLog.monotonicSeconds() }
        }.start()
        let t0 = Date()
        let sentAt = AgentLog.monotonicSeconds() // the agent's debug lines carry the same clock
        kill(a.process.pid, SIGTERM)
        #expect(try await a.process.wait(timeout: 30) == 0, "\(a.process.stderrText.suffix(2000))")
        let times = "SIGTERM at t=\(sentAt), exited at t=\(exitedAt.withLock { $0 } ?? "?"), exit seen at t=\(AgentLog.monotonicSeconds())"
        #expect(Date().timeIntervalSince(t0) < 10, "\(times): \(a.process.stderrText.suffix(3000))")
        #expect(try await client.wait(timeout: 30) == 0)
        let end = client.jsonLines.last ?? [:]
        #expect(end["end"] as? String == "eof", "\(end)\n\(a.process.stderrText.suffix(3000))")
        #expect(end["prefix_equal"] as? Bool == true, "\(end)")
        // The peer got a FIN (not a reset), after every byte it echoed back had been sent.
        let served = try await server.waitForLines(1).first ?? [:]
        #expect(served["eof"] as? Bool == true, "\(served)")
        #expect((end["got"] as? Int ?? -1) <= (served["received"] as? Int ?? 0), "server \(served), client \(end)")
    }

    @Test("a relayed connect whose peer is in another network namespace")
    func peerInAnotherNamespace() async throws {
        let ns = try TestNetns()
        defer { ns.remove() }
        let (server, port) = try await startServer(bind: ns.nsAddress, netns: ns.name)
        defer { server.kill() }
        try await withRelayAgent("""
              rules:
                - remote: \(ns.nsAddress)/32
                  direction: outbound
              callouts:
                - type: pass
            """) { a in
            let r = firstResult(try await relayClient(a, [ns.nsAddress, "\(port)", "--size", "2000000", "--max-chunk", "30000"]))
            #expect(r["echo_equal"] as? Bool == true, "\(r)")
            #expect(r["eof"] as? Bool == true)
            #expect(try await relayedFlowCount(a) == 1)
        }
    }

    @Test("a process in another network namespace: its first connect goes direct (counted), the next are relayed with the right names")
    func processInAnotherNamespace() async throws {
        let ns = try TestNetns()
        defer { ns.remove() }
        try await withRelayedServer(mode: "whoami", bind: "0.0.0.0") { a, port, server in
            func names() async throws -> [String: Any] {
                let c = try Child(a.cgroup.wrap(ns.wrap([Paths.python, Paths.relayPeer, "names", ns.hostAddress, "\(port)"])))
                #expect(try await c.wait(timeout: 30) == 0, "\(c.stderrText)")
                return c.jsonLines.last ?? [:]
            }
            // A container's long-lived process: the namespace outlives each short client,
            // which may exit before the agent reads its request for a listener.
            let resident = try Child(ns.wrap(["/bin/sleep", "120"]))
            defer { resident.kill() }
            let first = try await names()
            #expect(await metric(a, "flowtag_relay_no_listener_total") == 1, "\(first)")
            #expect(try await relayedFlowCount(a) == 0)
            let listeners = try await awaitMetric(a, "flowtag_relay_listeners", every: .milliseconds(50)) { ($0 ?? 0) >= 2 }
            #expect(listeners == 2, "\(a.process.stderrText.suffix(1500))")
            for _ in 0..<3 {
                let r = try await names()
                let me = try #require(r["sockname"] as? [Any]), saw = try #require(r["peer_saw"] as? [Any])
                #expect(me[0] as? String == ns.nsAddress && saw[0] as? String == ns.nsAddress, "\(r)")
                #expect(me[1] as? Int == saw[1] as? Int, "\(r)")
                #expect((r["peername"] as? [Any])?[0] as? String == ns.hostAddress, "\(r)")
            }
            #expect(try await relayedFlowCount(a) == 3)
            #expect(a.process.stderrText.contains("relay: listening"))
        }
    }

    @Test("inbound in another network namespace (a container's server): relayed once the agent finds the namespace; the server sees the real client")
    func inboundInAnotherNamespace() async throws {
        let ns = try TestNetns()
        defer { ns.remove() }
        let port = try freeTCPPort()
        try await withRelayAgent(inboundEditStream(port: port)) { a in
            // The namespace has no process until the server starts: the agent finds it at
            // its next look at the namespaces (every 5 s) and attaches a program there.
            let (server, _) = try await startServer(bind: ns.nsAddress, netns: ns.name, port: port, in: a.cgroup)
            defer { server.kill() }
            let (rc, out, err) = try await runCommand(ns.wrap([Paths.python, "-c",
                "import socket;s=socket.socket();print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET,71,8),'little'))"]))
            let cookie = out.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(rc == 0 && !cookie.isEmpty, "\(err)")
            func ready() -> Bool {
                a.process.stderrText.split(separator: "\n").contains { $0.contains("inbound listeners ready") && $0.contains("netns=\(cookie)") }
            }
            for _ in 0..<150 where !ready() { try await Task.sleep(for: .milliseconds(100)) }
            #expect(ready(), "the agent never relayed inbound in the server's namespace: \(a.process.stderrText.suffix(1500))")
            // The client is on the host: its connection comes in through the veth.
            let c = try Child([Paths.python, Paths.relayPeer, "client", ns.nsAddress, "\(port)", "--text", "--edit",
                               "--size", "200000", "--max-chunk", "4096", "--seed", "31"])
            #expect(try await c.wait(timeout: 90) == 0, "\(c.stderrText)")
            let r = firstResult(c.jsonLines.last ?? [:])
            #expect(r["echo_equal"] as? Bool == true && r["eof"] as? Bool == true, "\(r) hops \(hopsForMessage(a))")
            let served = try await server.waitForLines(1)
            #expect(served.first?["sha"] as? String == r["server_sha"] as? String, "the server got the receive-side edit: \(served)")
            #expect(served.first?["peer_port"] as? Int == r["local_port"] as? Int, "the server's accept names the real client: \(served)")
            #expect(try await a.stats()["relay_inbound_redirected"] as? Int == 1)
            #expect(try await relayedFlowCount(a) == 1)
        }
    }

    @Test("the documented example callout (a user-written StreamCallout) builds and runs")
    func exampleCalloutRuns() async throws {
        let (server, port) = try await startServer()
        defer { server.kill() }
        let cgroup = try TestCgroup()
        defer { cgroup.remove() }
        let socket = tempPath("api") + ".sock", journal = tempPath("journal") + ".db"
        let config = try relayConfig("  rules:\n    - remote_port: \(port)\n", extra: """
            cgroup: \(cgroup.path)
            bpffs: /sys/fs/bpf/\(uniqueName("pins"))
            socket: \(socket)
            journal: \(journal)
            metrics_address: 127.0.0.1:0
            output: none

            """)
        defer { unlink(config); for s in ["", "-wal", "-shm"] { unlink(journal + s) } }
        let agent = try Child([Paths.repo + "/.build/debug/flowtag-example-uppercase", config])
        defer { kill(agent.pid, SIGTERM); _ = try? runQuickCommand(["/bin/sleep", "0.5"]); agent.kill() }
        for _ in 0..<500 where access(socket, F_OK) != 0 && agent.isRunning { try await Task.sleep(for: .milliseconds(20)) }
        try #require(access(socket, F_OK) == 0, "example did not start: \(agent.stderrText)")
        let script = """
            import socket
            s = socket.create_connection(("127.0.0.1", \(port)), timeout=10)
            s.sendall(b"hello, rainy world")
            got = b""
            while len(got) < 18: got += s.recv(100)
            print(got.decode())
            """
        let client = try Child(cgroup.wrap([Paths.python, "-c", script]))
        #expect(try await client.wait() == 0, "\(client.stderrText)")
        #expect(client.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "HELLO, RAINY WORLD")
        #expect(agent.stderrText.contains("bytes for pid \(client.pid) "), "\(agent.stderrText)")
        for _ in 0..<100 where !(agent.stderrText.contains("FIN (send) for pid \(client.pid)") && agent.stderrText.contains("FIN (receive) for pid \(client.pid)")) {
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(agent.stderrText.contains("FIN (send) for pid \(client.pid)"), "\(agent.stderrText)")
        #expect(agent.stderrText.contains("FIN (receive) for pid \(client.pid)"), "\(agent.stderrText)")
        kill(agent.pid, SIGTERM)
        #expect(try await agent.wait(timeout: 30) == 0)
    }

    @Test("bad stream config is refused with the key and the reason")
    func badStreamConfig() async throws {
        let cases: [(String, String, String)] = [
            ("stream:\n  rules:\n    - exe: /nonexistent/binary\n", "stream.rules[0].exe", "no such file"),
            ("stream:\n  rules:\n    - remote: 10.0.0.0/99\n", "stream.rules[0].remote", "not an address"),
            ("stream:\n  rules:\n    - direction: inbound\n      local_port: 80\n      uid: 0\n", "stream.rules[0].uid", "not known when it arrives"),
            ("stream:\n  rules:\n    - direction: inbound\n", "stream.rules[0].local_port", "needs the server's port"),
            ("stream:\n  callouts:\n    - type: edit\n      pattern: a\n", "stream.callouts[0].replacement", ""),
            ("stream:\n  callouts:\n    - type: frobnicate\n", "stream.callouts[0].type", ""),
            ("stream:\n  pool_size: 32\n", "stream.pool_size", "no longer used"),
            ("stream:\n  max_flows: 0\n", "stream.max_flows", ""),
            ("stream:\n  max_flows: 65537\n", "stream.max_flows", ""),
            ("stream:\n  drain_seconds: -1\n", "stream.drain_seconds", ""),
            ("stream:\n  drain_seconds: 3601\n", "stream.drain_seconds", ""),
            ("stream:\n  drain_seconds: 1e99\n", "stream.drain_seconds", ""),
            ("stream:\n  fast_path: splice\n", "stream.fast_path", "is not copy or sockmap"),
        ]
        for (yaml, key, reason) in cases {
            let path = tempPath("config") + ".yaml"
            try yaml.write(toFile: path, atomically: true, encoding: .utf8)
            defer { unlink(path) }
            let (rc, _, err) = try await runCommand([Paths.flowtagd, "--config", path, "--check-config"])
            #expect(rc == 78, "\(yaml): \(err)")
            #expect(err.contains(key) && (reason.isEmpty || err.contains(reason)), "\(yaml): \(err)")
        }
    }
}
