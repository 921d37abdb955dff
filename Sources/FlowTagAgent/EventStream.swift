import FlowTagKernel
import Foundation

/// Output formats for a stream of flow events.
public enum EventFormat: String, Sendable, CaseIterable {
    case text, json
}

/// Renders flow events one line each.
public enum EventLine {
    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return e
    }()

    public static func json(_ event: FlowEvent) -> String {
        (try? String(decoding: encoder.encode(event), as: UTF8.self)) ?? "{}"
    }

    public static func text(_ event: FlowEvent) -> String {
        let r = event.record
        var line = "\(event.time) \(event.kind.rawValue.padding(toLength: 5, withPad: " ", startingAt: 0)) "
        line += "\(r.protocol.rawValue) \(r.direction.rawValue) \(r.local) -> \(r.remote) "
        line += "pid=\(r.process.pid) comm=\(r.process.comm) exe=\(r.process.exe.isEmpty ? "-" : r.process.exe) "
        line += "uid=\(r.process.uid) attribution=\(r.attribution.rawValue)"
        if event.kind == .close { line += " sent=\(r.bytesSent) received=\(r.bytesReceived)" }
        return line
    }

    public static func render(_ event: FlowEvent, as format: EventFormat) -> String {
        format == .json ? json(event) : text(event)
    }
}

/// `flowtagd --cgroup PATH [--json]`: load, attach, pin, print every flow event until
/// SIGINT/SIGTERM, then detach and unpin. Returns the process exit code.
public enum EventStreamRunner {
    public struct Options: Sendable {
        public var cgroup: String?
        public var pinDirectory: String
        public var format: EventFormat
        public var udpIdleTimeout: Duration

        public init(cgroup: String?, pinDirectory: String = "/sys/fs/bpf/flowtag", format: EventFormat = .text,
                    udpIdleTimeout: Duration = .seconds(60)) {
            self.cgroup = cgroup; self.pinDirectory = pinDirectory; self.format = format
            self.udpIdleTimeout = udpIdleTimeout
        }
    }

    public static func run(_ options: Options) async -> Int32 {
        let stderr = FileHandle.standardError
        func fail(_ message: String) -> Int32 {
            stderr.write(Data("flowtagd: error: \(message)\n".utf8))
            return 1
        }
        let programs: KernelPrograms
        let monitor: FlowMonitor
        do {
            try KernelPrograms.probe()
            guard let cgroup = options.cgroup ?? Cgroup2.mountPoint() else { throw KernelError.noCgroup2 }
            // Validate the cheap things before loading anything.
            _ = try Cgroup2.open(cgroup).closing()
            try KernelPrograms.checkPinDirectory(options.pinDirectory)
            programs = try KernelPrograms()
            try programs.attach(cgroup: cgroup)
            try programs.pin(at: options.pinDirectory)
            monitor = FlowMonitor(programs: programs, udpIdleTimeout: options.udpIdleTimeout)
            try monitor.start()
        } catch {
            return fail("\(error)")
        }

        let signals = SignalWatcher(signals: [SIGINT, SIGTERM]) { monitor.stop() }
        defer { signals.cancel() }
        let out = FileHandle.standardOutput
        for await event in monitor.events {
            out.write(Data((EventLine.render(event, as: options.format) + "\n").utf8))
        }
        let lost = programs.lostEvents
        programs.close()
        if lost > 0 { stderr.write(Data("flowtagd: \(lost) kernel events were lost (ring buffer full)\n".utf8)) }
        return 0
    }
}

extension Int32 {
    /// Closes an fd opened only to validate a path.
    func closing() -> Int32 { close(self); return self }
}

/// Runs a handler on the first of the given signals (which are then ignored by default).
public final class SignalWatcher: @unchecked Sendable {
    private var sources: [DispatchSourceSignal] = []

    public init(signals: [Int32], handler: @escaping @Sendable () -> Void) {
        let queue = DispatchQueue(label: "flowtag.signals")
        for sig in signals {
            signal(sig, SIG_IGN)
            let src = DispatchSource.makeSignalSource(signal: sig, queue: queue)
            src.setEventHandler { handler() }
            src.resume()
            sources.append(src)
        }
    }

    public func cancel() { sources.forEach { $0.cancel() } }
}
