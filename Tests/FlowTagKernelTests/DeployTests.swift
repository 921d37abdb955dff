import Foundation
import Testing
@testable import FlowTagKernel

#if canImport(Glibc)
import Glibc
#endif

@Suite("Deployment", .serialized)
struct DeployTests {
    @Test("the systemd unit passes systemd-analyze verify")
    func systemdVerify() throws {
        let unit = try String(contentsOfFile: Paths.repo + "/deploy/systemd/flowtagd.service", encoding: .utf8)
        let path = tempPath("unit") + ".service"
        defer { unlink(path) }
        try unit.replacingOccurrences(of: "/usr/local/bin/flowtagd", with: Paths.flowtagd).write(toFile: path, atomically: true, encoding: .utf8)
        let (rc, out, err) = try runCommand(["/usr/bin/systemd-analyze", "verify", path])
        #expect(rc == 0, "\(out)\(err)")
        #expect(!err.contains(path), "warnings about the unit: \(err)")
    }

    @Test("the Kubernetes manifests pass kubernetes-validate")
    func kubernetesValidate() throws {
        let dir = Paths.repo + "/deploy/kubernetes"
        let files = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".yaml") }.sorted()
        #expect(files == ["configmap.yaml", "daemonset.yaml", "namespace.yaml"])
        let (rc, out, err) = try runCommand(["/usr/bin/env", "python3", "-m", "kubernetes_validate", "-k", "1.30.0"] + files.map { dir + "/" + $0 })
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
            defer { try? FileManager.default.removeItem(atPath: dir); _ = try? runCommand(["/bin/rm", "-rf", bpfDir]) }
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
                #expect(exe == KernelFlowTests.pythonExe, "with every capability the root process is named")
            } else {
                // Without CAP_SYS_PTRACE the agent still runs, but cannot name root's older processes.
                #expect(exe == "", "without sys_ptrace: \(exe ?? "no event")")
            }
            kill(a.pid, SIGTERM)
            #expect(try await a.wait() == 0)
        }
    }

    @Test("make install and make uninstall")
    func installUninstall() throws {
        let root = tempPath("destdir")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let (rc, out, err) = try runCommand(["/usr/bin/make", "-C", Paths.repo, "install", "NOBUILD=1", "DESTDIR=\(root)", "PREFIX=/usr/local"], timeout: 120)
        #expect(rc == 0, "\(out)\(err)")
        for f in ["/usr/local/bin/flowtagd", "/usr/local/bin/flowtag", "/etc/systemd/system/flowtagd.service", "/etc/flowtag/flowtagd.yaml"] {
            #expect(access(root + f, F_OK) == 0, "\(f) not installed")
        }
        let (rc2, _, _) = try runCommand(["/usr/bin/make", "-C", Paths.repo, "uninstall", "DESTDIR=\(root)", "PREFIX=/usr/local"])
        #expect(rc2 == 0)
        for f in ["/usr/local/bin/flowtagd", "/usr/local/bin/flowtag", "/etc/systemd/system/flowtagd.service"] {
            #expect(access(root + f, F_OK) != 0, "\(f) left after uninstall")
        }
        #expect(access(root + "/etc/flowtag/flowtagd.yaml", F_OK) == 0, "the operator's config is kept")
    }
}
