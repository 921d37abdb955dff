import Foundation
import Synchronization
import FlowTagKernel
@_exported import SeededRandom

#if canImport(Glibc)
import Glibc
#endif

/// Where the test peers and the repository live.
enum Paths {
    static let repo: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()
    static var flowtag: String { build + "/flowtag" }
    /// The python3 executable as the kernel names it (symlinks resolved).
    static let pythonExe = URL(fileURLWithPath: python).resolvingSymlinksInPath().path
    static let peer = repo + "/Tests/Peers/peer.py"
    static let python = "/usr/bin/python3"
    /// The binaries under test: the debug build, or FLOWTAG_BUILD's (`make reliability`
    /// runs the fault suite against the release build).
    static var build: String { repo + "/.build/" + (ProcessInfo.processInfo.environment["FLOWTAG_BUILD"] ?? "debug") }
    static var flowtagd: String { build + "/flowtagd" }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A unique name for this run: tests never share cgroups, pins or namespaces.
func uniqueName(_ what: String) -> String {
    let n = nameCounter.add(1, ordering: .relaxed).newValue
    return "flowtag-test-\(getpid())-\(n)-\(what)"
}
let nameCounter = Atomic<Int>(0)

/// A private cgroup v2 made for one test, removed (its processes killed) afterwards.
final class TestCgroup: @unchecked Sendable {
    let path: String

    init(_ what: String = "cg") throws {
        guard let root = Cgroup2.mountPoint() else { throw TestFailure("no cgroup2 mount") }
        path = root + "/" + uniqueName(what)
        guard mkdir(path, 0o755) == 0 else { throw TestFailure("mkdir \(path): \(String(cString: strerror(errno)))") }
    }

    /// argv that runs `argv` inside this cgroup.
    func wrap(_ argv: [String]) -> [String] {
        ["/bin/sh", "-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"", path] + argv
    }

    func remove() {
        // cgroup.kill (5.14+) ends everything still inside; then the directory can go.
        if let fd = Optional(open(path + "/cgroup.kill", O_WRONLY)), fd >= 0 {
            _ = write(fd, "1", 1)
            close(fd)
        }
        // Child cgroups a test made go first (a cgroup with children cannot be removed);
        // both are retried while killed processes are still exiting.
        for _ in 0..<100 {
            let children = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
            for c in children {
                var isDir: ObjCBool = false
                if FileManager.default.fileExists(atPath: path + "/" + c, isDirectory: &isDir), isDir.boolValue { rmdir(path + "/" + c) }
            }
            if rmdir(path) == 0 || errno == ENOENT { return }
            usleep(20_000)
        }
    }
}

/// A child process started with posix_spawn; stdout and stderr go to files (no pipe
/// can fill up or be held open by a daemon), stdin is a pipe.
final class Child: @unchecked Sendable {
    let pid: Int32
    let argv: [String]
    private let outPath: String, errPath: String
    private var stdinFD: Int32
    private let status = Locked<Int32?>(nil)

    init(_ argv: [String]) throws {
        self.argv = argv
        outPath = tempPath("out")
        errPath = tempPath("err")
        var fds: [Int32] = [0, 0]
        // Close-on-exec at once: children other tests spawn must not hold this child's
        // stdin (dup2 onto fd 0 clears the flag for this child only). Glibc's module has no
        // pipe2; the moment between the two calls is all that is left.
        guard pipe(&fds) == 0 else { throw TestFailure("pipe failed") }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[0], 0)
        posix_spawn_file_actions_addclose(&actions, fds[1])
        posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, errPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Children start with default signal dispositions and an empty mask.
        var all = sigset_t(), none = sigset_t()
        sigfillset(&all); sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        var cargs = argv.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, argv[0], &actions, &attr, &cargs, environ)
        close(fds[0])
        guard rc == 0 else { close(fds[1]); throw TestFailure("spawn \(argv[0]): \(String(cString: strerror(rc)))") }
        pid = child
        stdinFD = fds[1]
    }

    var stdout: String { (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "" }
    var stderrText: String { (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "" }

    func send(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = write(stdinFD, bytes, bytes.count)
    }

    /// JSON objects printed so far, one per line.
    var jsonLines: [[String: Any]] {
        stdout.split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
    }

    /// Exit status once the child has ended (reaped here), nil while it runs.
    var exitStatus: Int32? {
        status.withLock { st in
            if st == nil {
                var raw: Int32 = 0
                if waitpid(pid, &raw, WNOHANG) == pid {
                    st = (raw & 0x7f) == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
                }
            }
            return st
        }
    }
    var isRunning: Bool { exitStatus == nil }
    /// For failure messages: "exited with status N" or "still running".
    var state: String { exitStatus.map { "exited with status \($0)" } ?? "still running" }

    /// Waits until stdout holds `count` JSON lines.
    func waitForLines(_ count: Int, timeout: Double = 20) async throws -> [[String: Any]] {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let lines = jsonLines
            if lines.count >= count || !isRunning { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        let lines = jsonLines
        if lines.count >= count { return lines }
        throw TestFailure("child \(argv) printed \(lines.count) of \(count) lines; stderr: \(stderrText)")
    }

    @discardableResult
    func wait(timeout: Double = 30) async throws -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if let st = exitStatus { return st }
            if Date() > deadline { kill(); throw TestFailure("child \(argv) did not exit") }
            try await Task.sleep(for: .milliseconds(10))
        }
    }

    func kill() {
        if isRunning {
            Glibc.kill(pid, SIGKILL)
            for _ in 0..<500 where isRunning { usleep(2000) }
        }
    }

    deinit {
        kill()
        close(stdinFD)
        unlink(outPath); unlink(errPath)
    }
}

/// Runs a command to completion: (status, stdout, stderr). It waits with `Task.sleep`:
/// Swift Testing's pool has a thread per core, and a test blocking one here for a long
/// client run starved every other test's pollers and event readers.
func runCommand(_ argv: [String], timeout: Double = 120) async throws -> (Int32, String, String) {
    let c = try Child(argv)
    let status = try await c.wait(timeout: timeout)
    return (status, c.stdout, c.stderrText)
}

/// Runs blocking work (a socket read with a timeout) on a thread of its own and awaits it,
/// so the cooperative pool's threads stay free for other tests.
func offPool<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (done: CheckedContinuation<T, Error>) in
        Thread { done.resume(with: Result { try work() }) }.start()
    }
}

/// `runCommand` where nothing can await (defer blocks, sync cleanups): quick commands only,
/// it blocks its thread.
func runQuickCommand(_ argv: [String], timeout: Double = 30) throws -> (Int32, String, String) {
    let c = try Child(argv)
    let deadline = Date().addingTimeInterval(timeout)
    while c.isRunning {
        if Date() > deadline { c.kill(); throw TestFailure("\(argv) did not finish in \(timeout) s") }
        usleep(2000)
    }
    return (c.exitStatus ?? -1, c.stdout, c.stderrText)
}

/// Reads the port a peer wrote to a file (Python starts slowly under load). With `peer`,
/// a peer that exits first fails at once, with its stderr.
func waitForPort(_ file: String, timeout: Double = 30, peer: Child? = nil) async throws -> UInt16 {
    let started = ContinuousClock.now
    func noPort() -> TestFailure {
        TestFailure("no port in \(file) after \(ContinuousClock.now - started)" +
                    (peer.map { ": \($0.argv.suffix(6)) \($0.state), stderr: \($0.stderrText.suffix(500))" } ?? ""))
    }
    let port = try await poll(timeout: timeout) { () throws -> UInt16? in
        if let text = try? String(contentsOfFile: file, encoding: .utf8), let p = UInt16(text) { return p }
        if let peer, !peer.isRunning { throw noPort() }
        return nil
    }
    guard let port else { throw noPort() }
    return port
}

/// Polls `check` until it returns a value or `timeout` seconds passed, and looks once more
/// after the deadline: Swift Testing's pool has a thread per core, and tests blocked in
/// `runQuickCommand` or sync work can starve a poller past its deadline while what it waits for has long held.
func poll<T>(timeout: Double, every: Duration = .milliseconds(10), _ check: () async throws -> T?) async throws -> T? {
    let deadline = ContinuousClock.now + .milliseconds(Int(timeout * 1000))
    while ContinuousClock.now < deadline {
        if let value = try await check() { return value }
        try await Task.sleep(for: every)
    }
    return try await check()
}

/// A TCP sink peer outside any watched cgroup ("drain" reads until EOF, "close" hangs up
/// at once); killed when the returned child goes away.
func startSink(_ mode: String = "drain") async throws -> (Child, UInt16) {
    let portFile = tempPath("sink")
    defer { unlink(portFile) }
    let sink = try Child([Paths.python, Paths.peer, "sink", portFile, mode])
    return (sink, try await waitForPort(portFile, peer: sink)) // its state and stderr if not
}

func tempPath(_ what: String) -> String { NSTemporaryDirectory() + uniqueName(what) }

/// The loaded programs attached to a private cgroup, with every event collected.
final class KernelHarness: @unchecked Sendable {
    let cgroup: TestCgroup
    let programs: KernelPrograms
    let monitor: FlowMonitor
    let pinDirectory: String
    private let collected = Locked<[FlowEvent]>([])
    private var reader: Task<Void, Never>?

    init(cgroup: TestCgroup, udpIdle: Duration = .seconds(60)) throws {
        self.cgroup = cgroup
        try ensureBPFFS()
        pinDirectory = "/sys/fs/bpf/" + uniqueName("pins")
        programs = try KernelPrograms()
        do {
            try programs.attach(cgroup: cgroup.path)
            try programs.pin(at: pinDirectory)
            monitor = FlowMonitor(programs: programs, udpIdleTimeout: udpIdle)
            try monitor.start()
        } catch {
            programs.close()
            throw error
        }
        let events = monitor.events
        let sink = collected
        reader = Task.detached {
            for await e in events { sink.withLock { $0.append(e) } }
        }
    }

    var events: [FlowEvent] { collected.withLock { $0 } }

    /// Waits until `predicate` holds for the events so far; returns them.
    @discardableResult
    func waitFor(_ what: String, timeout: Double = 15, _ predicate: ([FlowEvent]) -> Bool) async throws -> [FlowEvent] {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let evs = events
            if predicate(evs) { return evs }
            try await Task.sleep(for: .milliseconds(25))
        }
        let evs = events
        if predicate(evs) { return evs }
        throw TestFailure("timed out waiting for \(what); \(evs.count) events:\n" + evs.prefix(40).map { EventDump.line($0) }.joined(separator: "\n"))
    }

    func shutdown() async {
        monitor.stop()
        await reader?.value
        programs.close()
    }
}

enum EventDump {
    static func line(_ e: FlowEvent) -> String {
        let r = e.record
        return "\(e.kind) \(r.protocol) \(r.direction) \(r.local)->\(r.remote) pid=\(r.process.pid) exe=\(r.process.exe) attr=\(r.attribution) sent=\(r.bytesSent) recv=\(r.bytesReceived) netns=\(r.netns)"
    }
}

func ensureBPFFS() throws {
    if BPFFS.isMounted(at: "/sys/fs/bpf") { return }
    let (rc, _, err) = try runQuickCommand(["/bin/mount", "-t", "bpf", "bpf", "/sys/fs/bpf"])
    guard rc == 0 else { throw TestFailure("mount bpffs: \(err)") }
}

/// Runs `body` with programs attached to a fresh private cgroup; everything is detached,
/// unpinned and removed afterwards, whether `body` succeeds or throws.
func withKernel<T>(udpIdle: Duration = .seconds(60), _ body: (KernelHarness) async throws -> T) async throws -> T {
    let cg = try TestCgroup()
    let h: KernelHarness
    do { h = try KernelHarness(cgroup: cg, udpIdle: udpIdle) } catch { cg.remove(); throw error }
    do {
        let v = try await body(h)
        await h.shutdown()
        cg.remove()
        return v
    } catch {
        await h.shutdown()
        cg.remove()
        throw error
    }
}

extension FlowEvent {
    var isOpen: Bool { kind == .open }
    var isClose: Bool { kind == .close }
}

/// A value behind a lock, shareable by reference (Mutex itself cannot be captured).
final class Locked<T>: @unchecked Sendable {
    private var value: T
    private let lock = NSLock()
    init(_ v: T) { value = v }
    func withLock<R>(_ body: (inout T) throws -> R) rethrows -> R {
        lock.lock(); defer { lock.unlock() }
        return try body(&value)
    }
}

/// Programs attached to a cgroup, as bpftool sees them ("" when none).
func attachedPrograms(_ cgroup: String) throws -> String {
    let (_, out, _) = try runQuickCommand(["/usr/sbin/bpftool", "cgroup", "show", cgroup])
    return out.trimmingCharacters(in: .whitespacesAndNewlines)
}
