import Foundation
import Testing
@testable import FlowTagTestSupport
@testable import FlowTagKernel

#if canImport(Glibc)
import Glibc
#endif

/// Real programs, a private cgroup per test, real peers. Serialized: the machine has two
/// cores and several of these start hundreds of processes.
@Suite("Kernel flow stamps", .serialized)
struct KernelFlowTests {
    static let pythonExe = Paths.pythonExe

    @Test("curl and a local HTTP server: owners and byte counts")
    func curlAgainstHTTPServer() async throws {
        try await withKernel { h in
            let portFile = tempPath("port")
            defer { unlink(portFile) }
            let server = try Child(h.cgroup.wrap([Paths.python, Paths.peer, "http", portFile, "5000", "1"]))
            defer { server.kill() }
            let port = try await waitForPort(portFile, peer: server)
            let curl = try Child(h.cgroup.wrap(["/usr/bin/curl", "-s", "-o", "/dev/null", "-w",
                                                "%{size_request} %{size_header} %{size_download}",
                                                "http://127.0.0.1:\(port)/"]))
            #expect(try await curl.wait() == 0)
            let sizes = curl.stdout.split(separator: " ").compactMap { UInt64($0) }
            try #require(sizes.count == 3)
            let serverSide = try await server.waitForLines(1)[0]

            let evs = try await h.waitFor("client and server close") { evs in
                evs.contains { $0.isClose && $0.record.direction == .outbound && $0.record.remote.port == port } &&
                evs.contains { $0.isClose && $0.record.direction == .inbound && $0.record.local.port == port }
            }
            let client = try #require(evs.first { $0.isClose && $0.record.direction == .outbound && $0.record.remote.port == port }).record
            #expect(client.process.pid == UInt32(curl.pid))
            #expect(client.process.exe == "/usr/bin/curl")
            #expect(client.process.comm == "curl")
            #expect(client.attribution == .kernel)
            #expect(client.protocol == .tcp && client.family == .ipv4)
            #expect(client.bytesSent == sizes[0])
            #expect(client.bytesReceived == sizes[1] + sizes[2])
            #expect(client.process.cgroup == Cgroup2.id(of: h.cgroup.path))

            let srv = try #require(evs.first { $0.isClose && $0.record.direction == .inbound && $0.record.local.port == port }).record
            #expect(srv.process.pid == UInt32(server.pid))
            #expect(srv.process.exe == Self.pythonExe)
            #expect(srv.attribution == .kernel)
            #expect(srv.bytesReceived == serverSide["received"] as? UInt64)
            #expect(srv.bytesSent == serverSide["sent"] as? UInt64)

            // The open events carry the same flow handles and owners.
            let opens = evs.filter(\.isOpen)
            #expect(opens.contains { $0.record.flow == client.flow && $0.record.process.pid == client.process.pid })
            #expect(opens.contains { $0.record.flow == srv.flow && $0.record.process.pid == srv.process.pid })
        }
    }

    @Test("nginx with two workers: inbound flows belong to the worker that accepted")
    func nginxWorkers() async throws {
        let dir = tempPath("nginx")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = try freePort()
        let conf = """
        worker_processes 2;
        master_process on;
        pid \(dir)/nginx.pid;
        error_log \(dir)/error.log;
        events { worker_connections 128; }
        http {
            access_log off;
            client_body_temp_path \(dir)/body; proxy_temp_path \(dir)/proxy;
            fastcgi_temp_path \(dir)/fastcgi; uwsgi_temp_path \(dir)/uwsgi; scgi_temp_path \(dir)/scgi;
            server { listen 127.0.0.1:\(port); location / { return 200 "hello from nginx\\n"; } }
        }
        """
        try conf.write(toFile: dir + "/nginx.conf", atomically: true, encoding: .utf8)
        try await withKernel { h in
            // nginx daemonizes as in production; the master's pid comes from its pid file.
            let (rc, _, err) = try await runCommand(h.cgroup.wrap(["/usr/sbin/nginx", "-c", dir + "/nginx.conf", "-e", dir + "/error.log"]))
            try #require(rc == 0, "nginx: \(err)")
            var master: UInt32 = 0
            var workers: Set<UInt32> = []
            for _ in 0..<400 {
                if let text = try? String(contentsOfFile: dir + "/nginx.pid", encoding: .utf8),
                   let pid = UInt32(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
                    master = pid
                    workers = childPids(of: Int32(pid))
                    if workers.count == 2 { break }
                }
                try await Task.sleep(for: .milliseconds(25))
            }
            defer { if master != 0 { kill(Int32(master), SIGTERM) } }
            let errorLog = (try? String(contentsOfFile: dir + "/error.log", encoding: .utf8)) ?? ""
            try #require(workers.count == 2, "nginx workers did not start: \(errorLog)")
            // Clients outside the cgroup: only nginx's side is watched.
            let requests = 20
            for _ in 0..<requests {
                let (rc, out, _) = try await runCommand(["/usr/bin/curl", "-s", "-m", "5", "http://127.0.0.1:\(port)/"])
                #expect(rc == 0 && out == "hello from nginx\n")
            }
            let evs = try await h.waitFor("\(requests) inbound opens") { evs in
                evs.filter { $0.isOpen && $0.record.direction == .inbound && $0.record.local.port == port }.count >= requests
            }
            let inbound = evs.filter { $0.isOpen && $0.record.direction == .inbound && $0.record.local.port == port }
            for e in inbound {
                #expect(workers.contains(e.record.process.pid), "flow attributed to \(e.record.process.pid), workers \(workers), master \(master)")
                #expect(e.record.process.pid != master)
                #expect(e.record.process.exe == "/usr/sbin/nginx")
                #expect(e.record.attribution == .kernel)
            }
        }
    }

    @Test("UDP both directions", arguments: ["4", "6"])
    func udpBothDirections(family: String) async throws {
        try await withKernel { h in
            let portFile = tempPath("udp")
            defer { unlink(portFile) }
            let server = try Child(h.cgroup.wrap([Paths.python, Paths.peer, "udp-server", family, portFile]))
            defer { server.kill() }
            let port = try await waitForPort(portFile, peer: server)
            let client = try Child(h.cgroup.wrap([Paths.python, Paths.peer, "udp-client", family, String(port)]))
            let c = try await client.waitForLines(1)[0]
            _ = try await server.waitForLines(1)
            let clientPort = try #require(c["port"] as? Int)
            let evs = try await h.waitFor("UDP closes") { evs in
                evs.filter { $0.isClose && $0.record.protocol == .udp &&
                    ($0.record.remote.port == port || $0.record.local.port == port) }.count >= 2
            }
            let out = try #require(evs.first { $0.isClose && $0.record.protocol == .udp && $0.record.remote.port == port }).record
            #expect(out.direction == .outbound)
            #expect(out.process.pid == UInt32(client.pid))
            #expect(out.process.exe == Self.pythonExe)
            #expect(Int(out.local.port) == clientPort)
            #expect(out.family == (family == "6" ? .ipv6 : .ipv4))
            #expect(out.bytesSent == 20 && out.bytesReceived == 40)

            let inb = try #require(evs.first { $0.isClose && $0.record.protocol == .udp && $0.record.local.port == port }).record
            #expect(inb.direction == .inbound)
            #expect(inb.process.pid == UInt32(server.pid))
            #expect(Int(inb.remote.port) == clientPort)
            #expect(inb.bytesReceived == 20 && inb.bytesSent == 40)
            #expect(evs.contains { $0.isOpen && $0.record.flow == inb.flow })
        }
    }

    @Test("UDP flows end after the idle timeout")
    func udpIdleExpiry() async throws {
        try await withKernel(udpIdle: .seconds(2)) { h in
            let sender = try Child(h.cgroup.wrap([Paths.python, "-c", """
                import socket, time
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.sendto(b"x" * 7, ("127.0.0.1", 9))
                time.sleep(120)
                """])) // longer than any wait here: a loaded machine took 10 s to report the close
            defer { sender.kill() }
            let evs = try await h.waitFor("the idle close") { evs in
                evs.contains { $0.isClose && $0.record.protocol == .udp && $0.record.remote.port == 9 }
            }
            // Ended by idleness while the socket was still open.
            #expect(sender.isRunning)
            let close = try #require(evs.first { $0.isClose && $0.record.remote.port == 9 })
            #expect(close.record.bytesSent == 7 && close.record.closeReason == "idle")
            let open = try #require(evs.first { $0.isOpen && $0.record.remote.port == 9 })
            #expect(close.time.nanoseconds - open.time.nanoseconds >= 1_900_000_000)
        }
    }

    @Test("500 short-lived processes: every flow has the right tgid and executable")
    func shortLivedProcesses() async throws {
        let (sink, port) = try await startSink("close")
        defer { sink.kill() }
        try await withKernel { h in
            let count = 500
            let storm = try Child(h.cgroup.wrap([Paths.python, Paths.peer, "storm", String(port), String(count), "bash,curl,python", "8"]))
            #expect(try await storm.wait(timeout: 240) == 0)
            let truth = storm.jsonLines
            try #require(truth.count == count)
            let evs = try await h.waitFor("\(count) opens", timeout: 30) { evs in
                evs.filter { $0.isOpen && $0.record.remote.port == port }.count >= count
            }
            var byPid: [UInt32: FlowRecord] = [:]
            for e in evs where e.isOpen && e.record.remote.port == port { byPid[e.record.process.pid] = e.record }
            var wrong: [String] = []
            for t in truth {
                let pid = UInt32(t["pid"] as! Int), exe = t["exe"] as! String
                guard let r = byPid[pid] else { wrong.append("pid \(pid) (\(exe)): no flow"); continue }
                if r.process.exe != exe { wrong.append("pid \(pid): exe \(r.process.exe), expected \(exe)") }
                if r.attribution != .kernel { wrong.append("pid \(pid): attribution \(r.attribution)") }
            }
            #expect(wrong.isEmpty, "\(wrong.count) of \(count) wrong: \(wrong.prefix(10))")
            #expect(h.programs.lostEvents == 0)
        }
    }

    @Test("a process that predates the programs is attributed and marked seeded")
    func seededProcess() async throws {
        let (sink, port) = try await startSink()
        defer { sink.kill() }
        let cg = try TestCgroup()
        defer { cg.remove() }
        let early = try Child(cg.wrap([Paths.python, Paths.peer, "wait-connect", String(port)]))
        defer { early.kill() }
        _ = try await early.waitForLines(1)
        let h = try KernelHarness(cgroup: cg)
        do {
            early.send("go")
            let done = try await early.waitForLines(2)[1]
            let local = UInt16(done["port"] as! Int)
            let evs = try await h.waitFor("the late connect") { $0.contains { $0.isOpen && $0.record.local.port == local } }
            let r = try #require(evs.first { $0.isOpen && $0.record.local.port == local }).record
            #expect(r.process.pid == UInt32(early.pid))
            #expect(r.attribution == .seeded)
            #expect(r.process.exe == Self.pythonExe)
            await h.shutdown()
        } catch {
            await h.shutdown()
            throw error
        }
    }

    @Test("a socket created by a parent and connected by a forked child belongs to the child")
    func forkedChildConnects() async throws {
        let (sink, port) = try await startSink()
        defer { sink.kill() }
        try await withKernel { h in
            let p = try Child(h.cgroup.wrap([Paths.python, Paths.peer, "fork-connect", String(port)]))
            let ids = try await p.waitForLines(1)[0]
            let child = UInt32(ids["child"] as! Int), parent = UInt32(ids["parent"] as! Int)
            let evs = try await h.waitFor("the child's flow") { $0.contains { $0.isClose && $0.record.remote.port == port } }
            let opens = evs.filter { $0.isOpen && $0.record.remote.port == port }
            #expect(opens.count == 1)
            #expect(opens.first?.record.process.pid == child)
            #expect(opens.first?.record.process.pid != parent)
            #expect(evs.first { $0.isClose && $0.record.remote.port == port }?.record.bytesSent == 14)
        }
    }

    @Test("an accepted socket belongs to the process that accepted it (peer address asked), else to the first to receive or send on it")
    func acceptedSocketOwners() async throws {
        try await withKernel { h in
            let p = try Child(h.cgroup.wrap([Paths.python, Paths.peer, "accept-variants"]))
            let listenerOwner = try #require(try await p.waitForLines(1)[0]["listener_owner"] as? Int)
            for (name, acceptor, open) in try await acceptVariantOpens(p, h) {
                if name == "null-nothing" {
                    // Nobody acted on it in process context: reported at close with the listener's owner.
                    #expect(open.process.pid == UInt32(listenerOwner) && open.attribution == .inherited, "\(name): \(open.process) \(open.attribution)")
                } else {
                    #expect(open.process.pid == UInt32(acceptor) && open.attribution == .kernel, "\(name): \(open.process) \(open.attribution)")
                }
            }
        }
    }

    @Test("a listener older than the programs: its accepted sockets belong to the process that accepts, receives or sends (seeded); one nobody touched is unknown")
    func acceptedOnOlderListener() async throws {
        let cg = try TestCgroup()
        defer { cg.remove() }
        let p = try Child(cg.wrap([Paths.python, Paths.peer, "accept-variants", "wait"]))
        defer { p.kill() }
        _ = try await p.waitForLines(1)
        let h = try KernelHarness(cgroup: cg)
        do {
            p.send("go")
            for (name, acceptor, open) in try await acceptVariantOpens(p, h) {
                if name == "null-nothing" {
                    // No process acted on it and the listener has no stamp: nobody is known.
                    #expect(open.process.pid == 0 && open.attribution == .unknown, "\(name): \(open.process) \(open.attribution)")
                } else {
                    // The stamp names the acceptor; the process (forked from one older than
                    // the programs) is described from /proc, hence seeded.
                    #expect(open.process.pid == UInt32(acceptor) && open.attribution == .seeded && open.process.exe == Self.pythonExe,
                            "\(name): \(open.process) \(open.attribution)")
                }
            }
            await h.shutdown()
        } catch {
            await h.shutdown()
            throw error
        }
    }

    /// The four cases of peer.py's accept-variants (its listener line already read): each
    /// case's name, the process that accepted, and its flow's one open event.
    private func acceptVariantOpens(_ p: Child, _ h: KernelHarness) async throws -> [(String, Int, FlowRecord)] {
        let lines = try await p.waitForLines(5)
        let cases = lines.dropFirst()
        #expect(cases.allSatisfy { $0["status"] as? Int == 0 }, "\(lines)")
        let ports = Set(cases.compactMap { $0["client_port"] as? Int })
        let evs = try await h.waitFor("four inbound flows opened and closed") { evs in
            evs.filter { $0.isClose && $0.record.direction == .inbound && ports.contains(Int($0.record.remote.port)) }.count == 4
        }
        var opens: [(String, Int, FlowRecord)] = []
        for c in cases {
            let name = c["case"] as? String ?? "?"
            let port = try #require(c["client_port"] as? Int), acceptor = try #require(c["acceptor"] as? Int)
            let found = evs.filter { $0.isOpen && $0.record.direction == .inbound && Int($0.record.remote.port) == port }
            #expect(found.count == 1, "\(name): \(found.count) open events")
            if let open = found.first?.record { opens.append((name, acceptor, open)) }
        }
        #expect(opens.count == 4, "\(opens.map(\.0)) of four cases")
        return opens
    }

    @Test("the same 5-tuple in two network namespaces is two flows")
    func sameTupleTwoNamespaces() async throws {
        let namespaces = [uniqueName("a"), uniqueName("b")].map { String($0.suffix(40)) }
        for ns in namespaces {
            let (rc, _, err) = try await runCommand(["/usr/sbin/ip", "netns", "add", ns])
            try #require(rc == 0, "ip netns add: \(err)")
            _ = try await runCommand(["/usr/sbin/ip", "-n", ns, "link", "set", "lo", "up"])
        }
        defer { for ns in namespaces { _ = try? runQuickCommand(["/usr/sbin/ip", "netns", "del", ns]) } }
        try await withKernel { h in
            for ns in namespaces {
                let server = try Child(h.cgroup.wrap(["/usr/sbin/ip", "netns", "exec", ns, Paths.python, Paths.peer, "listen-once", "8080"]))
                defer { server.kill() }
                for _ in 0..<200 where !server.stdout.contains("ready") { try await Task.sleep(for: .milliseconds(20)) }
                let client = try Child(h.cgroup.wrap(["/usr/sbin/ip", "netns", "exec", ns, Paths.python, Paths.peer, "connect-from", "8080", "40000"]))
                #expect(try await client.wait() == 0, "\(client.stderrText)")
                try await server.wait()
            }
            let evs = try await h.waitFor("two outbound flows") { evs in
                evs.filter { $0.isOpen && $0.record.direction == .outbound && $0.record.remote.port == 8080 && $0.record.local.port == 40000 }.count == 2
            }
            let flows = evs.filter { $0.isOpen && $0.record.direction == .outbound && $0.record.remote.port == 8080 && $0.record.local.port == 40000 }
            #expect(Set(flows.map(\.record.netns)).count == 2)
            #expect(Set(flows.map(\.record.flow)).count == 2)
            #expect(flows[0].record.local == flows[1].record.local && flows[0].record.remote == flows[1].record.remote)
        }
    }

    @Test("detach leaves no program, link, pin or cgroup behind, also when the test body fails")
    func cleanupAfterDetachAndFailure() async throws {
        for failOnPurpose in [false, true] {
            var ids: [UInt32] = []
            var pins = "", cgroupPath = ""
            do {
                try await withKernel { h in
                    ids = h.programs.programIDs()
                    pins = h.pinDirectory
                    cgroupPath = h.cgroup.path
                    #expect(!ids.isEmpty && ids.allSatisfy(KernelPrograms.programExists(id:)))
                    #expect(access(pins + "/links", F_OK) == 0)
                    if failOnPurpose { throw TestFailure("on purpose") }
                }
                #expect(!failOnPurpose)
            } catch let e as TestFailure {
                #expect(failOnPurpose && e.description == "on purpose")
            }
            // The kernel frees programs after an RCU grace period: allow it a moment.
            for _ in 0..<200 where ids.contains(where: KernelPrograms.programExists(id:)) {
                try await Task.sleep(for: .milliseconds(10))
            }
            #expect(ids.allSatisfy { !KernelPrograms.programExists(id: $0) }, "programs still loaded after detach")
            #expect(access(pins, F_OK) != 0, "pin directory \(pins) remains")
            #expect(access(cgroupPath, F_OK) != 0, "cgroup \(cgroupPath) remains")
        }
    }
}

/// Children of a process (from /proc/PID/task/*/children).
func childPids(of pid: Int32) -> Set<UInt32> {
    let text = (try? String(contentsOfFile: "/proc/\(pid)/task/\(pid)/children", encoding: .utf8)) ?? ""
    return Set(text.split(separator: " ").compactMap { UInt32($0) })
}

/// A TCP port free on 127.0.0.1 right now.
func freePort() throws -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
    }
    guard ok else { throw TestFailure("no free port") }
    return UInt16(bigEndian: addr.sin_port)
}
