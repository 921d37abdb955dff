import FlowTagWire
import FlowContext
import FlowTagKernel
import Foundation
import FlowTagCore
import FlowTagRelay
import Logging
import ServiceLifecycle
import Synchronization

/// The agent: load, attach, pin, serve the query API and mirror every flow event into
/// the flow table until SIGINT/SIGTERM, then shut down in WFP's order and detach.
/// With `format` text or json it also prints one line per event (`flowtagd --json`).
public enum AgentRunner {
    /// `streamCallouts` are added to the configured ones (user-written stream callouts:
    /// see docs/stream-relay.md and Examples/). Returns the exit status: 0, 1 for a
    /// start-up error, 78 for a bad setting.
    public static func run(_ config: AgentConfig, streamCallouts: [StreamCallout] = []) async -> Int32 {
        AgentLog.bootstrap(level: config.logLevel)
        // Signals are caught from the first moment, so SIGTERM during start-up still ends in
        // an orderly shutdown (detach, unpin) once the agent is up, never a half-set-up exit.
        let shutdown = ShutdownRequest()
        let signals = SignalWatcher(signals: [SIGINT, SIGTERM]) { shutdown.request() }
        defer { signals.cancel() }
        let agent = Agent(config, extraCallouts: streamCallouts)
        do {
            try agent.configure()
            try agent.acquire()
            try agent.loadAndAttach()
            try agent.startServices()
        } catch {
            agent.undoStart()
            agent.log.error("\(error)")
            return error is ConfigError ? 78 : 1
        }
        await agent.run(until: shutdown)
        agent.log.debug("services stopped; detaching programs")
        agent.detach()
        agent.log.debug("programs detached; exiting")
        return 0
    }
}

extension AgentRunner {
    /// What `flowtagd --check-config` checks: every setting, without touching the kernel.
    public static func check(_ config: AgentConfig) throws(ConfigError) {
        _ = try config.stream.kernelRules()
        if config.socket != nil { _ = try GroupLookup.socketGroup(config) }
    }
}

/// The agent's phases, in order. Each start-up phase validates what it can before the
/// next one attaches anything, and `undoStart` takes back whatever the phases that ran
/// set up (never what a previous agent left for adoption).
final class Agent: @unchecked Sendable {
    let config: AgentConfig
    let extraCallouts: [StreamCallout]
    let log = Logger(label: "flowtagd")
    let format: EventFormat?

    // configure
    private var rules: [StreamRule] = []
    private var cgroup = ""
    private var socketGroup: gid_t?
    // acquire
    private var lock: PinDirectoryLock?
    private var journal: Journal?
    private var metrics: AgentMetrics!
    private var table: FlowTable!
    private var server: APIServer?
    private var metricsServer: MetricsServer?
    private let programsRef = LateBound<KernelPrograms>()
    private let monitorRef = LateBound<FlowMonitor>()
    // load and attach
    private var programs: KernelPrograms?
    private var attachedHere = false
    // services
    private var monitor: FlowMonitor?
    private var relay: StreamRelay?
    private let heap = HeapTrimmer()

    init(_ config: AgentConfig, extraCallouts: [StreamCallout]) {
        self.config = config
        self.extraCallouts = extraCallouts
        format = config.output == "none" ? nil : EventFormat(rawValue: config.output)
    }

    /// Checks every setting and the machine, attaching nothing.
    func configure() throws {
        rules = try config.stream.kernelRules()
        if config.socket != nil {
            socketGroup = try GroupLookup.socketGroup(config)
            if socketGroup == nil {
                log.warning("no group named '\(config.socketGroup)': only root can use the API socket (create it with: groupadd --system \(config.socketGroup))")
            }
        }
        try KernelPrograms.probe()
        guard let cgroup = config.cgroup ?? Cgroup2.mountPoint() else { throw KernelError.noCgroup2 }
        _ = try Cgroup2.open(cgroup).closing()
        self.cgroup = cgroup
        try BPFFS.check(pinDirectory: config.bpffs)
        if let path = config.socket { try APISocketPath.check(path) }
    }

    /// Takes what the agent holds exclusively before loading anything: the pin directory,
    /// the journal, the metrics port and the API socket (bound, not yet published).
    func acquire() throws {
        lock = try PinDirectoryLock(config.bpffs)
        let monitorRef = self.monitorRef
        let release: @Sendable ([CloseReceipt]) -> Void = { monitorRef.value?.release($0) }
        if let path = config.journal {
            do {
                journal = try Journal(path: path, retentionDays: config.journalRetentionDays, maxBytes: config.journalMaxBytes,
                                      release: release)
            } catch let e as Journal.ForeignFile {
                throw e
            } catch {
                throw KernelError.invalidArgument("cannot open the journal \(path): \(String(describing: error).prefix(500))")
            }
        }
        let programsRef = self.programsRef
        let metrics = AgentMetrics(lostEvents: { programsRef.value?.lostEvents ?? 0 })
        if let journal { metrics.countJournal(journal) }
        metrics.countWatchersDropped { [weak self] in self?.table?.droppedWatchers ?? 0 }
        self.metrics = metrics
        let table = FlowTable(metrics: metrics, journal: journal, release: release)
        self.table = table
        if let address = config.metricsAddress {
            let m = MetricsServer()
            metricsServer = m
            try m.start(address: address) { metrics.render(activeFlows: table.activeCount) }
            let host = parseHostPort(address).map { $0.0.contains(":") ? "[\($0.0)]" : $0.0 } ?? address
            log.info("metrics on http://\(host):\(m.boundPort ?? 0)/metrics")
        }
        if let path = config.socket {
            let s = APIServer(table: table, socketPath: path, group: socketGroup,
                              lostEvents: { programsRef.value?.lostEvents ?? 0 })
            server = s
            try s.bind()
        }
    }

    /// Adopts the programs a previous agent of this build left pinned for this cgroup
    /// (it died; they still run), or loads, attaches and pins a fresh copy, replacing
    /// pins of another build or cgroup, or an incomplete set (after journaling the closes
    /// that pins of this build still hold).
    func loadAndAttach() throws {
        let dir = config.bpffs
        if KernelPrograms.hasAnyPins(at: dir) {
            var refusal = KernelPrograms.hasPins(at: dir) ? KernelPrograms.adoptionRefusal(pinsAt: dir, cgroup: cgroup)
                                                          : .incomplete("the set is incomplete (a start that did not finish)")
            if refusal == nil {
                do {
                    let p = try KernelPrograms(adoptingPinsAt: dir)
                    programs = p
                    programsRef.set(p)
                    log.info("resuming the programs pinned at \(dir)")
                    return
                } catch {
                    refusal = .incomplete("they cannot be opened (\(error))")
                }
            }
            guard let refusal else { return }
            if case .olderBuild = refusal { try LegacyAgentLock.refuseIfHeld(pinDirectory: dir, socket: config.socket) }
            if refusal.sameABI { salvageCloses(pinnedAt: dir) }
            log.warning("replacing the programs pinned at \(dir): \(refusal)")
            try KernelPrograms.removePins(at: dir)
        }
        guard lock?.holdsPath == true else { throw KernelError.pin("\(dir) was replaced while this agent held it") }
        let p = try KernelPrograms()
        programs = p
        attachedHere = true
        try p.attach(cgroup: cgroup)
        try p.pin(at: dir)
        programsRef.set(p)
        try FaultPoint.check("after-attach")
    }

    /// Journals the closes that pins about to be replaced still hold (this build's maps).
    private func salvageCloses(pinnedAt dir: String) {
        guard let old = try? KernelPrograms(adoptingPinsAt: dir) else { return }
        defer { old.release() }
        let closes = FlowMonitor.unjournaledCloses(in: old)
        guard !closes.isEmpty else { return }
        if let journal {
            closes.forEach { journal.append($0) }
            journal.flush()
        }
        log.notice("journaled the closes the replaced pins held", metadata: ["closes": "\(closes.count)", "path": "\(dir)"])
    }

    /// Starts reading events (after reporting what a previous agent left unjournaled),
    /// the relay, the journal's writer, and publishes the API socket.
    func startServices() throws {
        guard let programs else { return }
        let monitor = FlowMonitor(programs: programs, udpIdleTimeout: .seconds(config.udpIdleSeconds))
        monitor.seedExistingFlows = programs.attachedCgroup ?? cgroup
        self.monitor = monitor
        monitorRef.set(monitor)
        if !rules.isEmpty { try startRelay(programs: programs) }
        try monitor.start()
        if monitor.recoveredCloses > 0 {
            log.info("reporting the closes a previous agent had not journaled", metadata: ["closes": "\(monitor.recoveredCloses)"])
        }
        for r in monitor.initialLiveRecords { table.adopt(r) }
        reportHealth(programs: programs, monitor: monitor)
        journal?.start()
        try FaultPoint.check("before-publish")
        try server?.publish()
    }

    /// What the kernel, the monitor and the journal recovered from or lost, in /v1/stats
    /// and as metrics.
    private func reportHealth(programs: KernelPrograms, monitor: FlowMonitor) {
        let journal = self.journal
        table.addStatsSource { st in
            let h = monitor.health
            st.kernelEventsLost = programs.lostEvents
            st.kernelFlowsDropped = programs.droppedFlows
            st.eventsDroppedInAgent = h.eventsDroppedInAgent
            st.reconciliations = h.reconciliations
            st.reconciledFlows = h.reconciledFlows
            st.recoveredCloses = h.recoveredCloses
            st.journalRowsDropped = journal?.droppedRows ?? 0
            st.journalRowsWaiting = journal?.pendingRows ?? 0
        }
        metrics.register([
            ReportedValue(metric: "kernel_flows_dropped", unit: "total",
                          help: "Flows the kernel could not track because its flow map was full (closes waiting for a stalled agent fill it).",
                          kind: .counter) { programs.droppedFlows },
            ReportedValue(metric: "agent_events_dropped", unit: "total",
                          help: "Events the agent dropped because its consumer fell behind; a reconcile reports them again.",
                          kind: .counter) { UInt64(monitor.health.eventsDroppedInAgent) },
            ReportedValue(metric: "reconciliations", unit: "total",
                          help: "Reconciliations of the live flows with the kernel's flow map after lost events.",
                          kind: .counter) { UInt64(monitor.health.reconciliations) },
            ReportedValue(metric: "recovered_closes", unit: "total",
                          help: "Closes a previous agent had not journaled, reported at start.",
                          kind: .counter) { UInt64(monitor.health.recoveredCloses) },
            ReportedValue(metric: "outbox_full", unit: "total",
                          help: "Closes the agent made that found the outbox full (not kept across a crash).",
                          kind: .counter) { UInt64(monitor.health.outboxFull) },
        ])
    }

    private func startRelay(programs: KernelPrograms) throws {
        let table = self.table!
        let format = self.format
        let relayRef = LateBound<StreamRelay>() // for the capture callout, made before the relay
        let callouts = config.stream.streamCallouts(capture: { c in
            // One payload event: to `watch --payload` clients, and the agent's own output.
            guard let record = relayRef.value?.record(flow: c.flow) else { return }
            let event = FlowEvent(kind: .payload, time: WallTime(bootNanoseconds: BootClock.nowNanoseconds()), record: record,
                                  payload: FlowPayload(direction: c.direction.rawValue, offset: c.offset, data: c.data))
            table.publish(event)
            guard let format else { return }
            writeAll(1, Array((EventLine.render(event, as: format) + "\n").utf8))
        }) + extraCallouts
        let options = StreamRelay.Options(maxFlows: config.stream.maxFlows, drain: .seconds(config.stream.drainSeconds),
                                          fastPath: config.stream.fastPath)
        let r = try StreamRelay(programs: programs, cgroup: programs.attachedCgroup ?? cgroup, rules: rules, callouts: callouts, options: options)
        try r.start()
        relayRef.set(r)
        table.register(r.reportedValues)
        metrics.register(r.reportedValues)
        relay = r
    }

    /// Takes back what a failed start set up: servers, and programs this start attached.
    /// Adopted programs stay pinned and attached for the next start to adopt.
    func undoStart() {
        relay?.stop()
        monitor?.stop()
        server?.stop()
        metricsServer?.stop()
        _ = journal?.stop()
        if let programs {
            if attachedHere { programs.close() } else { programs.release() }
        }
        lock?.releaseRemovingDirectory()
    }

    /// Runs the services until a stop request (SIGTERM/SIGINT, caught since the first
    /// moment), then shuts them down in the reverse of their order, which is WFP's orderly
    /// unload (see AgentServices): relay, API and watchers, ingest and flow contexts, journal.
    func run(until shutdown: ShutdownRequest) async {
        guard let monitor else { return }
        let journal = self.journal, log = self.log
        var parts: [ServiceGroupConfiguration.ServiceConfiguration] = []
        if let journal {
            parts.append(.agentPart(AgentServices.Stoppable(description: "journal") {
                let left = journal.stop()
                if left > 0 {
                    log.error("journal: \(left) closed flows could not be written before stopping; they are lost",
                              metadata: ["path": "\(journal.path)"])
                }
            }))
        }
        parts.append(.agentPart(AgentServices.Ingest(monitor: monitor, table: table, heap: heap, format: format)))
        if let metricsServer { parts.append(.agentPart(AgentServices.Stoppable(description: "metrics") { metricsServer.stop() })) }
        if let server { parts.append(.agentPart(AgentServices.Stoppable(description: "api") { server.stop() })) }
        if let relay { parts.append(.agentPart(AgentServices.Stoppable(description: "relay") { relay.stop() })) }
        parts.append(.agentPart(AgentServices.Housekeeping(heap: heap)))
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(services: parts, logger: log))
        shutdown.whenRequested { Task { await group.triggerGracefulShutdown() } }
        do { try await group.run() } catch { log.error("a service failed: \(error)") }
    }

    /// After the services stopped: the programs detached and unpinned, the pin directory
    /// (the agent's lock) removed.
    func detach() {
        if let programs {
            let lost = programs.lostEvents
            programs.close()
            if lost > 0 { log.warning("\(lost) kernel events were lost (ring buffer full)") }
        }
        lock?.releaseRemovingDirectory()
    }
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
