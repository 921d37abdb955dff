import Foundation
import Testing
@testable import FlowTagTestSupport
import FlowTagKernel

#if canImport(Glibc)
import Glibc
#endif

/// The relay's byte streams with relaypeer as both ends: every byte, in order, the FIN
/// after the data, resets as resets, flow control, and the callouts' edits.
@Suite("Stream relay: byte streams (real agent)", .serialized)
struct RelayStreamTests {
    @Test("pass-through: 10 MB both ways byte-exact, random chunk sizes, FIN after the data, counted per hop", arguments: ["copy", "sockmap"])
    func passThroughBulk(fastPath: String) async throws {
        try await withRelayedServer(fastPathStream(fastPath)) { a, port, server in
            var clientPorts: [Int] = []
            for (size, chunk) in [(10_000_000, 65536), (300_000, 1500), (50_000, 7)] {
                let r = firstResult(try await relayClient(a, ["127.0.0.1", "\(port)", "--size", "\(size)", "--max-chunk", "\(chunk)", "--seed", "\(size)"]))
                #expect(r["echo_equal"] as? Bool == true, "\(r) hops \(hopsForMessage(a))")
                #expect(r["eof"] as? Bool == true, "\(r)")
                clientPorts.append(r["local_port"] as? Int ?? -1)
            }
            // The server saw every byte, from the client's own address and port.
            let reports = try await server.waitForLines(3)
            #expect(Set(reports.compactMap { $0["peer_port"] as? Int }) == Set(clientPorts))
            #expect(reports.allSatisfy { $0["eof"] as? Bool == true })
            #expect(Set(reports.compactMap { $0["received"] as? Int }) == [10_000_000, 300_000, 50_000])
            let total = 10_000_000 + 300_000 + 50_000
            try await expectFastPathUsed(a, fastPath, flows: 3)
            let hops = await relayHops(a)
            for hop in ["from_process", "to_peer", "from_peer", "to_process"] {
                #expect(hops[hop] == total, "\(hop): \(hops)")
            }
            #expect(await metric(a, "flowtag_relay_flows_total") == 3)
            #expect(await metric(a, "flowtag_relay_resets_total") == 0)
            #expect(await metric(a, "flowtag_relay_reset_bytes_total") == 0)
            let (_, table, _) = try await a.cli(["stats"])
            #expect(table.split(separator: "\n").contains { $0.hasPrefix("relayed flows") && $0.hasSuffix(" 3") }, "\(table)")
            // The journal names each relayed flow by the process's port and the real destination.
            var journaled: Set<Int> = []
            for _ in 0..<50 {
                let (_, history, _) = try await a.cli(["history", "--port", "\(port)", "-o", "json"])
                let flows = ((try? JSONSerialization.jsonObject(with: Data(history.utf8))) as? [String: Any])?["flows"] as? [[String: Any]] ?? []
                journaled = Set(flows.filter { ($0["remote"] as? [String: Any])?["port"] as? Int == Int(port) }
                    .compactMap { ($0["local"] as? [String: Any])?["port"] as? Int })
                if journaled.count >= 3 { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(journaled == Set(clientPorts))
        }
    }

    @Test("edits with the pattern split across writes, in both directions (inline and out-of-band)", arguments: ["inline", "out-of-band"])
    func editsBothDirections(mode: String) async throws {
        try await withRelayedServer("""
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
            """) { a, port, server in
            var wanted: [String] = []
            for maxChunk in [3, 64, 4096] {
                let r = firstResult(try await relayClient(a, ["127.0.0.1", "\(port)", "--text", "--edit", "--size", "200000",
                                                              "--max-chunk", "\(maxChunk)", "--seed", "\(maxChunk)"]))
                wanted.append(r["server_sha"] as? String ?? "missing")
                #expect(r["echo_equal"] as? Bool == true, "max chunk \(maxChunk): \(r)")
                #expect(r["eof"] as? Bool == true, "\(r)")
            }
            // The server received exactly the send-side edit of each client's bytes.
            let reports = try await server.waitForLines(3)
            #expect(Set(reports.compactMap { $0["sha"] as? String }) == Set(wanted), "\(reports)")
        }
    }

    @Test("capture: `flowtag watch --payload` shows the first N bytes of each direction with the owner")
    func captureShownByWatch() async throws {
        try await withRelayedServer("""
              callouts:
                - type: capture
                  bytes: 16
            """) { a, port, server in
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
            #expect(captures.allSatisfy { ($0["remote"] as? [String: Any])?["port"] as? Int == Int(port) }, "the real destination")
            let (_, code, _) = try await runCommand(["/usr/bin/curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", a.socket,
                                               "http://agent/v1/watch?payload=maybe"])
            #expect(code == "400")
        }
    }

    @Test("selection by executable, uid and cgroup: only the matching process's connects are relayed")
    func selectionByExeUidCgroup() async throws {
        let (server, port) = try await startServer()
        defer { server.kill() }
        let cgroup = try TestCgroup()
        defer { cgroup.remove() } // passed to the agent, which leaves it alone
        let child = cgroup.path + "/inner"
        try #require(mkdir(child, 0o755) == 0)
        let python = try #require(readLink(Paths.python).map { $0.hasPrefix("/") ? $0 : "/usr/bin/" + $0 } ?? Paths.python)
        let config = try relayConfig("""
              rules:
                - exe: \(python)
                  uid: 0
                  cgroup: \(cgroup.path)
                  remote_port: \(port)
              callouts:
                - type: edit
                  pattern: rainy
                  replacement: cloudy
            """)
        defer { unlink(config) }
        let a = try await RunningAgent(extra: ["--config", config], cgroup: cgroup)
        defer { a.cleanUp() }
        func send(_ argv: [String]) async throws -> String {
            let script = "import socket;s=socket.create_connection(('127.0.0.1',\(port)),timeout=5);s.sendall(b'rainy');g=b''\nwhile len(g)<5:\n g+=s.recv(100)\nprint(g.decode())"
            let (_, out, _) = try await runCommand(argv + [Paths.python, "-c", script])
            return out.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        // python, root, in the cgroup: relayed (and edited; the echo has one more byte).
        #expect(try await send(cgroup.wrap([])).hasPrefix("cloud"))
        #expect(try await relayedFlowCount(a) == 1)
        // Another uid: direct.
        #expect(try await send(cgroup.wrap(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])) == "rainy")
        // A child cgroup (the rule names the exact cgroup): direct.
        #expect(try await send(["/bin/sh", "-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"", child]) == "rainy")
        // Another executable (curl) to the same port: direct.
        _ = try await runCommand(cgroup.wrap(["/usr/bin/curl", "-s", "--max-time", "2", "http://127.0.0.1:\(port)/"]))
        #expect(try await relayedFlowCount(a) == 1)
        await a.stop()
    }

    @Test("block: the connection is reset at the pattern; the bytes before it were delivered, the pattern never was")
    func blockResetsTheConnection() async throws {
        try await withRelayedServer("""
              callouts:
                - type: block
                  pattern: DROP TABLE
            """) { a, port, server in
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
            #expect(r["end"] as? String == "reset", "\(r)")
            let s = try await server.waitForLines(1)
            #expect(s.first?["received"] as? Int == 6, "the server never saw the pattern: \(s)")
            #expect(s.first?["eof"] as? Bool != true, "the server saw a reset, not a clean end: \(s)")
        }
    }

    @Test("an unselected connect is untouched and never relayed")
    func unselectedFlowUntouched() async throws {
        let (selected, selectedPort) = try await startServer()
        let (other, otherPort) = try await startServer()
        defer { selected.kill(); other.kill() }
        try await withRelayAgent("""
              rules:
                - remote_port: \(selectedPort)
              callouts:
                - type: edit
                  pattern: rainy
                  replacement: cloudy
            """) { a in
            let r = firstResult(try await relayClient(a, ["127.0.0.1", "\(otherPort)", "--text", "--size", "100000"]))
            #expect(r["echo_equal"] as? Bool == true, "\(r)")
            #expect(try await relayedFlowCount(a) == 0)
            let e = try await relayClient(a, ["127.0.0.1", "\(selectedPort)", "--text", "--size", "1000"])
            #expect(firstResult(e)["echo_equal"] as? Bool == false, "the rule works: the selected echo is edited")
            #expect(try await relayedFlowCount(a) == 1)
        }
    }

    @Test("4 concurrent 200 MB uploads, each half-closed at once: every byte arrives before the FIN (sha256)", arguments: ["copy", "sockmap"])
    func uploadsThenHalfClose(fastPath: String) async throws {
        try await withRelayedServer(mode: "digest", fastPathStream(fastPath)) { a, port, server in
            var clients: [Child] = []
            for i in 0..<4 {
                clients.append(try Child(a.cgroup.wrap([Paths.python, Paths.relayPeer, "upload", "127.0.0.1", "\(port)",
                                                        "--size", "\(200 << 20)", "--seed", "\(i + 1)"])))
            }
            for c in clients {
                let rc = try await c.wait(timeout: 240)
                #expect(rc == 0, "\(c.stdout)\(c.stderrText)\nhops \(hopsForMessage(a))\n\(socketState(port: port))")
                let r = c.jsonLines.last ?? [:]
                #expect(r["equal"] as? Bool == true, "\(r) hops \(hopsForMessage(a))")
            }
            #expect(try await relayedFlowCount(a) == 4)
            try await awaitRelayIdle(a)
            try await expectFastPathUsed(a, fastPath, flows: 4)
            let hops = await relayHops(a)
            #expect(hops["from_process"] == 4 * (200 << 20) && hops["to_peer"] == hops["from_process"], "\(hops)")
        }
    }

    @Test("a process that does not read holds its peer back: bounded buffering, and every byte arrives",
          arguments: [(false, "copy"), (true, "copy"), (false, "sockmap")])
    func nonReadingProcessIsBounded(handoff: Bool, fastPath: String) async throws {
        let total = 200 << 20
        try await withRelayedServer(mode: "push", expect: total, fastPath == "sockmap" ? fastPathStream(fastPath) : "") { a, port, server in
            // With --handoff the socket passes to another process and its connector exits.
            let c = try Child(a.cgroup.wrap([Paths.python, Paths.relayPeer, "slowread", "127.0.0.1", "\(port)", "--size", "\(total)"]
                                            + (handoff ? ["--handoff"] : [])))
            defer { c.kill() }
            let rc = try await c.wait(timeout: 90)
            #expect(rc == 0, "\(c.stdout) \(c.stderrText)\nhops \(hopsForMessage(a))\n\(socketState(port: port))")
            let lines = try await server.waitForLines(2)
            let early = try #require(lines.first { $0["pushed_after_3s"] != nil }?["pushed_after_3s"] as? Int)
            // What can wait unread: the peer's send buffer, the relay's two sockets' buffers
            // (the one it reads from autotuned up to tcp_rmem's maximum while it read), 256
            // KiB in the relay, the process's receive buffer; on the fast path also the
            // kernel's queue up to the throttle's 4 MiB and what one tick lets past it.
            // Bounded by the machine's socket limits (72 MiB here), far from 200 MiB.
            let bound = 2 * (try socketBufferMax("tcp_rmem")) + 2 * (try socketBufferMax("tcp_wmem")) + (256 << 10)
                + (fastPath == "sockmap" ? 8 << 20 : 0)
            #expect(early < bound, "the peer pushed \(early) bytes while the process read nothing (bound \(bound))")
            let done = try #require(lines.first { $0["sha"] != nil })
            let got = try #require(c.jsonLines.last)
            #expect(got["got"] as? Int == total, "hops \(hopsForMessage(a))")
            #expect(got["sha"] as? String == done["sha"] as? String)
            try await expectFastPathUsed(a, fastPath, flows: 1)
            if fastPath == "sockmap" {
                // Two things can hold the peer back: the throttle (the kernel's queue toward
                // the writer over its limit), or the verdict passing bytes to the agent (it
                // owed bytes when they came), whose bounded buffer then fills. Counted at the
                // flow's end: after expectFastPathUsed, which waits for it. Kernel-moved
                // bytes without a hold would mean an unbounded queue somewhere unmeasured.
                let holds = await metric(a, "flowtag_relay_fast_path_holds_total") ?? 0
                let moved = await metric(a, "flowtag_relay_fast_path_bytes_total") ?? 0
                #expect(holds > 0 || moved < total, "the kernel moved all \(moved) bytes and its queue was never held")
            }
        }
    }

    @Test("100 concurrent relayed connections")
    func hundredConcurrentFlows() async throws {
        try await withRelayedServer() { a, port, server in
            let report = try await relayClient(a, ["127.0.0.1", "\(port)", "--flows", "100", "--size", "200000", "--max-chunk", "20000"], timeout: 120)
            #expect(report["flows"] as? Int == 100)
            #expect(report["all_equal"] as? Bool == true, "\(report)")
            #expect(try await relayedFlowCount(a) == 100)
        }
    }

    @Test("half-close: the FIN reaches the peer after every byte, the other direction keeps relaying; the peer's reset reaches the process",
          arguments: ["copy", "sockmap"])
    func halfCloseAndReset(fastPath: String) async throws {
        let (trailer, trailerPort) = try await startServer(mode: "trailer")
        let (resetter, resetPort) = try await startServer(mode: "reset")
        defer { trailer.kill(); resetter.kill() }
        try await withRelayAgent("""
              rules:
                - remote_port: \(trailerPort)
                - remote_port: \(resetPort)
            """ + (fastPath == "sockmap" ? "\n  fast_path: sockmap\n" : "")) { a in
            // The client half-closes after its data came back; the server then sends "bye"
            // and its FIN right behind it.
            for seed in 1...5 {
                let r = firstResult(try await relayClient(a, ["127.0.0.1", "\(trailerPort)", "--size", "100000", "--trailer", "--seed", "\(seed)"]))
                #expect(r["echo_equal"] as? Bool == true, "\(r)")
                #expect(r["eof"] as? Bool == true)
                #expect(r["after_half_close"] as? String == "bye", "\(r)")
            }
            let s = try await trailer.waitForLines(5)
            #expect(s.allSatisfy { $0["eof"] as? Bool == true && $0["received"] as? Int == 100_000 }, "\(s)")
            // The server resets after its first read: the process sees a reset.
            let reset = try await relayClient(a, ["127.0.0.1", "\(resetPort)", "--size", "100000", "--reset"])
            #expect(firstResult(reset)["reset"] as? Bool == true, "\(reset)")
            #expect(try await relayedFlowCount(a) == 6)
            try await expectFastPathUsed(a, fastPath, flows: 6)
        }
    }

    @Test("a blocking reader woken by its own thread's sends (socat-style): every byte, no EAGAIN", arguments: ["copy", "sockmap"])
    func blockingReader(fastPath: String) async throws {
        try await withRelayedServer(fastPath == "sockmap" ? fastPathStream(fastPath) : """
              callouts:
                - type: edit
                  pattern: zzzzzzzz
                  replacement: yyyyyyyy
                - type: pass
            """) { a, port, server in
            let args = ["127.0.0.1", "\(port)", "--size", "\(20 << 20)"]
            let r: [String: Any]
            if fastPath == "sockmap" {
                // After its first write (the callouts allow on the first bytes) it waits
                // until its flow is on the fast path: a flow that enters while the
                // agent holds bytes can stay with the agent for all of a never-pausing
                // stream on a loaded machine (docs/stream-relay.md, Limits), and this test
                // is about a blocking reader on the kernel's path.
                let c = try Child(a.cgroup.wrap([Paths.python, Paths.relayPeer, "blocking", "--wait-go"] + args))
                _ = try await c.waitForLines(1, timeout: 30)
                let onFastPath = try await awaitMetric(a, "flowtag_relay_fast_path_flows_total", timeout: 30) { $0 == 1 }
                try #require(onFastPath == 1, "the flow never went on the fast path: \(a.metricsForMessage())")
                c.send("go")
                let status = try await c.wait(timeout: 120)
                r = try #require(c.jsonLines.last, "blocking exited \(status): \(c.stderrText)")
                #expect(status == 0, "\(c.stderrText)")
            } else {
                r = try await relayPeer(a, "blocking", args, timeout: 120)
            }
            #expect(r["equal"] as? Bool == true, "\(r)")
            #expect((r["errors"] as? [Any])?.isEmpty == true, "\(r)")
            try await expectFastPathUsed(a, fastPath, flows: 1)
        }
    }

    @Test("the process's getpeername and getsockname, and the peer's view, are what they are without the relay", arguments: ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
    func namesAsWithoutTheRelay(destination: String) async throws {
        let (server, port) = try await startServer(mode: "whoami", bind: destination.contains(":") && !destination.hasPrefix("::ffff") ? "::1" : "127.0.0.1")
        defer { server.kill() }
        try await withRelayAgent("""
              rules:
                - remote_port: \(port)
            """) { a in
            for _ in 0..<5 {
                let r = try await relayPeer(a, "names", [destination, "\(port)"])
                let peer = try #require(r["peername"] as? [Any]), me = try #require(r["sockname"] as? [Any])
                let saw = try #require(r["peer_saw"] as? [Any])
                #expect(peer[0] as? String == destination && peer[1] as? Int == Int(port), "\(r)")
                // Right after connect() already: the address and port the peer sees.
                #expect(Self.plain(me[0]) == Self.plain(saw[0]) && me[1] as? Int == saw[1] as? Int, "\(r)")
                #expect(me[1] as? Int == (r["sockname_late"] as? [Any])?[1] as? Int)
            }
            #expect(try await relayedFlowCount(a) == 5)
        }
    }

    static func plain(_ a: Any) -> String {
        let s = a as? String ?? ""
        return s.hasPrefix("::ffff:") ? String(s.dropFirst(7)) : s
    }

    @Test("a destination that refuses: the process sees a reset on its first read, counted and logged")
    func refusedDestination() async throws {
        let port = try freeTCPPort() // nothing listens there now
        try await withRelayAgent("""
              rules:
                - remote_port: \(port)
            """) { a in
            let script = """
            import socket, json
            try:
                s = socket.create_connection(("127.0.0.1", \(port)), timeout=10)
                end = "connected"
                try:
                    s.sendall(b"hello")
                    d = s.recv(100)
                    end = "eof" if not d else "data"
                except ConnectionResetError: end = "reset"
                except BrokenPipeError: end = "reset"
            except ConnectionResetError: end = "reset at connect"
            except ConnectionRefusedError: end = "refused"
            print(json.dumps({"end": end}))
            """
            let c = try Child(a.cgroup.wrap([Paths.python, "-c", script]))
            #expect(try await c.wait() == 0, "\(c.stderrText)")
            let end = c.jsonLines.last?["end"] as? String ?? ""
            #expect(end == "reset" || end == "reset at connect", "\(c.stdout)")
            #expect(await metric(a, "flowtag_relay_connect_failures_total") == 1)
            #expect(a.process.stderrText.contains("the original destination did not accept the connection"))
        }
    }

    @Test("inbound: a local server's incoming connections pass through the callouts; the server sees the real client; the flow is the server's",
          arguments: ["127.0.0.1", "::1"])
    func inboundThroughTheCallouts(address: String) async throws {
        let port = try freeTCPPort()
        try await withRelayAgent(inboundEditStream(port: port)) { a in
            let (server, _) = try await startServer(bind: address, port: port, in: a.cgroup)
            defer { server.kill() }
            var clientPorts: [Int] = [], wanted: [String] = []
            for maxChunk in [5, 4096] {
                // The client is outside the agent's cgroup: only the server's side is selected.
                let c = try Child([Paths.python, Paths.relayPeer, "client", address, "\(port)", "--text", "--edit",
                                   "--size", "300000", "--max-chunk", "\(maxChunk)", "--seed", "\(maxChunk)"])
                #expect(try await c.wait(timeout: 90) == 0, "\(c.stderrText)")
                let r = firstResult(c.jsonLines.last ?? [:])
                #expect(r["echo_equal"] as? Bool == true && r["eof"] as? Bool == true, "\(r) hops \(hopsForMessage(a))")
                clientPorts.append(r["local_port"] as? Int ?? -1)
                wanted.append(r["server_sha"] as? String ?? "missing")
            }
            let served = try await server.waitForLines(2)
            #expect(served.compactMap { $0["sha"] as? String } == wanted, "the server got the receive-side edit: \(served)")
            #expect(served.compactMap { $0["peer_port"] as? Int } == clientPorts, "the server's accept names the real client: \(served)")
            let stats = try await a.stats()
            #expect(stats["relayed_flows"] as? Int == 2, "\(stats)\n\(a.process.stderrText.suffix(2000))")
            #expect(stats["relay_inbound_redirected"] as? Int == 2, "\(stats)")
            // The journal has the server's flows, inbound from the client's port, owned by the server.
            try await Task.sleep(for: .milliseconds(1500))
            let (rc, out, err) = try await a.cli(["history", "--since", "10m", "--port", "\(port)", "-o", "json"])
            #expect(rc == 0, "\(err)")
            let flows = ((try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any])?["flows"] as? [[String: Any]]) ?? []
            let inbound = flows.compactMap { $0["record"] as? [String: Any] ?? $0 }.filter { $0["direction"] as? String == "inbound" }
            let remotes = inbound.compactMap { ($0["remote"] as? [String: Any])?["port"] as? Int }.sorted()
            #expect(remotes == clientPorts.sorted(), "\(out)")
            #expect(inbound.allSatisfy { (($0["process"] as? [String: Any])?["pid"] as? Int) == Int(server.pid) }, "\(out)")
        }
    }

    @Test("inbound with no server on the port: the client's connection is accepted, then reset (as from any proxy), counted")
    func inboundWithoutServer() async throws {
        let port = try freeTCPPort()
        try await withRelayAgent("""
              rules:
                - direction: inbound
                  local_port: \(port)
            """) { a in
            let script = """
                import socket, time
                try:
                    # The reset may come before connect() returns (the handshake was the agent's).
                    s = socket.create_connection(('127.0.0.1', \(port)), timeout=10)
                    s.sendall(b'x' * 1000); time.sleep(0.2); s.sendall(b'y')
                    print('eof' if not s.recv(10) else 'data')
                except ConnectionResetError:
                    print('reset')
                """
            let c = try Child([Paths.python, "-c", script])
            #expect(try await c.wait(timeout: 60) == 0, "\(c.stderrText)")
            #expect(c.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "reset", "\(c.stdout) \(c.stderrText)")
            #expect(try await a.stats()["relay_connect_failures"] as? Int == 1)
            // A connection made straight to the agent's inbound listeners is reset, not
            // relayed to itself; the relay goes on working.
            let relayedBefore = try await relayedFlowCount(a)
            let (_, listing, _) = try await runCommand(["/usr/bin/ss", "-Hltnp"])
            let own = listing.split(separator: "\n").filter { $0.contains("pid=\(a.process.pid),") }
            // The relay's listeners have a 4096 backlog (ss shows it as Send-Q); the metrics server's is smaller.
            let ports = own.compactMap { line -> String? in
                let fields = line.split(separator: " ", omittingEmptySubsequences: true)
                guard fields.count > 3, fields[2] == "4096" else { return nil }
                return fields[3].hasPrefix("127.0.0.1:") || fields[3].hasPrefix("[::1]:") ? String(fields[3]) : nil
            }
            #expect(ports.count == 2, "the inbound listeners on 127.0.0.1 and ::1: \(own)")
            for endpoint in ports {
                let host = endpoint.hasPrefix("[") ? "::1" : "127.0.0.1"
                let p = endpoint.split(separator: ":").last.map(String.init) ?? "0"
                let probe = try Child([Paths.python, "-c", """
                    import socket
                    try:
                        s = socket.create_connection(('\(host)', \(p)), timeout=5)
                        s.sendall(b'hello'); print('eof' if not s.recv(10) else 'data')
                    except (ConnectionResetError, BrokenPipeError):
                        print('reset')
                    """])
                #expect(try await probe.wait(timeout: 30) == 0, "\(probe.stderrText)")
                #expect(probe.stdout.contains("reset") || probe.stdout.contains("eof"), "\(endpoint): \(probe.stdout)")
            }
            #expect(try await relayedFlowCount(a) == relayedBefore, "nothing relayed to the agent itself")
            #expect(a.process.isRunning)
        }
        // Without the agent the same connect is refused: the rule is gone with it.
        let direct = try Child([Paths.python, "-c", "import socket; socket.create_connection(('127.0.0.1', \(port)), timeout=5)"])
        #expect(try await direct.wait(timeout: 30) != 0)
        #expect(direct.stderrText.contains("ConnectionRefusedError"), "\(direct.stderrText)")
    }
}
