import Foundation
import Testing
import FlowTagClient
@testable import FlowTagTestSupport
@testable import FlowTagAgent
@testable import FlowTagKernel
@testable import FlowTagRelay
import CFlowTagBPF

#if canImport(Glibc)
import Glibc
#endif

extension Paths {
    static let relayPeer = repo + "/Tests/Peers/relaypeer.py"
}

/// An echo server outside the agent's cgroup (optionally in a network namespace).
func startEchoServer(mode: String = "echo", bind: String = "127.0.0.1", netns: String? = nil, expect: Int = 0) async throws -> (Child, UInt16) {
    let portFile = tempPath("port")
    var argv = [Paths.python, Paths.relayPeer, "server", portFile, "--bind", bind, "--mode", mode, "--expect", "\(expect)"]
    if let netns { argv = ["/usr/sbin/ip", "netns", "exec", netns] + argv }
    let server = try Child(argv)
    let port = try await waitForPort(portFile)
    unlink(portFile)
    return (server, port)
}

/// The agent with a stream section in its config file.
func withRelayAgent(_ stream: String, _ body: (RunningAgent) async throws -> Void) async throws {
    let config = tempPath("config") + ".yaml"
    try ("stream:\n" + stream).write(toFile: config, atomically: true, encoding: .utf8)
    defer { unlink(config) }
    let a = try await RunningAgent(extra: ["--config", config])
    do { try await body(a) } catch { await a.stop(); throw error }
    await a.stop()
}

/// Runs a relaypeer client inside the agent's cgroup; returns its JSON report.
func relayClient(_ a: RunningAgent, _ args: [String], timeout: Double = 90) async throws -> [String: Any] {
    let c = try Child(a.cgroup.wrap([Paths.python, Paths.relayPeer, "client"] + args))
    let status = try await c.wait(timeout: timeout)
    let lines = c.jsonLines
    guard status == 0, let report = lines.last else {
        throw TestFailure("client \(args) exited \(status): \(c.stdout) \(c.stderrText) hops \(relayHops(a))")
    }
    return report
}

/// The relay's byte counters per hop (metrics), for failure messages that say which hop
/// lost or added bytes.
func relayHops(_ a: RunningAgent) -> [String: Int] {
    guard let text = metricsText(a) else { return [:] }
    var hops: [String: Int] = [:]
    for line in text.split(separator: "\n") where line.hasPrefix("flowtag_relay_bytes_total{direction=\"") {
        let name = line.split(separator: "\"")[1]
        hops[String(name)] = line.split(separator: " ").last.flatMap { Double($0) }.map { Int($0) }
    }
    return hops
}

/// The agent's Prometheus text (its address is in the agent's start-up line).
func metricsText(_ a: RunningAgent) -> String? {
    guard let url = a.process.stderrText.split(separator: "\n").first(where: { $0.contains("metrics on ") })?.split(separator: " ").last,
          let (_, text, _) = try? runCommand(["/usr/bin/curl", "-s", String(url)]) else { return nil }
    return text
}

/// `ss` on both ends of the connections to `port` (queues, memory, TCP info), for
/// failure messages about stalls.
func socketState(port: UInt16) -> String {
    let filter = "( sport = :\(port) or dport = :\(port) )"
    return (try? runCommand(["/usr/bin/ss", "-tnmi", filter]))?.1 ?? "ss failed"
}

/// `ss` on the agent's own TCP sockets (the relay slots' hops: queues, memory, errors).
func agentSockets(_ a: RunningAgent) -> String {
    guard let (_, out, _) = try? runCommand(["/usr/bin/ss", "-tnmiep"]) else { return "ss failed" }
    // Each socket is a line with its process, then a line of memory and TCP info.
    let lines = out.split(separator: "\n", omittingEmptySubsequences: false)
    var kept: [Substring] = []
    for (i, line) in lines.enumerated() where line.contains("pid=\(a.process.pid),") {
        kept.append(line)
        if i + 1 < lines.count { kept.append(lines[i + 1]) }
    }
    return kept.joined(separator: "\n")
}

func firstResult(_ report: [String: Any]) -> [String: Any] {
    (report["results"] as? [[String: Any]])?.first ?? [:]
}

/// Flows the relay has taken, from `flowtag stats -o json`.
func relayedFlowCount(_ a: RunningAgent) throws -> Int {
    let (_, out, _) = try a.cli(["stats", "-o", "json"])
    let obj = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any]
    return (obj?["relayed_flows"] as? Int) ?? -1
}

/// Breaks the receive connection of the agent's one relayed flow's slot: its kernel end
/// (found in the agent's fds by its route in socket-local storage) is shut for writing,
/// through a duplicate of the agent's fd.
func breakReceiveHop(agentPID: Int32, pins: String) throws {
    let routes = ftbpf_obj_get(pins + "/maps/ft_relay_routes"), slots = ftbpf_obj_get(pins + "/maps/ft_relay_slots")
    defer { close(routes); close(slots) }
    guard routes >= 0, slots >= 0 else { throw TestFailure("pinned relay maps under \(pins): \(routes) \(slots)") }
    let active = (0..<RelayKernel.maxSlots).filter { n in
        var key = n, entry = ft_relay_slot()
        return ftbpf_map_lookup(slots, &key, &entry) == 0 && entry.mode == FT_RELAY_ACTIVE.rawValue
    }
    guard active.count == 1, let slot = active.first else { throw TestFailure("expected one active relay slot, found \(active)") }
    var shut: Int32?
    AppSocket.walkSockets(of: UInt32(agentPID)) { _, fd in
        var key = fd, route = ft_relay_route()
        guard fd >= 0, ftbpf_map_lookup(routes, &key, &route) == 0, route.slot == slot, route.role == FT_RELAY_RECV.rawValue else { return false }
        shut = shutdown(fd, Int32(SHUT_WR)) == 0 ? 0 : errno
        close(fd)
        return true
    }
    guard let shut else { throw TestFailure("slot \(slot)'s receive socket not found among the agent's fds") }
    guard shut == 0 else { throw TestFailure("shutdown: \(String(cString: strerror(shut)))") }
}

/// Each TCP socket a process holds: fd, cookie and what FIONREAD counts unread there
/// (through a duplicate of its fd), for failure messages about stalls.
func unreadCounts(pid: Int32) -> String {
    var counts: [String] = []
    AppSocket.walkSockets(of: UInt32(pid)) { target, fd in
        guard fd >= 0, let cookie = AppSocket.cookieOf(fd) else { return false }
        var n: Int32 = 0
        let rc = ioctl(fd, UInt(FIONREAD), &n)
        counts.append("fd \(target) cookie \(cookie) unread \(rc == 0 ? "\(n)" : String(cString: strerror(errno)))")
        return false
    }
    return counts.joined(separator: "; ")
}

@Suite("Stream relay (sockmap, real agent)", .serialized)
struct StreamRelayTests {
    @Test("pass-through: 10 MB both ways byte-exact, random chunk sizes, FIN after the data")
    func passThroughBulk() async throws {
        let (server, port) = try await startEchoServer()
        defer { server.kill() }
        try await withRelayAgent("""
              rules:
                - remote_port: \(port)
              callouts:
                - type: pass
            """) { a in
            var clientPorts: [Int] = []
            for (size, chunk) in [(10_000_000, 65536), (300_000, 1500), (50_000, 7)] {
                let r = firstResult(try await relayClient(a, ["127.0.0.1", "\(port)", "--size", "\(size)", "--max-chunk", "\(chunk)", "--seed", "\(size)"]))
                #expect(r["echo_equal"] as? Bool == true, "\(r) hops \(relayHops(a))")
                #expect(r["eof"] as? Bool == true, "\(r)")
                clientPorts.append(r["local_port"] as? Int ?? -1)
            }
            // The server saw exactly what the client sent (sha over every byte), from the
            // client's own address and port: the connection was never re-originated.
            let reports = try await server.waitForLines(3)
            #expect(Set(reports.compactMap { $0["peer_port"] as? Int }) == Set(clientPorts))
            #expect(reports.allSatisfy { $0["eof"] as? Bool == true })
            #expect(Set(reports.compactMap { $0["received"] as? Int }) == [10_000_000, 300_000, 50_000])
            #expect(try relayedFlowCount(a) >= 3)
            // The relay's metrics count what went through, with no per-flow labels.
            let text = try #require(metricsText(a))
            let total = 10_000_000 + 300_000 + 50_000
            let hops = relayHops(a)
            for hop in ["from_process", "to_peer", "from_peer", "to_process"] {
                #expect(hops[hop] == total, "\(hop): \(hops)")
            }
            #expect(text.contains("flowtag_relay_flows_total 3"))
            let (_, table, _) = try a.cli(["stats"])
            #expect(table.split(separator: "\n").contains { $0.hasPrefix("relayed flows") && $0.hasSuffix(" 3") }, "\(table)")
            #expect(text.contains("flowtag_relay_undeliverable_bytes_total 0"))
        }
    }

    @Test("edits with the pattern split across writes, in both directions (inline and out-of-band)", arguments: ["inline", "out-of-band"])
    func editsBothDirections(mode: String) async throws {
        let (server, port) = try await startEchoServer()
        defer { server.kill() }
        try await withRelayAgent("""
              rules:
                - remote_port: \(port)
              callouts:
                - type: edit
                  name: rainy-to-cloudy
                  weight: 20
                  mode: \(mode)
                  direction: send
                  pattern: rainy
                  replacement: cloudy
                - type: edit
                  name: cloudy-to-sunny
                  weight: 10
                  direction: receive
                  pattern: cloudy
                  replacement: sunny
            """) { a in
            for maxChunk in [3, 64, 4096] {
                let report = try await relayClient(a, ["127.0.0.1", "\(port)", "--text", "--edit", "--size", "200000", "--max-chunk", "\(maxChunk)", "--seed", "\(maxChunk)"])
                let r = firstResult(report)
                #expect(r["echo_equal"] as? Bool == true, "max chunk \(maxChunk): \(r)")
            }
            // The server received the send-side edit exactly.
            let reports = try await server.waitForLines(3)
            let shas = Set(reports.compactMap { $0["sha"] as? String })
            #expect(shas.count == 3)
        }
    }

    @Test("capture: `flowtag watch --payload` shows the first N bytes of each direction with the owner")
    func captureShownByWatch() async throws {
        let (server, port) = try await startEchoServer()
        defer { server.kill() }
        try await withRelayAgent("""
              rules:
                - remote_port: \(port)
              callouts:
                - type: capture
                  bytes: 16
            """) { a in
            let watch = try Child([Paths.flowtag, "watch", "--payload", "-o", "json", "--port", "\(port)", "--socket", a.socket])
            defer { watch.kill() }
            try await Task.sleep(for: .milliseconds(500)) // the watch is registered
            let client = try Child(a.cgroup.wrap([Paths.python, Paths.relayPeer, "client", "127.0.0.1", "\(port)", "--size", "5000", "--text", "--max-chunk", "7"]))
            #expect(try await client.wait() == 0, "\(client.stderrText)")
            var captures: [[String: Any]] = []
            for _ in 0..<100 {
                captures = watch.jsonLines.filter { $0["event"] as? String == "payload" }
                let total = captures.compactMap { ($0["payload"] as? [String: Any])?["length"] as? Int }.reduce(0, +)
                if total >= 32 { break }
                try await Task.sleep(for: .milliseconds(50))
            }
            func bytes(_ direction: String) -> [UInt8] {
                captures.filter { ($0["payload"] as? [String: Any])?["direction"] as? String == direction }
                    .sorted { (($0["payload"] as? [String: Any])?["offset"] as? Int ?? 0) < (($1["payload"] as? [String: Any])?["offset"] as? Int ?? 0) }
                    .flatMap { Array(Data(base64Encoded: ($0["payload"] as? [String: Any])?["data_base64"] as? String ?? "") ?? Data()) }
            }
            #expect(bytes("send").count == 16, "\(captures)")
            #expect(bytes("send") == bytes("receive"), "an echo: both directions start alike")
            #expect(captures.allSatisfy { ($0["process"] as? [String: Any])?["pid"] as? Int == Int(client.pid) })
            // A bad payload value is refused with a 400.
            let (_, code, _) = try runCommand(["/usr/bin/curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", a.socket,
                                               "http://agent/v1/watch?payload=maybe"])
            #expect(code == "400")
        }
    }

    @Test("selection by executable, uid and cgroup: only the matching process's flows are relayed")
    func selectionByExeUidCgroup() async throws {
        let (server, port) = try await startEchoServer()
        defer { server.kill() }
        let cgroup = try TestCgroup()
        let child = cgroup.path + "/inner"
        try #require(mkdir(child, 0o755) == 0)
        defer { rmdir(child) }
        let python = try #require(readLink(Paths.python).map { $0.hasPrefix("/") ? $0 : "/usr/bin/" + $0 } ?? Paths.python)
        let config = tempPath("config") + ".yaml"
        try """
            stream:
              rules:
                - exe: \(python)
                  uid: 0
                  cgroup: \(cgroup.path)
                  remote_port: \(port)
              callouts:
                - type: edit
                  pattern: rainy
                  replacement: cloudy
            """.write(toFile: config, atomically: true, encoding: .utf8)
        defer { unlink(config) }
        let a = try await RunningAgent(extra: ["--config", config], cgroup: cgroup)
        do {
            func send(_ argv: [String]) throws -> String {
                let script = "import socket;s=socket.create_connection(('127.0.0.1',\(port)),timeout=5);s.sendall(b'rainy');g=b''\nwhile len(g)<5:\n g+=s.recv(100)\nprint(g.decode())"
                let (_, out, _) = try runCommand(argv + [Paths.python, "-c", script])
                return out.trimmingCharacters(in: .whitespacesAndNewlines)
            }
            // python, root, in the cgroup: relayed (and edited; the echo has one more byte).
            #expect(try send(cgroup.wrap([])).hasPrefix("cloud"))
            #expect(try relayedFlowCount(a) == 1)
            // Another uid: direct.
            #expect(try send(cgroup.wrap(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])) == "rainy")
            // A child cgroup (the rule names the exact cgroup): direct.
            #expect(try send(["/bin/sh", "-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"", child]) == "rainy")
            // Another executable (curl) to the same port: direct.
            _ = try runCommand(cgroup.wrap(["/usr/bin/curl", "-s", "--max-time", "2", "http://127.0.0.1:\(port)/"]))
            #expect(try relayedFlowCount(a) == 1)
        } catch {
            await a.stop(); throw error
        }
        await a.stop()
    }

    @Test("block: the connection is dropped at the pattern; the bytes before it were delivered, the pattern never was")
    func blockDropsTheConnection() async throws {
        let (server, port) = try await startEchoServer()
        defer { server.kill() }
        try await withRelayAgent("""
              rules:
                - remote_port: \(port)
              callouts:
                - type: block
                  pattern: DROP TABLE
            """) { a in
            let script = """
            import socket, time, json
            s = socket.create_connection(("127.0.0.1", \(port)), timeout=10)
            s.sendall(b"hello "); got = b""
            while len(got) < 6: got += s.recv(100)
            s.sendall(b"DR"); time.sleep(0.2); s.sendall(b"OP TABLE users")
            end = "open"
            try:
                while True:
                    d = s.recv(100)
                    if not d: end = "eof"; break
                    got += d
            except ConnectionResetError: end = "reset"
            except socket.timeout: end = "timeout"
            print(json.dumps({"got": got.decode(), "end": end}))
            """
            let c = try Child(a.cgroup.wrap([Paths.python, "-c", script]))
            #expect(try await c.wait() == 0, "\(c.stderrText)")
            let r = c.jsonLines.last ?? [:]
            #expect(r["got"] as? String == "hello ")
            #expect(r["end"] as? String == "eof" || r["end"] as? String == "reset", "\(r)")
            let s = try await server.waitForLines(1)
            #expect(s.first?["received"] as? Int == 6, "the server never saw the pattern: \(s)")
        }
    }

    @Test("an unselected flow is untouched and never relayed")
    func unselectedFlowUntouched() async throws {
        let (selected, selectedPort) = try await startEchoServer()
        let (other, otherPort) = try await startEchoServer()
        defer { selected.kill(); other.kill() }
        try await withRelayAgent("""
              rules:
                - remote_port: \(selectedPort)
              callouts:
                - type: edit
                  pattern: rainy
                  replacement: cloudy
            """) { a in
            // Same edit-worthy text to the other port: it must come back unchanged.
            let r = firstResult(try await relayClient(a, ["127.0.0.1", "\(otherPort)", "--text", "--size", "100000"]))
            #expect(r["echo_equal"] as? Bool == true, "\(r)")
            #expect(try relayedFlowCount(a) == 0)
            // And the selected one is edited (the rule works).
            let e = try await relayClient(a, ["127.0.0.1", "\(selectedPort)", "--text", "--size", "1000"])
            #expect(firstResult(e)["echo_equal"] as? Bool == false)
            #expect(try relayedFlowCount(a) == 1)
        }
    }

    @Test("senders that outrun the agent wait: no write fails, every byte arrives (blocking and non-blocking, 4 at once)")
    func floodersWaitInsteadOfFailing() async throws {
        let (server, port) = try await startEchoServer(mode: "sink", expect: 200 << 20)
        defer { server.kill() }
        try await withRelayAgent("""
              rules:
                - remote_port: \(port)
              callouts:
                - type: pass
            """) { a in
            var clients: [Child] = []
            for i in 0..<4 {
                var argv = [Paths.python, Paths.relayPeer, "flood", "127.0.0.1", "\(port)", "--size", "\(200 << 20)", "--seed", "\(i)"]
                if i % 2 == 0 { argv.append("--blocking") }
                clients.append(try Child(a.cgroup.wrap(argv)))
            }
            for c in clients {
                let rc = try await c.wait(timeout: 120)
                #expect(rc == 0, "\(c.stdout)\(c.stderrText)\nhops \(relayHops(a))\n\(socketState(port: port))")
            }
            let sent = clients.compactMap { $0.jsonLines.last }
            #expect(sent.allSatisfy { $0["error"] == nil && $0["sent"] as? Int == 200 << 20 }, "\(sent)")
            let received = try await server.waitForLines(4)
            #expect(Set(received.compactMap { $0["sha"] as? String }) == Set(sent.compactMap { $0["sha"] as? String }))
            #expect(received.allSatisfy { $0["received"] as? Int == 200 << 20 })
        }
    }

    @Test("a process that does not read holds its peer back: the relay bounds what waits unread, and every byte arrives")
    func nonReadingProcessIsBounded() async throws {
        try await slowReader(total: 200 << 20, handoff: false) { a, client, early in
            // Unread at most 4 MiB in the process, 4 MiB held by the agent, and the TCP
            // buffers of the hops: far from all 200 MiB.
            #expect(early < 80 << 20, "the peer pushed \(early) bytes while the process read nothing; agent: \(a.process.stderrText.suffix(3000))")
        }
    }

    @Test("an owner that hands its socket to another process and exits: the relay finds the new holder and keeps the bound")
    func socketHandedOverAndOwnerGone() async throws {
        try await slowReader(total: 128 << 20, handoff: true) { a, client, early in
            let who = try #require(client.jsonLines.first)
            let connector = try #require(who["connected_by"] as? Int), reader = try #require(who["reader"] as? Int)
            // The kernel's stamp names the process that connected, whose fds are gone.
            #expect(a.process.stderrText.contains("the socket moved to another process") && a.process.stderrText.contains("to_pid=\(reader)"),
                    "agent: \(a.process.stderrText.suffix(2000))")
            // While nobody held the socket (0.3 s) delivery was paced (4 MiB per 100 ms);
            // then bounded as for the owner itself: 4 MiB unread in the process, what the
            // agent holds, and the hops' buffers. Not all 128 MiB while the reader sleeps.
            #expect(early < 72 << 20, "the peer pushed \(early) bytes while the process read nothing; agent: \(a.process.stderrText.suffix(2000))")
        }
    }

    /// A peer pushes `total` bytes at a relayed process that reads nothing for 3.5 s
    /// (relaypeer slowread), then everything: every byte must arrive, and `check` gets
    /// what the peer had pushed after 3 s. A stall has been seen (rarely, under the whole
    /// suite's load): if the client still runs after 45 s (it needs ≈ 5), what the
    /// sockets, the process's own unread count and the relay looked like is kept.
    func slowReader(total: Int, handoff: Bool, _ check: (RunningAgent, Child, Int) throws -> Void) async throws {
        let (server, port) = try await startEchoServer(mode: "push", expect: total)
        defer { server.kill() }
        try await withRelayAgent("""
              rules:
                - remote_port: \(port)
            """) { a in
            let c = try Child(a.cgroup.wrap([Paths.python, Paths.relayPeer, "slowread", "127.0.0.1", "\(port)", "--size", "\(total)"]
                                            + (handoff ? ["--handoff"] : [])))
            defer { c.kill() }
            var stalled = ""
            for _ in 0..<450 where c.isRunning { try await Task.sleep(for: .milliseconds(100)) }
            if c.isRunning {
                stalled = "stalled after 45 s: hops \(relayHops(a)); the process's sockets: \(unreadCounts(pid: c.pid))\n\(socketState(port: port))\nthe agent's sockets:\n\(agentSockets(a))"
            }
            let rc = try await c.wait(timeout: 75)
            #expect(rc == 0, "\(c.stdout) \(c.stderrText)\n\(stalled)\nhops \(relayHops(a))\n\(socketState(port: port))\nagent: \(a.process.stderrText.suffix(2000))")
            let lines = try await server.waitForLines(2)
            let early = try #require(lines.first { $0["pushed_after_3s"] != nil }?["pushed_after_3s"] as? Int)
            try check(a, c, early)
            let done = try #require(lines.first { $0["sha"] != nil })
            let got = try #require(c.jsonLines.last)
            #expect(got["got"] as? Int == total, "hops \(relayHops(a))")
            #expect(got["sha"] as? String == done["sha"] as? String)
        }
    }

    @Test("100 concurrent relayed flows")
    func hundredConcurrentFlows() async throws {
        let (server, port) = try await startEchoServer()
        defer { server.kill() }
        // Slots for all of them: with fewer, a flow that connects while the relay thread
        // is still making new slots stays direct (relay_pool_empty), which a loaded
        // machine showed; this test is about carrying 100 flows at once.
        try await withRelayAgent("""
              pool_size: 128
              rules:
                - remote_port: \(port)
            """) { a in
            let report = try await relayClient(a, ["127.0.0.1", "\(port)", "--flows", "100", "--size", "200000", "--max-chunk", "20000"], timeout: 120)
            #expect(report["flows"] as? Int == 100)
            #expect(report["all_equal"] as? Bool == true, "\(report)")
            #expect(try relayedFlowCount(a) == 100, "\((try? a.cli(["stats"]))?.1 ?? "")")
        }
    }

    @Test("half-close: the FIN reaches the peer after every byte, the other direction keeps relaying; a reset reaches the process")
    func halfCloseAndReset() async throws {
        let (trailer, trailerPort) = try await startEchoServer(mode: "trailer")
        let (resetter, resetPort) = try await startEchoServer(mode: "reset")
        defer { trailer.kill(); resetter.kill() }
        try await withRelayAgent("""
              rules:
                - remote_port: \(trailerPort)
                - remote_port: \(resetPort)
            """) { a in
            // The client half-closes after its data came back; the server then sends
            // "bye" through the relay and closes.
            let r = firstResult(try await relayClient(a, ["127.0.0.1", "\(trailerPort)", "--size", "100000", "--trailer"]))
            #expect(r["echo_equal"] as? Bool == true, "\(r)")
            #expect(r["eof"] as? Bool == true)
            #expect(r["after_half_close"] as? String == "bye", "\(r)")
            let s = try await trailer.waitForLines(1)
            #expect(s.first?["eof"] as? Bool == true)
            #expect(s.first?["received"] as? Int == 100_000)

            // One write (the client writes all at once with --reset; random chunks made
            // several, and a relayed write landing after the reset took the socket's error
            // before the process saw it: docs/stream-relay.md, limits).
            let reset = try await relayClient(a, ["127.0.0.1", "\(resetPort)", "--size", "1000", "--reset"])
            #expect(firstResult(reset)["reset"] as? Bool == true, "\(reset)")
            #expect(try relayedFlowCount(a) == 2)
        }
    }

    @Test("a relayed flow whose peer is in another network namespace")
    func peerInAnotherNamespace() async throws {
        let ns = String(uniqueName("relay").suffix(40))
        let n = nameCounter.add(1, ordering: .relaxed).newValue % 200 + 20
        let hostIf = "ftr\(getpid() % 100000)h\(n % 10)", peerIf = "ftr\(getpid() % 100000)p\(n % 10)"
        let hostAddr = "10.231.\(n).1", peerAddr = "10.231.\(n).2"
        defer { _ = try? runCommand(["/usr/sbin/ip", "netns", "del", ns]) }
        for argv in [["netns", "add", ns], ["-n", ns, "link", "set", "lo", "up"],
                     ["link", "add", hostIf, "type", "veth", "peer", "name", peerIf, "netns", ns],
                     ["addr", "add", hostAddr + "/30", "dev", hostIf], ["link", "set", hostIf, "up"],
                     ["-n", ns, "addr", "add", peerAddr + "/30", "dev", peerIf], ["-n", ns, "link", "set", peerIf, "up"]] {
            let (rc, _, err) = try runCommand(["/usr/sbin/ip"] + argv)
            try #require(rc == 0, "ip \(argv): \(err)")
        }
        let (server, port) = try await startEchoServer(bind: peerAddr, netns: ns)
        defer { server.kill() }
        try await withRelayAgent("""
              rules:
                - remote: \(peerAddr)/32
                  direction: outbound
              callouts:
                - type: pass
            """) { a in
            let r = firstResult(try await relayClient(a, [peerAddr, "\(port)", "--size", "2000000", "--max-chunk", "30000"]))
            #expect(r["echo_equal"] as? Bool == true, "\(r)")
            #expect(r["eof"] as? Bool == true)
            #expect(try relayedFlowCount(a) == 1)
        }
    }

    @Test("stopping the agent mid-transfer closes the relayed flow cleanly, nothing corrupted, nothing hangs")
    func stopMidTransfer() async throws {
        let (server, port) = try await startEchoServer()
        defer { server.kill() }
        let config = tempPath("config") + ".yaml"
        try "stream:\n  rules:\n    - remote_port: \(port)\n".write(toFile: config, atomically: true, encoding: .utf8)
        defer { unlink(config) }
        let a = try await RunningAgent(extra: ["--config", config])
        let client = try Child(a.cgroup.wrap([Paths.python, Paths.relayPeer, "stream", "127.0.0.1", "\(port)"]))
        do {
            _ = try await client.waitForLines(1, timeout: 30) // data is flowing through the relay
            let t0 = Date()
            kill(a.process.pid, SIGTERM)
            let status = try await a.process.wait(timeout: 20)
            #expect(status == 0, "\(a.process.stderrText)")
            #expect(try await client.wait(timeout: 20) == 0)
            #expect(Date().timeIntervalSince(t0) < 20)
            let end = client.jsonLines.last ?? [:]
            #expect(end["end"] as? String == "eof", "\(end)")
            #expect(end["prefix_equal"] as? Bool == true, "\(end)")
            // Closed the way TCP closes: the peer got a FIN after the process's bytes (no
            // reset), and its echo kept reaching the process until its own FIN. (The last
            // bytes before that FIN can miss the process: the FIN overtakes them, a limit
            // of the kernel described in docs/stream-relay.md.)
            let served = try await server.waitForLines(1).first ?? [:]
            #expect(served["eof"] as? Bool == true, "\(served)")
            #expect((end["got"] as? Int ?? 0) <= (served["received"] as? Int ?? 0), "server \(served), client \(end)")
        } catch {
            client.kill(); await a.stop(); throw error
        }
        await a.stop()
    }

    @Test("a relay hop that breaks resets the flow: the process and the peer see a reset, nothing hangs, nothing is corrupted")
    func brokenHopResetsTheFlow() async throws {
        let (server, port) = try await startEchoServer()
        defer { server.kill() }
        try await withRelayAgent("""
              rules:
                - remote_port: \(port)
            """) { a in
            let client = try Child(a.cgroup.wrap([Paths.python, Paths.relayPeer, "stream", "127.0.0.1", "\(port)"]))
            defer { client.kill() }
            _ = try await client.waitForLines(1, timeout: 30) // data is flowing through the relay
            // The slot's receive connection breaks (its kernel end shut for writing: the
            // agent's end reads an end of file, as after any failure of that plumbing).
            try breakReceiveHop(agentPID: a.process.pid, pins: a.pins)
            // Without the agent noticing, the process would wait for echoes that never
            // come (its 30-s timeout).
            #expect(try await client.wait(timeout: 25) == 0)
            let end = client.jsonLines.last ?? [:]
            let how = end["end"] as? String ?? ""
            #expect(how.contains("abort") || how.contains("reset"), "client: \(client.stdout) \(client.stderrText)\nagent: \(a.process.stderrText.suffix(2000))")
            #expect(end["prefix_equal"] as? Bool == true, "\(end)")
            #expect(a.process.stderrText.contains("a relay hop broke"), "agent: \(a.process.stderrText.suffix(2000))")
            #expect(metricsText(a)?.contains("flowtag_relay_hop_failures_total 1") == true)
            let served = try await server.waitForLines(1).first ?? [:]
            #expect(served["eof"] as? Bool != true, "the peer must see a reset, not a clean end: \(served)")
        }
    }

    @Test("the documented example callout (a user-written StreamCallout) builds and runs")
    func exampleCalloutRuns() async throws {
        let (server, port) = try await startEchoServer()
        defer { server.kill() }
        let cgroup = try TestCgroup()
        defer { cgroup.remove() }
        let socket = tempPath("api") + ".sock", journal = tempPath("journal") + ".db"
        let config = tempPath("config") + ".yaml"
        try """
            cgroup: \(cgroup.path)
            bpffs: /sys/fs/bpf/\(uniqueName("pins"))
            socket: \(socket)
            journal: \(journal)
            metrics_address: 127.0.0.1:0
            output: none
            stream:
              rules:
                - remote_port: \(port)
            """.write(toFile: config, atomically: true, encoding: .utf8)
        defer { unlink(config); unlink(journal) }
        let agent = try Child([Paths.repo + "/.build/debug/flowtag-example-uppercase", config])
        defer { kill(agent.pid, SIGTERM); _ = try? runCommand(["/bin/sleep", "0.5"]); agent.kill() }
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
        // The callout saw the owning process in its indications, FINs included.
        #expect(agent.stderrText.contains("bytes for pid \(client.pid) "), "\(agent.stderrText)")
        // The peer's FIN follows the client's: wait for both.
        for _ in 0..<100 where !(agent.stderrText.contains("FIN (send) for pid \(client.pid)") && agent.stderrText.contains("FIN (receive) for pid \(client.pid)")) {
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(agent.stderrText.contains("FIN (send) for pid \(client.pid)"), "\(agent.stderrText)")
        #expect(agent.stderrText.contains("FIN (receive) for pid \(client.pid)"), "\(agent.stderrText)")
        kill(agent.pid, SIGTERM)
        #expect(try await agent.wait(timeout: 20) == 0)
    }

    @Test("bad stream config is refused with the key and the reason")
    func badStreamConfig() throws {
        let cases: [(String, String)] = [
            ("stream:\n  rules:\n    - exe: /nonexistent/binary\n", "stream.rules[0].exe"),
            ("stream:\n  rules:\n    - remote: 10.0.0.0/99\n", "stream.rules[0].remote"),
            ("stream:\n  callouts:\n    - type: edit\n      pattern: a\n", "stream.callouts[0].replacement"),
            ("stream:\n  callouts:\n    - type: frobnicate\n", "stream.callouts[0].type"),
            ("stream:\n  pool_size: 0\n", "stream.pool_size"),
        ]
        for (yaml, key) in cases {
            let path = tempPath("config") + ".yaml"
            try yaml.write(toFile: path, atomically: true, encoding: .utf8)
            defer { unlink(path) }
            let (rc, _, err) = try runCommand([Paths.flowtagd, "--config", path, "--cgroup", "/nonexistent", "--socket", tempPath("s"),
                                               "--metrics-address", "127.0.0.1:0", "--journal", tempPath("j")])
            #expect(rc == 78, "\(yaml): \(err)")
            #expect(err.contains(key), "\(yaml): \(err)")
        }
    }
}

@Suite("A relayed process's socket found from the agent")
struct AppSocketTests {
    @Test("the socket table names a socket's inode by 4-tuple and cookie (IPv4, IPv6, v4-mapped), and its holder is found by it; a wrong cookie finds nothing")
    func inodeAndHolder() async throws {
        let script = """
        import json, os, socket, time
        out = []
        for i, (fam, listen, connect) in enumerate([(socket.AF_INET, "127.0.0.1", "127.0.0.1"), (socket.AF_INET6, "::1", "::1"),
                                                    (socket.AF_INET6, "::", "::ffff:127.0.0.1")]):
            l = socket.socket(fam); l.bind((listen, 0)); l.listen()
            c = socket.socket(fam); c.connect((connect, l.getsockname()[1])); a, _ = l.accept()
            out.append({"local": c.getsockname()[:2], "remote": c.getpeername()[:2], "inode": os.fstat(c.fileno()).st_ino,
                        "fd": c.fileno(), "cookie": int.from_bytes(c.getsockopt(socket.SOL_SOCKET, 57, 8), "little")})
            globals()["keep%d" % i] = (l, c, a)
        for entry in out:
            print(json.dumps(entry), flush=True)
        time.sleep(30)
        """
        let p = try Child([Paths.python, "-c", script])
        defer { p.kill() }
        let list = try await p.waitForLines(3)
        for entry in list {
            func endpoint(_ key: String) throws -> Endpoint {
                let pair = try #require(entry[key] as? [Any])
                var text = try #require(pair[0] as? String)
                if text.hasPrefix("::ffff:") { text.removeFirst(7) } // on the wire: IPv4
                return Endpoint(address: try #require(IPAddress(text)), port: UInt16(try #require(pair[1] as? Int)))
            }
            let local = try endpoint("local"), remote = try endpoint("remote")
            let cookie = try #require((entry["cookie"] as? NSNumber)?.uint64Value)
            var record = FlowRecord(flow: cookie, netns: 0, protocol: .tcp, family: local.address.isIPv4 ? .ipv4 : .ipv6,
                                    direction: .outbound, local: local, remote: remote,
                                    process: ProcessOwner(pid: 1, tid: 1, exe: "", comm: "", uid: 0, gid: 0, cgroup: 0),
                                    attribution: .kernel, openedAt: WallTime(nanoseconds: 0))
            let inode = AppSocket.inode(record)
            #expect(inode == (entry["inode"] as? NSNumber)?.uint64Value, "\(entry)")
            if let inode {
                let holder = AppSocket.holder(inode: inode, cookie: cookie)
                #expect(holder?.pid == UInt32(p.pid) && holder?.fd == Int32(entry["fd"] as? Int ?? -1), "\(entry): \(String(describing: holder))")
            }
            record.flow = cookie ^ 1
            #expect(AppSocket.inode(record) == nil, "a wrong cookie must not match: \(entry)")
        }
    }
}
