import Foundation
import Testing
import FlowTagClient
@testable import FlowTagTestSupport
@testable import FlowTagAgent
@testable import FlowTagKernel

#if canImport(Glibc)
import Glibc
#endif

/// Faults and abuse against the real agent: hostile API requests, stalled watchers,
/// kill -9 and SIGSTOP under connect storms, a full journal filesystem, two agents on one
/// pin directory, and every start-up error. `make test` runs this suite on its own, after
/// the others (its storms load the whole machine); `make reliability` runs it at the
/// scale RELIABILITY.md reports (FLOWTAG_KILL9_RUNS, FLOWTAG_FUZZ_REQUESTS, …).
@Suite("Reliability", .serialized)
struct ReliabilityTests {
    static func setting(_ name: String, _ fallback: Int) -> Int {
        ProcessInfo.processInfo.environment[name].flatMap(Int.init) ?? fallback
    }

    /// A seed from FLOWTAG_FUZZ_SEED, else a fresh one; printed so a failure can be replayed.
    static func seed(_ what: String) -> UInt64 {
        let seed = ProcessInfo.processInfo.environment["FLOWTAG_FUZZ_SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 1...UInt64(UInt32.max))
        print("\(what): seed \(seed) (replay with FLOWTAG_FUZZ_SEED=\(seed))")
        return seed
    }

    @Test("API fuzzing under a connect storm: every answer is 2xx or 4xx, errors close the connection, the agent lives")
    func apiFuzz() async throws {
        let seed = Self.seed("API fuzz")
        let count = Self.setting("FLOWTAG_FUZZ_REQUESTS", 3000)
        let (sink, port) = try await startSink("close")
        defer { sink.kill() }
        let a = try await RunningAgent()
        defer { a.cleanUp() }
        let storm = try a.storm(port: port, seconds: 600)
        defer { storm.kill() }
        let (rc, out, err) = try runCommand([Paths.python, Paths.repo + "/Tests/Peers/apifuzz.py", a.socket, "\(count)", "\(seed)"], timeout: 1200)
        print("API fuzz: \(out.split(separator: "\n").first ?? "")")
        #expect(rc == 0, "violations (seed \(seed)):\n\(out.prefix(4000))\(err.prefix(2000))")
        #expect(a.process.isRunning, "the agent died: \(a.process.stderrText.suffix(2000))")
        let stats = try a.stats()
        #expect((stats["flows_closed"] as? Int ?? 0) > 0, "the storm's flows were not seen: \(stats)")
        storm.kill()
        try await a.stopCleanly()
    }

    @Test("200 watchers that never read during a storm: RSS stays bounded and comes back; each is dropped and counted")
    func stalledWatchers() async throws {
        let (sink, port) = try await startSink("close")
        defer { sink.kill() }
        let a = try await RunningAgent()
        defer { a.cleanUp() }
        try await a.warmUp(port: port)
        let before = a.rss
        let watchers = try Child([Paths.python, Paths.peer, "watchers", a.socket, "200", "12"])
        defer { watchers.kill() }
        _ = try await watchers.waitForLines(1)
        let storm = try a.storm(port: port, count: 20_000)
        defer { storm.kill() }
        var peak = before
        while storm.isRunning || watchers.isRunning {
            peak = max(peak, a.rss)
            _ = try a.stats() // the API answers meanwhile
            try await Task.sleep(for: .milliseconds(200))
        }
        let lines = watchers.jsonLines
        let closedByAgent = lines.last?["closed_by_agent"] as? Int ?? -1
        let stats = try a.stats()
        var after = a.rss
        for _ in 0..<50 where after > before + (40 << 20) {
            try await Task.sleep(for: .milliseconds(200))
            after = a.rss
        }
        print("stalled watchers: RSS before \(before >> 20) MiB, peak \(peak >> 20) MiB, after \(after >> 20) MiB; "
              + "\(stats["watchers_dropped"] ?? "?") dropped, \(closedByAgent) closed by the agent")
        #expect(peak - before < 200 << 20, "RSS grew by \((peak - before) >> 20) MiB with 200 stalled watchers")
        #expect(after - before < 40 << 20, "RSS did not come back: \(after >> 20) MiB after, \(before >> 20) MiB before")
        #expect(stats["watchers_dropped"] as? Int == 200, "\(stats)")
        #expect(closedByAgent == 200)
        #expect(stats["watchers"] as? Int == 0)
        try await a.stopCleanly()
    }

    @Test("kill -9 under a connect storm, then a restart: the journal holds every flow, once")
    func killNineUnderStorm() async throws {
        let runs = Self.setting("FLOWTAG_KILL9_RUNS", 1)
        var rng = SeededGenerator(seed: Self.seed("kill -9 timing"))
        let connects = Self.setting("FLOWTAG_KILL9_CONNECTS", 20_000)
        let (sink, port) = try await startSink("close")
        defer { sink.kill() }
        var a = try await RunningAgent()
        defer { a.cleanUp() }
        var report: [String] = []
        for run in 1...runs {
            let portsFile = tempPath("ports")
            defer { unlink(portsFile) }
            let udpPort = UInt16(40000 + run)
            defer { unlink(portsFile + ".udp") }
            let storm = try a.storm(port: port, count: connects, portsFile: portsFile, udpPort: udpPort)
            defer { storm.kill() }
            // Into the storm, with rows committed and rows waiting: then kill -9 and restart.
            try await Task.sleep(for: .milliseconds(Int.random(in: 800...1600, using: &rng)))
            kill(a.process.pid, SIGKILL)
            _ = try await a.process.wait()
            a = try await a.restarted()
            let recovered = a.process.stderrText.split(separator: "\n").first { $0.contains("had not journaled") } ?? "none"
            let summary = try await storm.waitForLines(1, timeout: 120)[0]
            let pid = try #require(summary["pid"] as? Int), made = try #require(summary["connects"] as? Int)
            let datagrams = try #require(summary["datagrams"] as? Int)
            let ports = Set(try String(contentsOfFile: portsFile, encoding: .utf8).split(separator: "\n").compactMap { Int($0) })
            let udpPorts = Set(try String(contentsOfFile: portsFile + ".udp", encoding: .utf8).split(separator: "\n").compactMap { Int($0) })
            var rows = 0, distinct = 0, udpRows = 0, udpDistinct = 0
            for _ in 0..<150 {
                (rows, distinct) = try a.journalCount(pid: pid, remotePort: Int(port))
                (udpRows, udpDistinct) = try a.journalCount(pid: pid, remotePort: Int(udpPort), proto: "udp")
                let udpSeen = try a.journalPorts(pid: pid, remotePort: Int(udpPort), proto: "udp")
                if distinct >= made && udpSeen.isSuperset(of: udpPorts) { break }
                try await Task.sleep(for: .milliseconds(200))
            }
            let missing = ports.subtracting(try a.journalPorts(pid: pid, remotePort: Int(port)))
            let missingUDP = udpPorts.subtracting(try a.journalPorts(pid: pid, remotePort: Int(udpPort), proto: "udp"))
            report.append("run \(run): \(made) connects + \(datagrams) UDP flows, \(distinct) + \(udpDistinct) journaled, "
                          + "\(missing.count + missingUDP.count) missing, \(rows - distinct + udpRows - udpDistinct) duplicates; \(recovered)")
            #expect(recovered.contains("closes="), "run \(run): the restarted agent recovered no close: the kill missed the window it tests")
            #expect(distinct == made && missing.isEmpty, "run \(run): \(made - distinct) TCP flows missing (ports e.g. \(missing.sorted().prefix(10)))")
            // A UDP flow is one per 5-tuple: a port used again by a later socket while the
            // first one's close still waits (the agent was down) is the same flow. Every
            // datagram's port is journaled, under the storm's pid.
            #expect(missingUDP.isEmpty, "run \(run): \(missingUDP.count) UDP ports missing")
            #expect(rows == distinct && udpRows == udpDistinct, "run \(run): duplicate rows")
        }
        print("kill -9 under storm: " + report.joined(separator: "; "))
        try await a.stopCleanly()
    }

    @Test("SIGSTOP for 10 s under a storm: the loss is counted, every flow journaled, no phantom flow stays")
    func stoppedAgent() async throws {
        let (sink, port) = try await startSink("close")
        defer { sink.kill() }
        let a = try await RunningAgent()
        defer { a.cleanUp() }
        let storm = try a.storm(port: port, seconds: 10)
        defer { storm.kill() }
        try await Task.sleep(for: .milliseconds(500))
        kill(a.process.pid, SIGSTOP)
        try await Task.sleep(for: .seconds(10))
        kill(a.process.pid, SIGCONT)
        let summary = try await storm.waitForLines(1, timeout: 60)[0]
        let pid = try #require(summary["pid"] as? Int), made = try #require(summary["connects"] as? Int)
        var distinct = 0, rows = 0
        for _ in 0..<300 {
            (rows, distinct) = try a.journalCount(pid: pid, remotePort: Int(port))
            if distinct >= made { break }
            try await Task.sleep(for: .milliseconds(200))
        }
        let stats = try a.stats()
        print("SIGSTOP 10 s: \(made) connects, \(distinct) journaled, \(stats["kernel_events_lost"] ?? "?") kernel events lost, "
              + "active flows \(stats["active_flows"] ?? "?") after")
        let dropped = stats["kernel_flows_dropped"] as? Int ?? -1
        print("SIGSTOP 10 s: \(dropped) flows the kernel could not track (its map full of closes waiting for the agent)")
        #expect((stats["kernel_events_lost"] as? Int ?? 0) > 0, "the storm did not overflow the ring buffer: \(stats)")
        // Every flow is journaled, or counted as one the kernel could not track.
        #expect(distinct + dropped == made, "\(made - distinct) flows missing from the journal, \(dropped) counted as dropped")
        #expect(rows == distinct, "\(rows - distinct) duplicate rows")
        #expect(stats["active_flows"] as? Int == 0, "phantom open flows: \(stats)")
        let (_, flows, _) = try a.cli(["flows", "--state", "open", "--port", "\(port)", "-o", "json"])
        #expect(!flows.contains("\"state\":\"open\""), "live flows that ended: \(flows.prefix(500))")
        try await a.stopCleanly()
    }

    @Test("a full journal filesystem: ingest and the API keep up, writes resume when space returns, SIGTERM stops promptly")
    func fullJournal() async throws {
        let mount = tempPath("fulljournal")
        try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
        let (mrc, _, merr) = try runCommand(["/bin/mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount])
        try #require(mrc == 0, "mount tmpfs: \(merr)")
        defer { _ = try? runCommand(["/bin/umount", "-l", mount]); rmdir(mount) }
        let (sink, port) = try await startSink("close")
        defer { sink.kill() }
        let a = try await RunningAgent(journal: mount + "/flows.db")
        defer { a.cleanUp() }
        let storm = try a.storm(port: port, count: 20_000)
        defer { storm.kill() }
        let made = try #require(try await storm.waitForLines(1, timeout: 120)[0]["connects"] as? Int)
        // Ingest keeps up although every journal write fails.
        var closed = 0
        for _ in 0..<150 {
            closed = try a.stats()["flows_closed"] as? Int ?? 0
            if closed >= made { break }
            try await Task.sleep(for: .milliseconds(200))
        }
        #expect(closed >= made, "ingest fell behind with a full journal: \(closed) of \(made) closes seen")
        let metrics = try a.metrics()
        #expect(Self.metric(metrics, "flowtag_journal_write_errors_total") > 0, "no journal write error counted")
        #expect(Self.metric(metrics, "flowtag_journal_rows_waiting") > 0)
        // Space returns: the waiting rows are written.
        let (rrc, _, rerr) = try runCommand(["/bin/mount", "-o", "remount,size=64m", mount])
        try #require(rrc == 0, "remount: \(rerr)")
        let pid = try #require(storm.jsonLines.first?["pid"] as? Int)
        var rows = 0
        for _ in 0..<250 {
            rows = try a.journalCount(pid: pid, remotePort: Int(port)).distinct
            if rows >= made { break }
            try await Task.sleep(for: .milliseconds(200))
        }
        #expect(rows == made, "after space returned the journal holds \(rows) of \(made)")
        // Full again, with rows waiting: SIGTERM still stops promptly, and says what it lost.
        let (drc, _, _) = try runCommand(["/bin/dd", "if=/dev/zero", "of=\(mount)/filler", "bs=1M", "count=100"])
        _ = drc
        let errorsBefore = Self.metric(try a.metrics(), "flowtag_journal_write_errors_total")
        let storm2 = try a.storm(port: port, count: 20_000)
        defer { storm2.kill() }
        _ = try await storm2.waitForLines(1, timeout: 120)
        var waiting = 0.0, errors = errorsBefore
        for _ in 0..<100 {
            let m = try a.metrics()
            (waiting, errors) = (Self.metric(m, "flowtag_journal_rows_waiting"), Self.metric(m, "flowtag_journal_write_errors_total"))
            if waiting > 0 && errors > errorsBefore { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(waiting > 0 && errors > errorsBefore, "the journal did not fail again on the full disk (\(waiting) waiting, \(errors) errors)")
        let start = ContinuousClock.now
        kill(a.process.pid, SIGTERM)
        let status = try await a.process.wait(timeout: 60)
        let took = ContinuousClock.now - start
        print("full journal: \(made) closes ingested while writes failed; SIGTERM with a full disk took \(took)")
        #expect(status == 0)
        #expect(took < .seconds(15), "SIGTERM took \(took) with a full journal")
        #expect(a.process.stderrText.contains("could not be written"), "\(a.process.stderrText.suffix(1000))")
        #expect(a.nothingLeft, "programs or pins left behind")
    }

    @Test("two agents on one pin directory: the second is refused, the first keeps its pins; a symlinked pin directory is refused")
    func twoAgentsOnePinDirectory() async throws {
        let a = try await RunningAgent()
        defer { a.cleanUp() }
        let other = try TestCgroup()
        defer { other.remove() }
        // Its socket in another directory (a lock beside the socket once let it start).
        let elsewhere = tempPath("second")
        mkdir(elsewhere, 0o755)
        defer { _ = try? runCommand(["/usr/bin/rm", "-rf", elsewhere]) }
        let (rc, _, err) = try runCommand([Paths.flowtagd, "--cgroup", other.path, "--pin-dir", a.pins,
                                           "--socket", elsewhere + "/api.sock", "--metrics-address", "", "--journal", ""])
        #expect(rc == 1)
        #expect(err.contains("another flowtag agent is running with pins at \(a.pins)"), "\(err)")
        #expect(try FlowtagdBinaryTests.attachedPrograms(other.path).isEmpty)
        #expect(KernelPrograms.hasPins(at: a.pins), "the first agent's pins are gone")
        #expect(try a.stats()["active_flows"] != nil, "the first agent stopped answering")
        // A pre-planted symlink where the pin directory goes is refused.
        let target = "/sys/fs/bpf/" + uniqueName("target")
        let link = "/sys/fs/bpf/" + uniqueName("link")
        mkdir(target, 0o700)
        defer { rmdir(target); unlink(link) }
        let (src, _, serr) = try runCommand(["/usr/bin/ln", "-s", target, link])
        if src != 0 { print("bpffs refuses symlinks here (\(serr)): the symlink case is moot") } else {
            let (lrc, _, lerr) = try runCommand([Paths.flowtagd, "--cgroup", other.path, "--pin-dir", link,
                                                 "--socket", "", "--metrics-address", "", "--journal", ""])
            #expect(lrc == 1 && lerr.contains("symlink"), "\(lerr)")
            #expect(try FlowtagdBinaryTests.attachedPrograms(other.path).isEmpty)
        }
        try await a.stopCleanly()
        #expect(access(a.pins, F_OK) != 0, "the pin directory (the lock) stayed after a clean stop")
    }

    @Test("a restart adopts only its own build's pins for the same cgroup; others are replaced, saying so")
    func adoptionChecks() async throws {
        let a = try await RunningAgent()
        defer { a.cleanUp() }
        let before = try FlowtagdBinaryTests.attachedPrograms(a.cgroup.path)
        kill(a.process.pid, SIGKILL)
        _ = try await a.process.wait()
        // The same build, another cgroup: the old programs are detached, new ones attached there.
        let other = try TestCgroup()
        defer { other.remove() }
        let b = try await RunningAgent(journal: a.journal, cgroup: other, pins: a.pins, socket: a.socket)
        defer { b.cleanUp() }
        #expect(b.process.stderrText.contains("replacing the programs pinned at \(a.pins): they are attached to another cgroup"),
                "\(b.process.stderrText)")
        #expect(try FlowtagdBinaryTests.attachedPrograms(a.cgroup.path).isEmpty, "the old cgroup still has the programs")
        #expect(!(try FlowtagdBinaryTests.attachedPrograms(other.path)).isEmpty)
        #expect(try FlowtagdBinaryTests.attachedPrograms(other.path).split(separator: "\n").count == before.split(separator: "\n").count)
        let attachedByB = try FlowtagdBinaryTests.attachedPrograms(other.path)
        kill(b.process.pid, SIGKILL)
        _ = try await b.process.wait()
        // Pins that claim another build (an upgrade): replaced, never adopted.
        let (rc, _, err) = try runCommand(["/usr/sbin/bpftool", "map", "update", "pinned", a.pins + "/maps/ft_build",
                                           "key", "0", "0", "0", "0", "value"] + Array(repeating: "7", count: 24))
        try #require(rc == 0, "bpftool: \(err)")
        let c = try await RunningAgent(journal: a.journal, cgroup: other, pins: a.pins, socket: a.socket)
        defer { c.cleanUp() }
        #expect(c.process.stderrText.contains("made by another flowtag build"), "\(c.process.stderrText)")
        let attachedByC = try FlowtagdBinaryTests.attachedPrograms(other.path)
        #expect(attachedByC != attachedByB, "the other build's programs are still attached")
        #expect(attachedByC.split(separator: "\n").count == attachedByB.split(separator: "\n").count, "\(attachedByC)")
        // Its own pins: adopted.
        kill(c.process.pid, SIGKILL)
        _ = try await c.process.wait()
        let attached = try FlowtagdBinaryTests.attachedPrograms(other.path)
        let d = try await RunningAgent(journal: a.journal, cgroup: other, pins: a.pins, socket: a.socket)
        defer { d.cleanUp() }
        #expect(d.process.stderrText.contains("resuming the programs pinned"), "\(d.process.stderrText)")
        #expect(try FlowtagdBinaryTests.attachedPrograms(other.path) == attached, "programs attached twice")
        try await d.stopCleanly()
    }

    @Test("a start that fails after adopting a dead agent's programs leaves them attached and pinned for the next")
    func failedStartAfterAdoption() async throws {
        let a = try await RunningAgent()
        defer { a.cleanUp() }
        let attached = try FlowtagdBinaryTests.attachedPrograms(a.cgroup.path)
        kill(a.process.pid, SIGKILL)
        _ = try await a.process.wait()
        let (rc, _, err) = try runCommand(["/usr/bin/env", "FLOWTAG_FAIL_AT=before-publish", Paths.flowtagd, "--cgroup", a.cgroup.path,
                                           "--pin-dir", a.pins, "--socket", a.socket, "--metrics-address", "", "--journal", a.journal,
                                           "--output", "none"], timeout: 60)
        #expect(rc == 1 && err.contains("resuming") && err.contains("before-publish"), "\(err)")
        #expect(try FlowtagdBinaryTests.attachedPrograms(a.cgroup.path) == attached, "the adopted programs were detached")
        #expect(KernelPrograms.hasPins(at: a.pins), "the adopted pins were removed")
        let b = try await a.restarted()
        defer { b.cleanUp() }
        #expect(b.process.stderrText.contains("resuming the programs pinned"), "\(b.process.stderrText)")
        try await b.stopCleanly()
    }

    /// One start-up error: how to provoke it, and what the agent must say.
    struct StartupFault: Sendable, CustomTestStringConvertible {
        let name: String
        let expectedStatus: Int32
        let says: String
        var testDescription: String { name }
    }

    static let startupFaults = [
        StartupFault(name: "a directory at the socket path", expectedStatus: 1, says: "is a directory"),
        StartupFault(name: "a regular file at the socket path", expectedStatus: 1, says: "is not a socket"),
        StartupFault(name: "the metrics port in use", expectedStatus: 1, says: "in use"),
        StartupFault(name: "another agent answers on the socket", expectedStatus: 1, says: "another agent answers"),
        StartupFault(name: "a 500 KB socket_group", expectedStatus: 78, says: "socket_group"),
        StartupFault(name: "a socket_group that does not exist", expectedStatus: 78, says: "socket_group"),
        StartupFault(name: "a journal of another program", expectedStatus: 1, says: "is not a flowtag journal"),
        StartupFault(name: "a journal written by a newer flowtag", expectedStatus: 1, says: "newer flowtag"),
        StartupFault(name: "a directory at the journal path", expectedStatus: 1, says: "journal"),
        StartupFault(name: "a failure after the programs were attached", expectedStatus: 1, says: "after-attach"),
        StartupFault(name: "a failure before the socket is published", expectedStatus: 1, says: "before-publish"),
    ]

    @Test("each start-up error: a clear error, the right exit status, nothing attached or pinned, files left alone",
          arguments: startupFaults)
    func startupError(_ fault: StartupFault) async throws {
        try ensureBPFFS()
        let cg = try TestCgroup()
        defer { cg.remove() }
        let pins = "/sys/fs/bpf/" + uniqueName("pins")
        var socket = tempPath("api") + ".sock"
        var journal = tempPath("journal") + ".db"
        var metrics = "127.0.0.1:0"
        var config: String?
        var failAt: String?
        var cleanup: [() -> Void] = []
        defer { cleanup.forEach { $0() } }
        var other: RunningAgent?
        switch fault.name {
        case "a directory at the socket path":
            mkdir(socket, 0o755); cleanup.append { [socket] in rmdir(socket) }
        case "a regular file at the socket path":
            FileManager.default.createFile(atPath: socket, contents: Data("keep me".utf8)); cleanup.append { [socket] in unlink(socket) }
        case "the metrics port in use":
            let l = socketListener()
            cleanup.append { close(l.fd) }
            metrics = "127.0.0.1:\(l.port)"
        case "another agent answers on the socket":
            let o = try await RunningAgent()
            other = o
            socket = o.socket
        case "a 500 KB socket_group":
            config = "socket_group: \"" + String(repeating: "g", count: 500 << 10) + "\"\n"
        case "a socket_group that does not exist":
            config = "socket_group: no-such-group-\(getpid())\n"
        case "a journal of another program":
            let (rc, _, _) = try runCommand(["/usr/bin/sqlite3", journal, "CREATE TABLE accounts (id INTEGER, owner TEXT)"])
            try #require(rc == 0)
        case "a journal written by a newer flowtag":
            let j = try Journal(path: journal)
            try await j.db.write { try $0.execute(sql: "INSERT INTO grdb_migrations (identifier) VALUES ('v99')") }
        case "a directory at the journal path":
            journal = tempPath("journaldir")
            mkdir(journal, 0o755); cleanup.append { [journal] in rmdir(journal) }
        case "a failure after the programs were attached":
            failAt = "after-attach"
        case "a failure before the socket is published":
            failAt = "before-publish"
        default:
            Issue.record("unknown fault \(fault.name)")
        }
        let journalPath = journal
        cleanup.append { for s in ["", "-wal", "-shm"] { unlink(journalPath + s) } }
        var argv = [Paths.flowtagd, "--cgroup", cg.path, "--pin-dir", pins, "--socket", socket,
                    "--metrics-address", metrics, "--journal", journal, "--output", "none"]
        if let config {
            let path = tempPath("config") + ".yaml"
            try config.write(toFile: path, atomically: true, encoding: .utf8)
            cleanup.append { unlink(path) }
            argv += ["--config", path]
        }
        if let failAt { argv = ["/usr/bin/env", "FLOWTAG_FAIL_AT=\(failAt)"] + argv }
        let (rc, _, err) = try runCommand(argv, timeout: 60)
        #expect(rc == fault.expectedStatus, "\(fault.name): exit \(rc), stderr: \(err.suffix(1000))")
        #expect(access(socket, F_OK) != 0 || fault.name.contains("socket path") || other != nil, "\(fault.name): the socket was left behind")
        #expect(err.contains(fault.says), "\(fault.name): \(err.suffix(1000))")
        #expect(err.utf8.count < 8192, "\(fault.name): the error message is \(err.utf8.count) bytes")
        #expect(try FlowtagdBinaryTests.attachedPrograms(cg.path).isEmpty, "\(fault.name): programs left attached")
        #expect(access(pins, F_OK) != 0, "\(fault.name): the pin directory was left behind")
        switch fault.name {
        case "a regular file at the socket path":
            #expect((try? String(contentsOfFile: socket, encoding: .utf8)) == "keep me", "the file at the socket path was touched")
        case "another agent answers on the socket":
            #expect(try other?.stats()["active_flows"] != nil, "the running agent stopped answering")
            try await other?.stopCleanly()
        default: break
        }
        other?.cleanUp()
    }

    @Test("config files at and past every limit: refused with the key (78), never a crash or a hang; good ones pass --check-config")
    func configFiles() throws {
        let bomb = """
            a: &a ["x","x","x","x","x","x","x","x","x"]
            b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
            c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
            d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
            e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
            f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
            g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
            h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
            i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
            """
        let cases: [(String, [UInt8], Int32, String)] = [
            ("an alias bomb", Array(bomb.utf8), 78, "YAML aliases"),
            ("an alias bomb as a mapping key", Array("a0: &a0 [x,x,x,x,x,x,x,x,x]\na1: &a1 [*a0,*a0,*a0,*a0,*a0,*a0,*a0,*a0,*a0]\nk: {*a1: 1}\n".utf8),
             78, "YAML aliases"),
            ("20,000 nodes without an alias", Array(("x: [" + Array(repeating: "1", count: 20_000).joined(separator: ",") + "]\n").utf8),
             78, "more than 10000 YAML nodes"),
            ("a file of 1 MiB and a byte", Array(("output: text\n#" + String(repeating: "x", count: (1 << 20) - 14) + "\n").utf8), 78, "larger than"),
            ("a file just under 1 MiB", Array(("output: text\n#" + String(repeating: "x", count: (1 << 20) - 15) + "\n").utf8), 0, "config OK"),
            ("a 4,097-byte path", Array(("journal: \"/" + String(repeating: "j", count: 4096) + "\"\n").utf8), 78, "config key 'journal': longer than 4096"),
            ("a 4,096-byte path", Array(("journal: \"/" + String(repeating: "j", count: 4095) + "\"\n").utf8), 0, "config OK"),
            ("binary garbage", (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7919) }, 78, "is not UTF-8 text"),
            ("a group with a shell in it", Array("socket_group: \"$(reboot)\"\n".utf8), 78, "config key 'socket_group'"),
            ("a 33-character group", Array(("socket_group: " + String(repeating: "g", count: 33) + "\n").utf8), 78, "config key 'socket_group': longer than 32"),
            ("a number past Int64", Array("udp_idle_seconds: 99999999999999999999999999\n".utf8), 78, "config key 'udp_idle_seconds'"),
            ("deep nesting", Array((String(repeating: "[", count: 5000) + String(repeating: "]", count: 5000) + "\n").utf8), 78, "not valid YAML"),
            ("a good file", Array("output: json\nudp_idle_seconds: 30\nsocket_group: \"0\"\n".utf8), 0, "config OK"),
        ]
        for (name, bytes, status, says) in cases {
            let path = tempPath("config") + ".yaml"
            defer { unlink(path) }
            FileManager.default.createFile(atPath: path, contents: Data(bytes))
            let (rc, out, err) = try runCommand([Paths.flowtagd, "--check-config", "--config", path], timeout: 30)
            #expect(rc == status, "\(name): exit \(rc): \(err.suffix(500))")
            #expect((out + err).contains(says), "\(name): \((out + err).suffix(500))")
            #expect(err.utf8.count < 4096, "\(name): a \(err.utf8.count)-byte error message")
        }
    }

    @Test("CLI fuzzing: random arguments never crash the CLI or the agent; exit statuses are the documented ones")
    func cliFuzz() async throws {
        var rng = SeededGenerator(seed: Self.seed("CLI fuzz"))
        let runs = Self.setting("FLOWTAG_CLI_FUZZ_RUNS", 300)
        let a = try await RunningAgent()
        defer { a.cleanUp() }
        let commands = ["flows", "lookup", "watch", "history", "stats", "version", "help", "nope", ""]
        let options = ["--pid", "--exe", "--comm", "--uid", "--cgroup", "--port", "--local", "--remote", "--proto", "--state",
                       "-o", "--output", "--no-headers", "--since", "--until", "--limit", "--netns", "--payload", "--help",
                       "--socket", "--bogus", "-x", "--"]
        let values = ["", "0", "-1", "65536", "18446744073709551616", "106752d", "2300-01-01T00:00:00Z", "json", "wide", "table",
                      "yaml", "tcp", "sctp", "open", "10.0.0.0/33", "::1", "1.2.3.4:80", "[::1]:80", "1.2.3.4:99999",
                      String(repeating: "a", count: 5000), "%00", "-o", "\u{1F600}", "/usr/bin/curl", "closed"]
        let allowed: Set<Int32> = [0, 1, 64, 69, 75, 76, 77]
        var statuses: [Int32: Int] = [:]
        // First the cases once seen to crash (exit 132), then random ones.
        let known: [[String]] = [["history", "--since", "106752d"], ["history", "--until", "2300-01-01T00:00:00Z"],
                                 ["history", "--since", "9223372036854775807s"], ["flows", "--port", "65536"],
                                 ["lookup", "1.2.3.4:1", "5.6.7.8:99999"], ["history", "--limit", "18446744073709551616"]]
        for (i, args) in known.enumerated() {
            let (rc, _, err) = try runCommand([Paths.flowtag] + args + ["--socket", a.socket], timeout: 30)
            #expect(rc == 64, "known case \(i): flowtag \(args) exited \(rc): \(err.prefix(500))")
        }
        for i in 0..<runs {
            var args = [commands.randomElement(using: &rng)!].filter { !$0.isEmpty }
            for _ in 0..<Int.random(in: 0...6, using: &rng) {
                if Bool.random(using: &rng) { args.append(options.randomElement(using: &rng)!) }
                if Bool.random(using: &rng) { args.append(values.randomElement(using: &rng)!) }
            }
            // Never another socket than the test agent's (nor the watch stream forever).
            args = args.filter { $0 != "--socket" }
            if args.first == "watch" { args[0] = "flows" }
            let (rc, _, err) = try runCommand([Paths.flowtag] + args + ["--socket", a.socket], timeout: 30)
            statuses[rc, default: 0] += 1
            #expect(allowed.contains(rc), "run \(i): flowtag \(args.map { String($0.prefix(40)) }) exited \(rc): \(err.prefix(500))")
            if rc == 64 { #expect(!err.isEmpty, "run \(i): exit 64 without a message") }
        }
        print("CLI fuzz: \(runs) runs, exit statuses \(statuses.sorted { $0.key < $1.key })")
        #expect(a.process.isRunning)
        try await a.stopCleanly()
    }

    static func metric(_ text: String, _ name: String) -> Double {
        for line in text.split(separator: "\n") where line.hasPrefix(name + " ") || line.hasPrefix(name + "{") {
            return Double(line.split(separator: " ").last ?? "") ?? 0
        }
        return 0
    }
}

