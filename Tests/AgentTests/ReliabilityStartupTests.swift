import Foundation
import Testing
import FlowTagClient
@testable import FlowTagTestSupport
@testable import FlowTagAgent
@testable import FlowTagKernel

#if canImport(Glibc)
import Glibc
#endif

/// The start-up half of the fault suite: pin directories shared or of another build,
/// every start-up error, hostile config files and command lines. Run with the storms
/// (`--filter Reliability`): it starts and kills agents all the time.
@Suite("Reliability: start-up and input", .serialized)
struct ReliabilityStartupTests {
    static func setting(_ name: String, _ fallback: Int) -> Int { ReliabilityTests.setting(name, fallback) }
    static func seed(_ what: String) -> UInt64 { ReliabilityTests.seed(what) }

    @Test("two agents on one pin directory: the second is refused, the first keeps its pins; a symlinked pin directory is refused")
    func twoAgentsOnePinDirectory() async throws {
        let a = try await RunningAgent()
        defer { a.cleanUp() }
        let other = try TestCgroup()
        defer { other.remove() }
        // Its socket in another directory (a lock beside the socket once let it start).
        let elsewhere = tempPath("second")
        mkdir(elsewhere, 0o755)
        defer { _ = try? runQuickCommand(["/usr/bin/rm", "-rf", elsewhere]) }
        let (rc, _, err) = try await runCommand([Paths.flowtagd, "--cgroup", other.path, "--pin-dir", a.pins,
                                           "--socket", elsewhere + "/api.sock", "--metrics-address", "", "--journal", ""])
        #expect(rc == 1)
        #expect(err.contains("another flowtag agent is running with pins at \(a.pins)"), "\(err)")
        #expect(try FlowtagdBinaryTests.attachedPrograms(other.path).isEmpty)
        #expect(KernelPrograms.hasPins(at: a.pins), "the first agent's pins are gone")
        #expect(try await a.stats()["active_flows"] != nil, "the first agent stopped answering")
        // A pre-planted symlink where the pin directory goes is refused.
        let target = "/sys/fs/bpf/" + uniqueName("target")
        let link = "/sys/fs/bpf/" + uniqueName("link")
        mkdir(target, 0o700)
        defer { rmdir(target); unlink(link) }
        let (src, _, serr) = try await runCommand(["/usr/bin/ln", "-s", target, link])
        if src != 0 { print("bpffs refuses symlinks here (\(serr)): the symlink case is moot") } else {
            let (lrc, _, lerr) = try await runCommand([Paths.flowtagd, "--cgroup", other.path, "--pin-dir", link,
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
        let (rc, _, err) = try await runCommand(["/usr/sbin/bpftool", "map", "update", "pinned", a.pins + "/maps/ft_build",
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
        let (rc, _, err) = try await runCommand(["/usr/bin/env", "FLOWTAG_FAIL_AT=before-publish", Paths.flowtagd, "--cgroup", a.cgroup.path,
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
            let (rc, _, _) = try await runCommand(["/usr/bin/sqlite3", journal, "CREATE TABLE accounts (id INTEGER, owner TEXT)"])
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
        let (rc, _, err) = try await runCommand(argv, timeout: 60)
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
            #expect(try await other?.stats()["active_flows"] != nil, "the running agent stopped answering")
            try await other?.stopCleanly()
        default: break
        }
        other?.cleanUp()
    }

    @Test("config files at and past every limit: refused with the key (78), never a crash or a hang; good ones pass --check-config")
    func configFiles() async throws {
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
            let (rc, out, err) = try await runCommand([Paths.flowtagd, "--check-config", "--config", path], timeout: 30)
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
            let (rc, _, err) = try await runCommand([Paths.flowtag] + args + ["--socket", a.socket], timeout: 30)
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
            let (rc, _, err) = try await runCommand([Paths.flowtag] + args + ["--socket", a.socket], timeout: 30)
            statuses[rc, default: 0] += 1
            #expect(allowed.contains(rc), "run \(i): flowtag \(args.map { String($0.prefix(40)) }) exited \(rc): \(err.prefix(500))")
            if rc == 64 { #expect(!err.isEmpty, "run \(i): exit 64 without a message") }
        }
        print("CLI fuzz: \(runs) runs, exit statuses \(statuses.sorted { $0.key < $1.key })")
        #expect(a.process.isRunning)
        try await a.stopCleanly()
    }
}
