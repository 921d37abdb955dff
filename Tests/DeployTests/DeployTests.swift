import Foundation
import Testing
import FlowTagClient
@testable import FlowTagTestSupport
@testable import FlowTagKernel

#if canImport(Glibc)
import Glibc
#endif

@Suite("Deployment", .serialized)
struct DeployTests {
    @Test("the systemd unit passes systemd-analyze verify")
    func systemdVerify() async throws {
        let unit = try String(contentsOfFile: Paths.repo + "/deploy/systemd/flowtagd.service", encoding: .utf8)
        let path = tempPath("unit") + ".service"
        defer { unlink(path) }
        try unit.replacingOccurrences(of: "/usr/local/bin/flowtagd", with: Paths.flowtagd).write(toFile: path, atomically: true, encoding: .utf8)
        let (rc, out, err) = try await runCommand(["/usr/bin/systemd-analyze", "verify", path])
        #expect(rc == 0, "\(out)\(err)")
        #expect(!err.contains(path), "warnings about the unit: \(err)")
    }

    @Test("the Kubernetes manifests pass kubernetes-validate")
    func kubernetesValidate() async throws {
        let dir = Paths.repo + "/deploy/kubernetes"
        let files = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".yaml") }.sorted()
        #expect(files == ["configmap.yaml", "daemonset.yaml", "namespace.yaml"])
        let (rc, out, err) = try await runCommand(["/usr/bin/env", "python3", "-m", "kubernetes_validate", "-k", "1.30.0"] + files.map { dir + "/" + $0 })
        #expect(rc == 0, "\(out)\(err)")
    }

    /// Runs the agent as user nobody holding exactly `caps` (ambient).
    func agent(caps: [String], cgroup: TestCgroup, workDir: String, pinParent: String) throws -> Child {
        let set = caps.map { "+" + $0 }.joined(separator: ",")
        return try Child(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          "--inh-caps=-all" + (set.isEmpty ? "" : "," + set), "--ambient-caps=-all" + (set.isEmpty ? "" : "," + set),
                          "--bounding-set=-all" + (set.isEmpty ? "" : "," + set),
                          Paths.flowtagd, "--cgroup", cgroup.path, "--pin-dir", pinParent + "/pins", "--socket", workDir + "/api.sock",
                          "--journal", workDir + "/journal.db", "--metrics-address", "", "--output", "json"])
    }

    @Test("the unit's capability set is enough, and each one is needed")
    func capabilities() async throws {
        try ensureBPFFS()
        let needed = ["bpf", "perfmon", "net_admin", "sys_ptrace"]
        let cg = try TestCgroup()
        defer { cg.remove() }
        // A root process in the cgroup that predates the agent; it connects when told.
        let (sink, port) = try await startSink()
        defer { sink.kill() }
        for dropped in [nil] + needed {
            let caps = needed.filter { $0 != dropped }
            let dir = tempPath("caps")
            let bpfDir = "/sys/fs/bpf/" + uniqueName("caps")
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try FileManager.default.createDirectory(atPath: bpfDir, withIntermediateDirectories: true)
            chown(dir, 65534, 65534); chown(bpfDir, 65534, 65534)
            defer { try? FileManager.default.removeItem(atPath: dir); _ = try? runQuickCommand(["/bin/rm", "-rf", bpfDir]) }
            let early = try Child(cg.wrap([Paths.python, Paths.peer, "wait-connect", String(port)]))
            defer { early.kill() }
            _ = try await early.waitForLines(1)
            let a = try agent(caps: caps, cgroup: cg, workDir: dir, pinParent: bpfDir)
            defer { a.kill() }
            if dropped == "bpf" || dropped == "perfmon" || dropped == "net_admin" {
                let rc = try await a.wait(timeout: 20)
                #expect(rc != 0, "started without \(dropped!)")
                #expect(a.stderrText.contains("insufficient privileges") && a.stderrText.contains(dropped!.uppercased()), "\(a.stderrText)")
                continue
            }
            for _ in 0..<500 where access(bpfDir + "/pins/links", F_OK) != 0 && a.isRunning {
                try await Task.sleep(for: .milliseconds(20))
            }
            try #require(a.isRunning, "agent as nobody with \(caps) failed: \(a.stderrText)")
            try await Task.sleep(for: .milliseconds(300))
            early.send("go")
            let local = try await early.waitForLines(2)[1]["port"] as! Int
            var exe: String?
            for _ in 0..<200 where exe == nil {
                exe = a.jsonLines.first { ($0["local"] as? [String: Any])?["port"] as? Int == local }
                    .flatMap { ($0["process"] as? [String: Any])?["exe"] as? String }
                try await Task.sleep(for: .milliseconds(25))
            }
            if dropped == nil {
                #expect(exe == Paths.pythonExe, "with every capability the root process is named")
            } else {
                // Without CAP_SYS_PTRACE the agent still runs, but cannot name root's older processes.
                #expect(exe == "", "without sys_ptrace: \(exe ?? "no event")")
            }
            kill(a.pid, SIGTERM)
            #expect(try await a.wait() == 0)
        }
    }

    @Test("make install and make uninstall")
    func installUninstall() async throws {
        let root = tempPath("destdir")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let (rc, out, err) = try await runCommand(["/usr/bin/make", "-C", Paths.repo, "install", "NOBUILD=1", "DESTDIR=\(root)", "PREFIX=/usr/local"], timeout: 120)
        #expect(rc == 0, "\(out)\(err)")
        for f in ["/usr/local/bin/flowtagd", "/usr/local/bin/flowtag", "/etc/systemd/system/flowtagd.service", "/etc/flowtag/flowtagd.yaml"] {
            #expect(access(root + f, F_OK) == 0, "\(f) not installed")
        }
        let (rc2, _, _) = try await runCommand(["/usr/bin/make", "-C", Paths.repo, "uninstall", "DESTDIR=\(root)", "PREFIX=/usr/local"])
        #expect(rc2 == 0)
        for f in ["/usr/local/bin/flowtagd", "/usr/local/bin/flowtag", "/etc/systemd/system/flowtagd.service"] {
            #expect(access(root + f, F_OK) != 0, "\(f) left after uninstall")
        }
        #expect(access(root + "/etc/flowtag/flowtagd.yaml", F_OK) == 0, "the operator's config is kept")
    }

    /// The image `make image` builds (OCI archive), unpacked by buildah and entered with
    /// chroot: the same root filesystem a container runtime would give the agent.
    @Test("the container image runs the agent and the CLI: a flow in a private cgroup is named")
    func containerImage() async throws {
        try ensureBPFFS()
        let archive = Paths.repo + "/.build/flowtagd-image.tar"
        try #require(access(archive, R_OK) == 0, "no image at \(archive): `make image` builds it (scripts/test.sh does)")
        let (rc, out, err) = try await runCommand(["/usr/bin/buildah", "from", "--quiet", "oci-archive:" + archive], timeout: 120)
        try #require(rc == 0, "buildah from: \(err)")
        let container = out.trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? runQuickCommand(["/usr/bin/buildah", "rm", container]) }
        let (rc2, mountOut, err2) = try await runCommand(["/usr/bin/buildah", "mount", container])
        try #require(rc2 == 0, "buildah mount: \(err2)")
        let root = mountOut.trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? runQuickCommand(["/usr/bin/buildah", "umount", container]) }
        // What the DaemonSet mounts from the host: /proc (hostPID) and /sys (bpffs, cgroup).
        #expect(try await runCommand(["/bin/mount", "-t", "proc", "proc", root + "/proc"]).0 == 0)
        defer { _ = try? runQuickCommand(["/bin/umount", "-l", root + "/proc"]) }
        #expect(try await runCommand(["/bin/mount", "--rbind", "/sys", root + "/sys"]).0 == 0)
        defer { _ = try? runQuickCommand(["/bin/umount", "-l", root + "/sys"]) }

        let cg = try TestCgroup()
        defer { cg.remove() }
        let socket = "/tmp/" + uniqueName("image") + ".sock"
        let pins = "/sys/fs/bpf/" + uniqueName("image")
        defer { _ = try? runQuickCommand(["/bin/rm", "-rf", pins]) }
        let agent = try Child(["/usr/sbin/chroot", root, "/usr/local/bin/flowtagd", "--cgroup", cg.path, "--pin-dir", pins,
                               "--socket", socket, "--journal", "/var/lib/flowtag/flows.db", "--metrics-address", "", "--output", "none"])
        defer { agent.kill() }
        for _ in 0..<500 where access(root + socket, F_OK) != 0 && agent.isRunning { try await Task.sleep(for: .milliseconds(20)) }
        try #require(access(root + socket, F_OK) == 0, "the image's agent did not start: \(agent.stderrText)")

        let (sink, port) = try await startSink()
        defer { sink.kill() }
        let client = try Child(cg.wrap([Paths.python, "-c", """
            import socket, time
            s = socket.create_connection(("127.0.0.1", \(port)))
            print(s.getsockname()[1], flush=True)
            time.sleep(30)
            """]))
        defer { client.kill() }
        for _ in 0..<500 where client.stdout.isEmpty && client.isRunning { try await Task.sleep(for: .milliseconds(20)) }
        let localPort = client.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        var exe: String?
        for _ in 0..<100 where exe == nil {
            let (_, json, _) = try await runCommand(["/usr/sbin/chroot", root, "/usr/local/bin/flowtag", "flows", "--socket", socket,
                                               "--port", localPort, "--proto", "tcp", "-o", "json"])
            let flows = (try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])?["flows"] as? [[String: Any]] ?? []
            exe = flows.first { ($0["direction"] as? String) == "outbound" }.flatMap { ($0["process"] as? [String: Any])?["exe"] as? String }
            if exe == nil { try await Task.sleep(for: .milliseconds(50)) }
        }
        #expect(exe == Paths.pythonExe)
        kill(agent.pid, SIGTERM)
        #expect(try await agent.wait(timeout: 30) == 0, "\(agent.stderrText)")
        #expect(access(pins, F_OK) != 0, "the agent left its pins")
    }
}

@Suite("Deployment: the relay's capabilities", .serialized)
struct RelayCapabilityTests {
    /// The unit's set plus CAP_SYS_ADMIN relays a container's connects (setns into its
    /// network namespace to listen there); without it the agent still relays its own
    /// namespace, and the container's connects go direct, counted and logged.
    @Test("sys_admin is what relaying another network namespace needs; the unit's other capabilities suffice for the agent's own, sockmap fast path included")
    func relayCapabilities() async throws {
        try ensureBPFFS()
        let ns = try TestNetns()
        defer { ns.remove() }
        let resident = try Child(ns.wrap(["/bin/sleep", "300"]))
        defer { resident.kill() }
        let (sink, port) = try await startSink("echo")
        defer { sink.kill() }
        for caps in [["bpf", "perfmon", "net_admin", "sys_ptrace", "sys_admin"], ["bpf", "perfmon", "net_admin", "sys_ptrace"]] {
            let cg = try TestCgroup()
            defer { cg.remove() }
            let dir = tempPath("relaycaps"), bpfDir = "/sys/fs/bpf/" + uniqueName("relaycaps")
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try FileManager.default.createDirectory(atPath: bpfDir, withIntermediateDirectories: true)
            chown(dir, 65534, 65534); chown(bpfDir, 65534, 65534)
            defer { try? FileManager.default.removeItem(atPath: dir); _ = try? runQuickCommand(["/bin/rm", "-rf", bpfDir]) }
            try "stream:\n  fast_path: sockmap\n  callouts:\n    - type: allow\n  rules:\n    - remote_port: \(port)\n".write(toFile: dir + "/config.yaml", atomically: true, encoding: .utf8)
            let set = caps.map { "+" + $0 }.joined(separator: ",")
            let a = try Child(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all," + set,
                               "--ambient-caps=-all," + set, "--bounding-set=-all," + set, Paths.flowtagd, "--config", dir + "/config.yaml",
                               "--cgroup", cg.path, "--pin-dir", bpfDir + "/pins", "--socket", dir + "/api.sock",
                               "--journal", dir + "/journal.db", "--metrics-address", "", "--output", "none"])
            defer { a.kill() }
            for _ in 0..<500 where access(dir + "/api.sock", F_OK) != 0 && a.isRunning { try await Task.sleep(for: .milliseconds(20)) }
            try #require(a.isRunning, "agent with \(caps): \(a.stderrText)")
            func relayed(_ field: String = "relayed_flows") throws -> Int {
                let r = try APIClient(socketPath: dir + "/api.sock").get("/v1/stats")
                return ((try JSONSerialization.jsonObject(with: Data(r.body)) as? [String: Any])?[field] as? Int) ?? -1
            }
            func echo(_ argv: [String]) async throws {
                let script = "import socket;s=socket.create_connection(('\(ns.hostAddress)',\(port)),timeout=5);s.sendall(b'x');assert s.recv(1)==b'x'"
                let (rc, _, err) = try await runCommand(cg.wrap(argv + [Paths.python, "-c", script]))
                #expect(rc == 0, "\(err)")
            }
            try await echo([])
            #expect(try relayed() == 1, "the agent's own namespace is relayed with \(caps)")
            #expect(try relayed("relay_fast_path_flows") == 1, "on the sockmap fast path with \(caps): \(a.stderrText.suffix(800))")
            for _ in 0..<4 {
                try await echo(ns.wrap([]))
                try await Task.sleep(for: .milliseconds(300))
            }
            if caps.contains("sys_admin") {
                #expect(try relayed() >= 2, "a container's connects are relayed once it has a listener: \(a.stderrText.suffix(800))")
            } else {
                #expect(try relayed() == 1, "without sys_admin they go direct")
                #expect(a.stderrText.contains("cannot listen in a process's network namespace"), "\(a.stderrText.suffix(800))")
            }
            kill(a.pid, SIGTERM)
            #expect(try await a.wait(timeout: 30) == 0, "\(a.stderrText.suffix(800))")
        }
    }
}
