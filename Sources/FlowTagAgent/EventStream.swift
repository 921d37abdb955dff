import FlowContext
import FlowTagKernel
import Foundation
import FlowTagCore
import CFlowTagBPF
import Synchronization

/// The agent: load, attach, pin, serve the query API and mirror every flow event into
/// the flow table until SIGINT/SIGTERM, then shut down in WFP's order and detach.
/// With `format` text or json it also prints one line per event (`flowtagd --json`).
public enum AgentRunner {
    /// `streamCallouts` are added to the configured ones (user-written stream callouts:
    /// see docs/stream-relay.md and Examples/).
    public static func run(_ config: AgentConfig, streamCallouts: [StreamCallout] = []) async -> Int32 {
        let format: EventFormat? = config.output == "none" ? nil : EventFormat(rawValue: config.output)
        // Signals are caught from the first moment, so SIGTERM during start-up still ends in
        // an orderly shutdown (detach, unpin) once the agent is up, never a half-set-up exit.
        let shutdown = ShutdownRequest()
        let signals = SignalWatcher(signals: [SIGINT, SIGTERM]) { shutdown.request() }
        defer { signals.cancel() }
        let stderr = FileHandle.standardError
        func fail(_ message: String) -> Int32 {
            stderr.write(Data("flowtagd: error: \(message)\n".utf8))
            return 1
        }
        let programs: KernelPrograms
        let monitor: FlowMonitor
        let metrics: AgentMetrics
        var journal: Journal?
        let table: FlowTable
        var server: APIServer?
        var metricsServer: MetricsServer?
        var lock: AgentLock?
        var relay: StreamRelay?
        let relayRef = RelayReference() // for the capture callout, made before the relay
        let rules: [StreamRule]
        do { rules = try config.stream.kernelRules() } catch {
            stderr.write(Data("flowtagd: error: \(error)\n".utf8))
            return 78 // EX_CONFIG
        }
        do {
            try KernelPrograms.probe()
            guard let cgroup = config.cgroup ?? Cgroup2.mountPoint() else { throw KernelError.noCgroup2 }
            // Validate the cheap things before loading anything.
            _ = try Cgroup2.open(cgroup).closing()
            try BPFFS.check(pinDirectory: config.bpffs)
            // The lock lives beside the API socket (the agent's runtime directory).
            let runtimeDir = config.socket.map { ($0 as NSString).deletingLastPathComponent } ?? "/run/flowtag"
            lock = try AgentLock(pinDirectory: config.bpffs, lockDirectory: runtimeDir.isEmpty ? "/run/flowtag" : runtimeDir)
            if let path = config.journal {
                do {
                    journal = try Journal(path: path, retentionDays: config.journalRetentionDays, maxBytes: config.journalMaxBytes)
                } catch {
                    return fail("cannot open the journal \(path): \(error)")
                }
            }
            if KernelPrograms.hasPins(at: config.bpffs) {
                // The previous agent died; its programs still run. Take them over.
                programs = try KernelPrograms(adoptingPinsAt: config.bpffs)
                stderr.write(Data("flowtagd: resuming the programs pinned at \(config.bpffs)\n".utf8))
            } else {
                try KernelPrograms.checkPinDirectory(config.bpffs)
                programs = try KernelPrograms()
                try programs.attach(cgroup: cgroup)
                try programs.pin(at: config.bpffs)
            }
            let loaded = programs
            metrics = AgentMetrics(lostEvents: { loaded.lostEvents })
            if let journal { metrics.countJournalErrors { journal.writeErrors } }
            table = FlowTable(metrics: metrics, journal: journal)
            monitor = FlowMonitor(programs: programs, udpIdleTimeout: .seconds(config.udpIdleSeconds))
            monitor.seedExistingFlows = programs.attachedCgroup ?? cgroup
            if !rules.isEmpty {
                let r = try StreamRelay(programs: programs, monitor: monitor, rules: rules,
                                        callouts: config.stream.streamCallouts(capture: { c in
                                            // To `watch --payload` clients, and the agent's own output.
                                            if let record = relayRef.value.withLock({ $0 })?.record(flow: c.flow) {
                                                table.publish(FlowEvent(kind: .payload, time: WallTime(bootNanoseconds: BootClock.nowNanoseconds()),
                                                                        record: record,
                                                                        payload: FlowPayload(direction: c.direction.rawValue, offset: c.offset, data: c.data)))
                                            }
                                            guard let format else { return }
                                            writeAll(1, Array((EventLine.payload(c, as: format) + "\n").utf8))
                                        }) + streamCallouts,
                                        poolSize: config.stream.poolSize)
                monitor.relayHandler = { r.handle($0) }
                r.start()
                table.attach(relay: r)
                relayRef.value.withLock { $0 = r }
                metrics.countRelay(r)
                relay = r
            } else {
                // An earlier agent's rules and relayed flows: none selected, those go direct.
                let k = RelayKernel(programs: programs)
                try k.setRules([])
                try k.reset()
            }
            try monitor.start()
            for r in monitor.liveFlowRecords() { table.adopt(r) }
            if let path = config.socket {
                let s = APIServer(table: table, socketPath: path, groupName: config.socketGroup, lostEvents: { loaded.lostEvents })
                try s.start()
                server = s
            }
            if let address = config.metricsAddress {
                let m = MetricsServer()
                try m.start(address: address) { metrics.render(activeFlows: table.activeCount) }
                metricsServer = m
                let host = parseHostPort(address).map { $0.0.contains(":") ? "[\($0.0)]" : $0.0 } ?? address
                stderr.write(Data("flowtagd: metrics on http://\(host):\(m.boundPort ?? 0)/metrics\n".utf8))
            }
        } catch {
            return fail("\(error)")
        }

        // A signal that came during start-up is honoured now (see `shutdown` above).
        shutdown.whenRequested { monitor.stop() }
        // One housekeeping tick a second: journal batches are written, retention is applied
        // every minute, and the heap is trimmed after flows were let go (see HeapTrimmer).
        let heap = HeapTrimmer()
        let tickTask = Task.detached { [journal] in
            var tick = 0
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(1))
                if let journal {
                    journal.flush()
                    if tick % 60 == 0 { _ = try? journal.enforceRetention() }
                }
                heap.tick()
                tick += 1
            }
        }
        // Lines are batched into one write per burst of events (a write per event would
        // cost more than the event), and flushed as soon as no more are waiting.
        var buffer = [UInt8]()
        var iterator = monitor.events.makeAsyncIterator()
        while let event = await iterator.next() {
            table.apply(event)
            if event.kind == .close { heap.released() }
            guard let format else { continue }
            if format == .json {
                EventLine.appendJSON(event, to: &buffer)
            } else {
                buffer.append(contentsOf: EventLine.render(event, as: format).utf8)
            }
            buffer.append(10)
            if buffer.count >= 1 << 16 || monitor.pendingEvents == 0 {
                writeAll(1, buffer)
                buffer.removeAll(keepingCapacity: true)
            }
        }
        writeAll(1, buffer)
        relay?.stop()
        server?.stop()
        metricsServer?.stop()
        tickTask.cancel()
        journal?.flush()
        await table.shutdown()
        let lost = programs.lostEvents
        programs.close()
        if lost > 0 { stderr.write(Data("flowtagd: \(lost) kernel events were lost (ring buffer full)\n".utf8)) }
        withExtendedLifetime(lock) {}
        return 0
    }
}

/// Gives the heap back after a burst of flows ended: their freed rows, batches, records and
/// strings would otherwise stay with malloc (and in RSS) for good.
/// Trimming walks every malloc arena under its lock, so it waits for a quiet second:
/// never in the middle of a burst, or of the answers the API gives right after one.
final class HeapTrimmer: Sendable {
    private let closed = Atomic<Int>(0)
    private let state = Mutex<(seen: Int, trimmedAt: Int)>((0, 0))
    static let burst = 4096

    /// A flow was let go. Only closes count: after a burst of opens there is nothing to
    /// give back, and a trim walks the whole heap holding malloc's lock (API answers wait).
    func released() { closed.add(1, ordering: .relaxed) }

    /// Called once a second.
    func tick() {
        let now = closed.load(ordering: .relaxed)
        let trim = state.withLock { s -> Bool in
            defer { s.seen = now }
            guard now == s.seen, now - s.trimmedAt >= Self.burst else { return false }
            s.trimmedAt = now
            return true
        }
        if trim { ftbpf_heap_trim() }
    }
}

/// A stop request that may come before there is anything to stop.
final class ShutdownRequest: Sendable {
    private let state = Mutex<(requested: Bool, action: (@Sendable () -> Void)?)>((false, nil))

    func request() {
        let action = state.withLock { s -> (@Sendable () -> Void)? in s.requested = true; return s.action }
        action?()
    }

    /// Runs `action` at the request, or now if it came already.
    func whenRequested(_ action: @escaping @Sendable () -> Void) {
        let already = state.withLock { s -> Bool in s.action = action; return s.requested }
        if already { action() }
    }
}

/// The relay, once made, for closures built before it.
final class RelayReference: Sendable {
    let value = Mutex<StreamRelay?>(nil)
}

/// write(2) until everything is out (EINTR and short writes retried).
func writeAll(_ fd: Int32, _ bytes: [UInt8]) {
    var off = 0
    while off < bytes.count {
        let n = bytes[off...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if n < 0 { if errno == EINTR { continue }; return }
        off += n
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
