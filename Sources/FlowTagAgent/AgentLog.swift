import FlowTagWire
import Foundation
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The agent's diagnostics: swift-log, printed to stderr one line each as
/// `flowtagd: LEVEL: message key=value …` (systemd's journal and `kubectl logs` keep
/// stderr). Flow events are not diagnostics: they go to stdout (`--output`).
public enum AgentLog {
    private static let bootstrapped = BootstrapOnce()

    /// Installs the handler (once per process) and sets the level every logger follows.
    public static func bootstrap(level: Logger.Level) {
        currentLevel.withLock { $0 = level }
        bootstrapped.run {
            LoggingSystem.bootstrap { label in StderrLogHandler(label: label) }
        }
    }

    /// The least severe level printed, for every logger (`--log-level`, `log_level`).
    static let currentLevel = Mutex<Logger.Level>(.info)

    /// `--log-level` values.
    public static let levels = Logger.Level.allCases.map(\.rawValue)

    /// CLOCK_MONOTONIC seconds with milliseconds, as debug lines carry it (`t=`): tests
    /// place their own steps among the agent's with it.
    public static func monotonicSeconds() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return String(format: "%d.%03d", Int(ts.tv_sec), Int(ts.tv_nsec / 1_000_000))
    }
}

final class BootstrapOnce: @unchecked Sendable {
    private var done = false
    private var lock = pthread_mutex_t()
    init() { pthread_mutex_init(&lock, nil) }
    func run(_ body: () -> Void) {
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        guard !done else { return }
        done = true
        body()
    }
}

/// One line per message, written with a single write(2) so lines of several threads
/// never interleave.
struct StderrLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level {
        get { AgentLog.currentLevel.withLock { $0 } }
        set { AgentLog.currentLevel.withLock { $0 = newValue } }
    }
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(level: Logger.Level, message: Logger.Message, metadata explicit: Logger.Metadata?, source: String,
             file: String, function: String, line: UInt) {
        var all = metadata
        if let explicit { all.merge(explicit) { $1 } }
        var text = "flowtagd: \(level.rawValue): \(message)"
        for (k, v) in all.sorted(by: { $0.key < $1.key }) { text += " \(k)=\(Self.quoted("\(v)"))" }
        // Debug lines say when (CLOCK_MONOTONIC seconds): what a stall spent its time on.
        if level <= .debug { text += " t=\(AgentLog.monotonicSeconds())" }
        text += "\n"
        let bytes = Array(text.utf8)
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
            if n < 0 { if errno == EINTR { continue }; return }
            off += n
        }
    }

    /// A value with spaces or quotes is quoted, so `key=value` pairs stay parseable.
    static func quoted(_ v: String) -> String {
        guard v.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" || $0 == "\n" }) || v.isEmpty else { return v }
        return "\"" + v.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n") + "\""
    }
}
