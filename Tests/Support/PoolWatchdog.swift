import Foundation
import Glibc

/// Watches Swift's cooperative pool (a thread per core, shared by every test): when a task
/// enqueued on it has not started after `threshold` seconds, prints what each thread of
/// this process is doing (gdb's backtraces when gdb is installed, /proc's view otherwise),
/// once per process. A test whose await resumes late then says who held the pool.
enum PoolWatchdog {
    static let threshold = 5.0

    /// Starts the watchdog (once; later calls do nothing).
    static func start() { _ = started }

    private static let started: Bool = {
        let t = Thread { watch() }
        t.name = "pool-watchdog"
        t.start()
        return true
    }()

    private static func watch() {
        while true {
            let ran = Locked(false)
            let queued = Date()
            Task.detached { ran.withLock { $0 = true } }
            while !ran.withLock({ $0 }) {
                usleep(100_000)
                let lag = Date().timeIntervalSince(queued)
                if lag > threshold {
                    report(lag: lag)
                    return
                }
            }
            usleep(500_000)
        }
    }

    private static func report(lag: Double) {
        var text = "pool watchdog: a task queued \(String(format: "%.1f", lag)) s ago has not started; threads:\n"
        text += procThreads()
        if access("/usr/bin/gdb", X_OK) == 0,
           let (_, out, err) = try? runQuickCommand(["/usr/bin/gdb", "-p", "\(getpid())", "-batch", "-nx",
                                                    "-ex", "thread apply all bt 25"], timeout: 60) {
            text += out.split(separator: "\n").filter { $0.hasPrefix("Thread ") || $0.hasPrefix("#") }.joined(separator: "\n")
            if out.isEmpty { text += "gdb: " + err.suffix(500) }
        }
        FileHandle.standardError.write(Data((text + "\n").utf8))
    }

    /// Name, state, wait channel and syscall of each thread of this process.
    private static func procThreads() -> String {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        return tasks.sorted().map { tid in
            func read(_ f: String) -> String {
                ((try? String(contentsOfFile: "/proc/self/task/\(tid)/\(f)", encoding: .utf8)) ?? "?")
                    .trimmingCharacters(in: .whitespacesAndNewlines)
            }
            let stat = read("stat")
            let state = stat.split(separator: ")").last?.split(separator: " ").first.map(String.init) ?? "?"
            return "  \(tid) \(read("comm")) state=\(state) wchan=\(read("wchan")) syscall=\(read("syscall").split(separator: " ").first ?? "?")"
        }.joined(separator: "\n") + "\n"
    }
}
