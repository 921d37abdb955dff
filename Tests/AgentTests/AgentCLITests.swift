import Foundation
import Testing
import FlowTagClient
@testable import FlowTagTestSupport
@testable import FlowTagAgent
@testable import FlowTagKernel

#if canImport(Glibc)
import Glibc
#endif

@Suite("Agent API and CLI", .serialized)
struct AgentCLITests {
    /// A TCP connection held open inside the agent's cgroup; returns the peer and its ports.
    func holdConnection(_ a: RunningAgent, seconds: Int = 20) async throws -> (Child, Int, Int) {
        let script = """
        import socket, time, json, os
        l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
        c = socket.create_connection(l.getsockname()); s, _ = l.accept()
        print(json.dumps({"pid": os.getpid(), "client": c.getsockname()[1], "server": l.getsockname()[1]}), flush=True)
        time.sleep(\(seconds))
        """
        let p = try Child(a.cgroup.wrap([Paths.python, "-c", script]))
        let line = try await p.waitForLines(1)[0]
        let server = line["server"] as! Int
        try await waitForFlows(a, ["--port", "\(server)"]) { $0.flows.count == 2 }
        return (p, line["client"] as! Int, server)
    }

    /// Waits (up to 20 s) until `flows <args> -o json` (as `user`) answers what `done` wants:
    /// the agent learns of a flow from its ring buffer, after the process's connect returned
    /// (a fixed 200 ms pause lost that race on a loaded machine).
    func waitForFlows(_ a: RunningAgent, _ args: [String], as user: UInt32? = nil,
                      until done: (APIFlowList) -> Bool) async throws {
        var last = ""
        let listed = try await poll(timeout: 20, every: .milliseconds(50)) { () -> Bool? in
            let (rc, out, err) = try await a.cli(["flows"] + args + ["-o", "json"], as: user)
            last = "rc \(rc): \(out.prefix(500)) \(err.prefix(300))"
            guard rc == 0, let list = try? JSONDecoder().decode(APIFlowList.self, from: Data(out.utf8)), done(list) else { return nil }
            return true
        }
        if listed == nil { throw TestFailure("flows \(args) did not list what the test waits for in 20 s; last answer: \(last)") }
    }

    @Test("connections open before the agent started are listed (seeded) and their end is seen")
    func flowsPredatingTheAgent() async throws {
        let cgroup = try TestCgroup()
        defer { cgroup.remove() } // passed to the agent, which leaves it alone
        // Connected, 1000 bytes each way, then held until told to close.
        let script = """
        import socket, json, os, sys
        l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
        c = socket.create_connection(l.getsockname()); s, _ = l.accept()
        c.sendall(b"x" * 1000); s.sendall(b"y" * 1000)
        got = b""
        while len(got) < 1000: got += s.recv(2000)
        got = b""
        while len(got) < 1000: got += c.recv(2000)
        print(json.dumps({"pid": os.getpid(), "client": c.getsockname()[1], "server": l.getsockname()[1]}), flush=True)
        sys.stdin.readline()
        c.close(); s.close()
        sys.stdin.readline()
        """
        let peer = try Child(cgroup.wrap([Paths.python, "-c", script]))
        defer { peer.kill() }
        let line = try await peer.waitForLines(1)[0]
        let client = try #require(line["client"] as? Int), server = try #require(line["server"] as? Int)
        let a = try await RunningAgent(cgroup: cgroup)
        defer { a.cleanUp() }
        do {
            let (rc, out, err) = try await a.cli(["flows", "--port", "\(server)", "-o", "json"])
            #expect(rc == 0, "\(err)")
            func decode(_ text: String) -> [[String: Any]] {
                ((try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any])?["flows"] as? [[String: Any]] ?? []
            }
            let flows = decode(out)
            #expect(flows.count == 2, "\(out)")
            for f in flows {
                #expect(f["attribution"] as? String == "seeded")
                #expect((f["process"] as? [String: Any])?["pid"] as? Int == Int(peer.pid))
                #expect(((f["process"] as? [String: Any])?["exe"] as? String)?.contains("python") == true)
            }
            let outbound = flows.first { ($0["local"] as? [String: Any])?["port"] as? Int == client }
            #expect(outbound?["direction"] as? String == "outbound")
            #expect(flows.first { ($0["local"] as? [String: Any])?["port"] as? Int == server }?["direction"] as? String == "inbound")
            // They end when the process closes them (found by re-reading the socket table).
            peer.send("")
            var closed: [[String: Any]] = []
            for _ in 0..<100 {
                let (_, c, _) = try await a.cli(["flows", "--port", "\(server)", "--state", "closed", "-o", "json"])
                closed = decode(c)
                if closed.count == 2 { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(closed.count == 2)
            #expect(closed.allSatisfy { $0["bytes_sent"] as? Int == 1000 && $0["bytes_received"] as? Int == 1000 }, "\(closed)")
        } catch {
            await a.stop(); throw error
        }
        await a.stop()
    }

    @Test("flows, filters and every output format")
    func flowsAndFormats() async throws {
        try await withAgent { a in
            let (peer, client, server) = try await holdConnection(a)
            defer { peer.kill() }
            let (rc, table, _) = try await a.cli(["flows", "--port", "\(server)"])
            #expect(rc == 0)
            #expect(table.hasPrefix("PROTO"))
            #expect(table.contains("127.0.0.1:\(client)") && table.contains("\(peer.pid)"))
            let (_, noHeaders, _) = try await a.cli(["flows", "--port", "\(server)", "--no-headers"])
            #expect(!noHeaders.contains("PROTO") && noHeaders.split(separator: "\n").count == 2)
            let (_, wide, _) = try await a.cli(["flows", "--port", "\(server)", "-o", "wide"])
            #expect(wide.contains("ATTRIBUTION") && wide.contains("outbound") && wide.contains("inbound"))
            let (_, json, _) = try await a.cli(["flows", "--pid", "\(peer.pid)", "-o", "json"])
            let list = try JSONDecoder().decode(APIFlowList.self, from: Data(json.utf8))
            #expect(list.flows.count == 2 && list.flows.allSatisfy { $0.record.process.pid == UInt32(peer.pid) && $0.state == .open })
            // Filters that exclude.
            let (rc2, _, err2) = try await a.cli(["flows", "--pid", "\(peer.pid)", "--remote", "10.0.0.0/8"])
            #expect(rc2 == ExitStatus.nothingFound.rawValue && err2.contains("no flows found"))
            let (rc3, _, _) = try await a.cli(["flows", "--proto", "udp", "--pid", "\(peer.pid)"])
            #expect(rc3 == ExitStatus.nothingFound.rawValue)
        }
    }

    @Test("lookup by 5-tuple; not found; bad arguments")
    func lookup() async throws {
        try await withAgent { a in
            let (peer, client, server) = try await holdConnection(a)
            defer { peer.kill() }
            let (rc, out, _) = try await a.cli(["lookup", "127.0.0.1:\(client)", "127.0.0.1:\(server)", "-o", "json"])
            #expect(rc == 0)
            let list = try JSONDecoder().decode(APIFlowList.self, from: Data(out.utf8))
            #expect(list.flows.first?.record.process.pid == UInt32(peer.pid))
            #expect(list.flows.first?.record.direction == .outbound)
            let (rc2, _, err2) = try await a.cli(["lookup", "127.0.0.1:1", "127.0.0.1:2"])
            #expect(rc2 == ExitStatus.nothingFound.rawValue && err2.contains("no live tcp flow"))
            let (rc3, _, err3) = try await a.cli(["lookup", "not-an-endpoint", "127.0.0.1:2"])
            #expect(rc3 == ExitStatus.usage.rawValue && err3.contains("not IP:PORT"))
        }
    }

    @Test("watch streams open and close events as JSON lines")
    func watch() async throws {
        try await withAgent { a in
            let portFile = tempPath("port")
            defer { unlink(portFile) }
            let server = try Child([Paths.python, Paths.peer, "http", portFile, "10", "1"])
            defer { server.kill() }
            let port = try await waitForPort(portFile, peer: server)
            let watcher = try Child([Paths.flowtag, "watch", "--port", "\(port)", "-o", "json", "--socket", a.socket])
            defer { watcher.kill() }
            // Until the agent counts the watcher (a fixed pause lost the race on a loaded machine).
            for _ in 0..<250 {
                let (_, out, _) = try await a.cli(["stats", "-o", "json"])
                if out.contains("\"watchers\":1") { break }
                try await Task.sleep(for: .milliseconds(20))
            }
            let (rc, _, _) = try await runCommand(a.cgroup.wrap(["/usr/bin/curl", "-s", "-o", "/dev/null", "http://127.0.0.1:\(port)/"]))
            #expect(rc == 0)
            let lines = try await watcher.waitForLines(2)
            #expect(lines.map { $0["event"] as? String } == ["open", "close"])
            #expect((lines[0]["process"] as? [String: Any])?["exe"] as? String == "/usr/bin/curl")
        }
    }

    @Test("bad requests get a 4xx with a message; the agent keeps serving")
    func badRequests() async throws {
        try await withAgent { a in
            func curl(_ args: [String]) async throws -> (String, String) {
                let (_, out, _) = try await runCommand(["/usr/bin/curl", "-s", "-w", "\n%{http_code}", "--unix-socket", a.socket] + args)
                let parts = out.split(separator: "\n")
                return (String(parts.last ?? ""), parts.dropLast().joined(separator: "\n"))
            }
            let cases: [([String], String, String)] = [
                (["http://x/v1/nope"], "404", "no such endpoint"),
                (["-X", "POST", "http://x/v1/flows"], "405", "only GET"),
                (["http://x/v1/flows?pid=abc"], "400", "bad filter pid"),
                (["http://x/v1/flows?color=red"], "400", "unknown filter"),
                (["http://x/v1/lookup?local=1.2.3.4:5"], "400", "lookup needs"),
                (["http://x/v1/lookup?local=1.2.3.4&remote=1.2.3.4:5"], "400", "bad local"),
            ]
            for (args, code, message) in cases {
                let (status, body) = try await curl(args)
                #expect(status == code, "\(args): \(status) \(body)")
                #expect(body.contains(message), "\(args): \(body)")
            }
            // Garbage on the socket, and a client that connects and says nothing.
            // Garbage gets a 400 and the connection closed at once (not after the idle timeout).
            let garbage = """
                import socket, sys, time
                s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])
                start = time.monotonic(); s.sendall(b"NOT HTTP\\r\\n\\r\\n"); data = b""
                while True:
                    b = s.recv(4096)
                    if not b: break
                    data += b
                print(data.split(b"\\r\\n")[0].decode(), round(time.monotonic() - start, 1))
                """
            let (rc, out, err) = try await runCommand([Paths.python, "-c", garbage, a.socket])
            #expect(rc == 0 && out.hasPrefix("HTTP/1.1 400"), "\(out) \(err)")
            let (status, body) = try await curl(["http://x/v1/version"])
            #expect(status == "200" && body.contains(flowtagVersion))
        }
    }

    @Test("access control: other users see only their own flows")
    func accessControl() async throws {
        try await withAgent { a in
            // Let everyone reach the socket, so the agent's own check is what is tested.
            chmod(a.socket, 0o666)
            let (peer, _, server) = try await holdConnection(a)
            defer { peer.kill() }
            let nobodyScript = "import socket,time; s=socket.socket(); s.connect(('127.0.0.1', \(server))); time.sleep(20)"
            let nobody = try Child(a.cgroup.wrap(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                                  Paths.python, "-c", nobodyScript]))
            defer { nobody.kill() }
            try await waitForFlows(a, [], as: 65534) { !$0.flows.isEmpty }
            let (rc, out, err) = try await a.cli(["flows", "-o", "json"], as: 65534)
            #expect(rc == 0, "\(err)")
            let list = try JSONDecoder().decode(APIFlowList.self, from: Data(out.utf8))
            #expect(!list.flows.isEmpty)
            #expect(list.flows.allSatisfy { $0.record.process.uid == 65534 })
            let (_, rootOut, _) = try await a.cli(["flows", "-o", "json"])
            let all = try JSONDecoder().decode(APIFlowList.self, from: Data(rootOut.utf8))
            #expect(all.flows.contains { $0.record.process.uid == 0 })
            // Machine-wide counters tell of everyone's flows: refused to an outsider (77).
            let (src, _, serr) = try await a.cli(["stats"], as: 65534)
            #expect(src == ExitStatus.permission.rawValue && serr.contains("machine-wide"), "\(serr)")
            let (rootStats, _, _) = try await a.cli(["stats"])
            #expect(rootStats == 0)
            // With the socket back to 0660 root:flowtag, an outsider cannot connect at all.
            chmod(a.socket, 0o660)
            let (rc2, _, err2) = try await a.cli(["flows"], as: 65534)
            #expect(rc2 == ExitStatus.permission.rawValue, "\(err2)")
        }
    }

    @Test("the socket's group: by name (flowtag, mode 0660) or by numeric gid (a container's view of the host's group)")
    func socketGroup() async throws {
        let gid = try #require(getgrnam("flowtag")).pointee.gr_gid
        try await withAgent { a in
            var st = stat()
            #expect(stat(a.socket, &st) == 0 && st.st_gid == gid && st.st_mode & 0o777 == 0o660)
        }
        let config = tempPath("config") + ".yaml"
        try "socket_group: \"54321\"\n".write(toFile: config, atomically: true, encoding: .utf8)
        defer { unlink(config) }
        let a = try await RunningAgent(extra: ["--config", config])
        defer { a.cleanUp() }
        var st = stat()
        #expect(stat(a.socket, &st) == 0 && st.st_gid == 54321, "gid \(st.st_gid)")
        await a.stop()
    }

    @Test("kill -9 and restart: the programs are adopted, not attached twice; no flow lost or duplicated")
    func killNineRecovery() async throws {
        let a = try await RunningAgent()
        defer { a.cleanUp() }
        let attachedBefore = try FlowtagdBinaryTests.attachedPrograms(a.cgroup.path)
        let (held, _, heldPort) = try await holdConnection(a, seconds: 30)
        defer { held.kill() }
        kill(a.process.pid, SIGKILL)
        _ = try await a.process.wait()
        // While no agent runs: a whole flow opens and closes.
        let portFile = tempPath("port")
        defer { unlink(portFile) }
        let server = try Child([Paths.python, Paths.peer, "http", portFile, "10", "1"])
        defer { server.kill() }
        let port = try await waitForPort(portFile, peer: server)
        _ = try await runCommand(a.cgroup.wrap(["/usr/bin/curl", "-s", "-o", "/dev/null", "http://127.0.0.1:\(port)/"]))
        // Restart on the same pins.
        let restarted = try Child([Paths.flowtagd, "--cgroup", a.cgroup.path, "--pin-dir", a.pins, "--socket", a.socket, "--output", "none",
                                   "--metrics-address", "127.0.0.1:0", "--journal", a.journal])
        defer { restarted.kill() }
        let socket = a.socket
        _ = try await poll(timeout: 10, every: .milliseconds(20)) {
            try? await offPool { try APIClient(socketPath: socket).get("/v1/version", timeoutSeconds: 2) }
        }
        #expect(restarted.stderrText.contains("resuming the programs pinned"), "\(restarted.stderrText)")
        #expect(try FlowtagdBinaryTests.attachedPrograms(a.cgroup.path) == attachedBefore, "programs attached twice")
        try await Task.sleep(for: .milliseconds(300))
        let (lrc, live, lerr) = try await a.cli(["flows", "--port", "\(heldPort)", "-o", "json"])
        try #require(lrc == 0, "flows: \(lerr); agent: \(restarted.stderrText)")
        let held2 = try JSONDecoder().decode(APIFlowList.self, from: Data(live.utf8))
        #expect(held2.flows.count == 2 && held2.flows.allSatisfy { $0.record.process.pid == UInt32(held.pid) })
        let (crc, closed, cerr) = try await a.cli(["flows", "--port", "\(port)", "--state", "closed", "-o", "json"])
        try #require(crc == 0, "flows: \(cerr); agent: \(restarted.stderrText)")
        let missed = try JSONDecoder().decode(APIFlowList.self, from: Data(closed.utf8))
        #expect(missed.flows.count == 1 && missed.flows.first?.record.process.exe == "/usr/bin/curl")
        kill(restarted.pid, SIGTERM)
        #expect(try await restarted.wait() == 0)
        #expect(access(a.pins, F_OK) != 0)
        #expect(try FlowtagdBinaryTests.attachedPrograms(a.cgroup.path).isEmpty)
        a.cgroup.remove()
    }

    @Test("Prometheus metrics: names, types, no per-flow labels")
    func metrics() async throws {
        try await withAgent { a in
            let portFile = tempPath("port")
            defer { unlink(portFile) }
            let server = try Child([Paths.python, Paths.peer, "http", portFile, "100", "2"])
            defer { server.kill() }
            let port = try await waitForPort(portFile, peer: server)
            for _ in 0..<2 { _ = try await runCommand(a.cgroup.wrap(["/usr/bin/curl", "-s", "-o", "/dev/null", "http://127.0.0.1:\(port)/"])) }
            try await Task.sleep(for: .milliseconds(300))
            let log = a.process.stderrText
            let url = try #require(log.split(separator: "\n").first { $0.contains("metrics on ") }?.split(separator: " ").last)
            let (rc, text, _) = try await runCommand(["/usr/bin/curl", "-s", String(url)])
            #expect(rc == 0)
            for name in ["flowtag_active_flows", "flowtag_flows_opened_total", "flowtag_flows_closed_total",
                         "flowtag_flow_bytes_total{direction=\"sent\"}", "flowtag_kernel_events_lost_total",
                         "flowtag_attributions_total{source=\"kernel\"}", "flowtag_classify_duration_seconds_bucket",
                         "flowtag_journal_write_errors_total", "flowtag_build_info{version="] {
                #expect(text.contains(name), "missing \(name)")
            }
            #expect(text.contains("# TYPE flowtag_flows_opened_total counter"))
            let opened = text.split(separator: "\n").first { $0.hasPrefix("flowtag_flows_opened_total ") }
            #expect(Int(opened?.split(separator: " ").last ?? "") ?? 0 >= 2)
            #expect(!text.contains("pid=") && !text.contains("flow=\""))
            let (_, notFound, _) = try await runCommand(["/usr/bin/curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                                   String(url).replacingOccurrences(of: "/metrics", with: "/other")])
            #expect(notFound == "404")
        }
    }

    @Test("history: closed flows survive a restart and answer time and address filters")
    func historyAfterRestart() async throws {
        let journal = tempPath("journal") + ".db"
        defer { for suffix in ["", "-wal", "-shm"] { unlink(journal + suffix) } }
        let portFile = tempPath("port")
        defer { unlink(portFile) }
        let server = try Child([Paths.python, Paths.peer, "http", portFile, "10", "2"])
        defer { server.kill() }
        let port = try await waitForPort(portFile, peer: server)
        let first = try await RunningAgent(journal: journal)
        let (rc, _, _) = try await runCommand(first.cgroup.wrap(["/usr/bin/curl", "-s", "-o", "/dev/null", "http://127.0.0.1:\(port)/"]))
        #expect(rc == 0)
        try await Task.sleep(for: .milliseconds(1500)) // one journal batch
        await first.stop()
        let second = try await RunningAgent(journal: journal)
        defer { second.cleanUp() }
        let (hrc, out, err) = try await second.cli(["history", "--since", "10m", "--port", "\(port)", "--exe", "/usr/bin/curl", "-o", "json"])
        #expect(hrc == 0, "\(err)")
        let list = try JSONDecoder().decode(APIFlowList.self, from: Data(out.utf8))
        #expect(list.flows.count == 1)
        #expect(list.flows.first?.record.remote.port == port && list.flows.first?.record.closeReason != nil)
        let (_, table, _) = try await second.cli(["history", "--since", "10m", "--remote", "127.0.0.0/8", "--port", "\(port)"])
        #expect(table.contains("/usr/bin/curl"))
        let (rc2, _, _) = try await second.cli(["history", "--until", "2000-01-01T00:00:00Z", "--port", "\(port)"])
        #expect(rc2 == ExitStatus.nothingFound.rawValue)
        let (rc3, _, err3) = try await second.cli(["history", "--since", "yesterday"])
        #expect(rc3 == ExitStatus.usage.rawValue && err3.contains("--since"))
        await second.stop()
    }

    @Test("kill -9 mid-write: the journal is intact and keeps every committed row")
    func journalSurvivesKillNine() async throws {
        let (sink, port) = try await startSink("close")
        defer { sink.kill() }
        let a = try await RunningAgent()
        defer { a.cleanUp() }
        let storm = try Child(a.cgroup.wrap([Paths.python, Paths.peer, "storm", "\(port)", "4000", "bash", "4"]))
        defer { storm.kill() }
        var committed = 0
        for _ in 0..<100 where committed < 200 {
            try await Task.sleep(for: .milliseconds(100))
            let (_, out, _) = try await a.cli(["history", "--port", "\(port)", "-o", "json"])
            committed = (try? JSONDecoder().decode(APIFlowList.self, from: Data(out.utf8)).flows.count) ?? 0
        }
        try #require(committed >= 200, "the journal did not fill")
        try await Task.sleep(for: .milliseconds(1100)) // into the next batches
        kill(a.process.pid, SIGKILL)
        _ = try await a.process.wait()
        let j = try Journal(path: a.journal)
        #expect(try j.integrityCheck() == "ok")
        let rows = try j.count()
        #expect(rows >= committed, "\(rows) rows after kill -9, \(committed) were committed before")
        storm.kill()
        _ = try? await runCommand(["/usr/bin/rm", "-rf", a.pins])
    }

    @Test("a socket connected again after connect(AF_UNSPEC) keeps its cookie: two flows, both journaled once")
    func reconnectedSocket() async throws {
        let (sink, port) = try await startSink("drain")
        defer { sink.kill() }
        try await withAgent { a in
            let client = try Child(a.cgroup.wrap([Paths.python, Paths.peer, "reconnect", "\(port)"]))
            defer { client.kill() }
            let line = try await client.waitForLines(1)[0]
            let pid = try #require(line["pid"] as? Int)
            var rows: [[String: Any]] = []
            for _ in 0..<100 {
                let (_, out, _) = try await a.cli(["history", "--pid", "\(pid)", "--port", "\(port)", "-o", "json"])
                rows = ((try? JSONSerialization.jsonObject(with: Data(out.utf8))) as? [String: Any])?["flows"] as? [[String: Any]] ?? []
                if rows.count >= 2 { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(rows.count == 2, "\(rows)")
            #expect(Set(rows.compactMap { $0["flow"] as? Int }).count == 1, "one socket, one cookie")
            #expect(rows.compactMap { $0["bytes_sent"] as? Int }.sorted() == [5, 7], "\(rows)")
            let (_, live, _) = try await a.cli(["flows", "--pid", "\(pid)", "--state", "open", "-o", "json"])
            #expect(!live.contains("\"state\":\"open\""), "a flow of the reconnected socket stayed open: \(live)")
        }
    }

    @Test("a bad config is refused at start with the key and the reason")
    func badConfig() async throws {
        let path = tempPath("config") + ".yaml"
        defer { unlink(path) }
        for (yaml, expected) in [("udp_idle_seconds: soon\n", "udp_idle_seconds"), ("colour: blue\n", "unknown key"),
                                 ("metrics_address: nowhere\n", "metrics_address"), ("output: loud\n", "output"),
                                 (": : :\n  - [\n", "not valid YAML")] {
            try yaml.write(toFile: path, atomically: true, encoding: .utf8)
            let (rc, _, err) = try await runCommand([Paths.flowtagd, "--config", path])
            #expect(rc == 78, "\(yaml): \(err)")
            #expect(err.contains(expected), "\(yaml): \(err)")
        }
        let (rc, _, err) = try await runCommand([Paths.flowtagd, "--config", "/nonexistent/flowtagd.yaml"])
        #expect(rc == 78 && err.contains("cannot read"))
    }

    @Test("agent not running and bad arguments: distinct exit codes")
    func cliErrors() async throws {
        let sock = tempPath("none") + ".sock"
        let (rc, _, err) = try await runCommand([Paths.flowtag, "flows", "--socket", sock])
        #expect(rc == ExitStatus.agentDown.rawValue && err.contains("not running"))
        let (rc2, _, err2) = try await runCommand([Paths.flowtag, "flows", "--socket", sock, "--state", "sleeping"])
        #expect(rc2 == ExitStatus.usage.rawValue && err2.contains("open or closed"))
        let (rc3, _, _) = try await runCommand([Paths.flowtag, "flows", "-o", "yaml"])
        #expect(rc3 == ExitStatus.usage.rawValue)
        // The CLI's own version still prints; the missing agent is an error (README: 69).
        let (rc4, out4, err4) = try await runCommand([Paths.flowtag, "version", "--socket", sock])
        #expect(rc4 == ExitStatus.agentDown.rawValue && out4.contains("flowtag \(flowtagVersion)") && err4.contains("not running"))
    }

    @Test("stats count flows; the tagging callout's flowDelete ran for closed flows")
    func stats() async throws {
        try await withAgent { a in
            let portFile = tempPath("port")
            defer { unlink(portFile) }
            let server = try Child([Paths.python, Paths.peer, "http", portFile, "10", "3"])
            defer { server.kill() }
            let port = try await waitForPort(portFile, peer: server)
            for _ in 0..<3 {
                _ = try await runCommand(a.cgroup.wrap(["/usr/bin/curl", "-s", "-o", "/dev/null", "http://127.0.0.1:\(port)/"]))
            }
            try await Task.sleep(for: .milliseconds(300))
            let (rc, out, _) = try await a.cli(["stats", "-o", "json"])
            #expect(rc == 0)
            let st = try JSONDecoder().decode(AgentStats.self, from: Data(out.utf8))
            #expect(st.flowsOpened >= 3 && st.flowsClosed >= 3 && st.kernelEventsLost == 0)
            #expect(st.attribution["kernel"] ?? 0 >= 3)
            // Every closed flow's tagging context was removed, its flowDelete run.
            #expect(st.flowContextsDeleted == st.flowsClosed && st.flowContextsDeleted >= 3, "\(st)")
            let (_, closed, _) = try await a.cli(["flows", "--state", "closed", "--port", "\(port)", "-o", "json"])
            let list = try JSONDecoder().decode(APIFlowList.self, from: Data(closed.utf8))
            #expect(list.flows.count == 3 && list.flows.allSatisfy { $0.state == .closed && $0.record.bytesReceived > 0 })
        }
    }
}
