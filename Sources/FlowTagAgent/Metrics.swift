import FlowTagWire
import FlowTagKernel
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import Synchronization

/// The agent's Prometheus metrics: base units, `_total` counters, no per-flow or per-PID
/// labels (only small fixed label sets: direction, attribution source).
public final class AgentMetrics: Sendable {
    public let registry = PrometheusCollectorRegistry()
    let activeFlows: Gauge
    let opened: Counter
    let closed: Counter
    let bytesSent: Counter
    let bytesReceived: Counter
    let lost: Counter
    let lostSeen = Mutex<Int64>(0)
    let attribution: [Attribution: Counter]
    let classifyDuration: DurationHistogram
    let journalErrors: Counter
    let lostSource: @Sendable () -> UInt64
    let journalErrorsSeen = Mutex<Int64>(0)
    let journalErrorSource = Mutex<(@Sendable () -> Int)?>(nil)

    /// Counters whose totals live elsewhere (the stream relay), mirrored at each scrape.
    final class Mirrored: Sendable {
        let counter: Counter
        let seen = Mutex<Int64>(0)
        let source: @Sendable () -> UInt64
        init(_ counter: Counter, _ source: @escaping @Sendable () -> UInt64) { self.counter = counter; self.source = source }
    }
    let mirrored = Mutex<[Mirrored]>([])
    let gauges = Mutex<[(Gauge, @Sendable () -> Double)]>([])

    /// Registers values kept elsewhere (an optional part's, the kernel's): counters are
    /// mirrored, gauges set, at each scrape.
    public func register(_ values: [ReportedValue]) {
        for v in values {
            let name = Self.name(v.metric, v.unit, v.help)
            switch v.kind {
            case .counter:
                let c = registry.makeCounter(descriptor: name, labels: v.labels)
                mirrored.withLock { $0.append(Mirrored(c, v.value)) }
            case .gauge:
                let g = registry.makeGauge(descriptor: name, labels: v.labels)
                gauges.withLock { $0.append((g, { Double(v.value()) })) }
            }
        }
    }

    /// Where journal write errors are counted (set once the journal is open).
    public func countJournalErrors(_ source: @escaping @Sendable () -> Int) { journalErrorSource.withLock { $0 = source } }

    /// The journal's counters: write errors, rows dropped, rows waiting.
    public func countJournal(_ journal: Journal) {
        countJournalErrors { journal.writeErrors }
        let dropped = Mirrored(registry.makeCounter(descriptor: Self.name("journal_rows_dropped", "total",
                                    "Closed flows dropped unjournaled because the journal could not be written for too long.")),
                               { UInt64(journal.droppedRows) })
        mirrored.withLock { $0.append(dropped) }
        let waiting = registry.makeGauge(descriptor: Self.name("journal_rows_waiting", "", "Closed flows waiting to be written to the journal."))
        gauges.withLock { $0.append((waiting, { Double(journal.pendingRows) })) }
    }

    /// Watchers dropped for reading too slowly.
    public func countWatchersDropped(_ source: @escaping @Sendable () -> Int) {
        let m = Mirrored(registry.makeCounter(descriptor: Self.name("watchers_dropped", "total",
                            "Watch clients dropped because they read too slowly (their backlog passed its budget).")),
                         { UInt64(source()) })
        mirrored.withLock { $0.append(m) }
    }

    static func name(_ metric: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "flowtag", metricName: metric, unitName: unit, helpText: help)
    }

    public init(lostEvents: @escaping @Sendable () -> UInt64) {
        activeFlows = registry.makeGauge(descriptor: Self.name("active_flows", "", "Flows open now."))
        opened = registry.makeCounter(descriptor: Self.name("flows_opened", "total", "Flows opened."))
        closed = registry.makeCounter(descriptor: Self.name("flows_closed", "total", "Flows closed."))
        let bytes = Self.name("flow_bytes", "total", "Payload bytes of closed flows, by direction.")
        bytesSent = registry.makeCounter(descriptor: bytes, labels: [("direction", "sent")])
        bytesReceived = registry.makeCounter(descriptor: bytes, labels: [("direction", "received")])
        lost = registry.makeCounter(descriptor: Self.name("kernel_events_lost", "total",
                                                          "Events the kernel could not deliver (ring buffer full)."))
        let attr = Self.name("attributions", "total", "Flows opened, by how their owner was learned.")
        var byAttr: [Attribution: Counter] = [:]
        for a in Attribution.allCases { byAttr[a] = registry.makeCounter(descriptor: attr, labels: [("source", a.rawValue)]) }
        attribution = byAttr
        classifyDuration = registry.makeDurationHistogram(
            descriptor: Self.name("classify_duration", "seconds", "Time to classify one flow event in the FlowContext engine."),
            buckets: [.nanoseconds(500), .microseconds(1), .microseconds(2), .microseconds(5), .microseconds(10),
                      .microseconds(50), .microseconds(100), .milliseconds(1)])
        journalErrors = registry.makeCounter(descriptor: Self.name("journal_write_errors", "total", "Failed journal writes."))
        let info = registry.makeGauge(descriptor: Self.name("build_info", "", "Build information."), labels: [("version", flowtagVersion)])
        info.set(to: 1)
        lostSource = lostEvents
    }

    func flowOpened(_ r: FlowRecord) {
        opened.increment()
        attribution[r.attribution]?.increment()
    }

    func flowClosed(_ r: FlowRecord) {
        closed.increment()
        bytesSent.increment(by: Int64(clamping: r.bytesSent))
        bytesReceived.increment(by: Int64(clamping: r.bytesReceived))
    }

    /// Brings a Prometheus counter up to a monotonic count kept elsewhere (the kernel's,
    /// the journal's): increments by what `seen` has not counted yet.
    static func mirror(_ total: Int64, into counter: Counter, seen: borrowing Mutex<Int64>) {
        let delta = seen.withLock { s -> Int64 in defer { s = max(s, total) }; return max(0, total - s) }
        if delta > 0 { counter.increment(by: delta) }
    }

    /// The exposition text (version 0.0.4).
    public func render(activeFlows active: Int) -> String {
        activeFlows.set(to: Double(active))
        let now = lostSource()
        Self.mirror(Int64(clamping: now), into: lost, seen: lostSeen)
        if let errs = journalErrorSource.withLock({ $0 })?() {
            Self.mirror(Int64(errs), into: journalErrors, seen: journalErrorsSeen)
        }
        for m in mirrored.withLock({ $0 }) { Self.mirror(Int64(clamping: m.source()), into: m.counter, seen: m.seen) }
        for (g, value) in gauges.withLock({ $0 }) { g.set(to: value()) }
        var buffer = [UInt8]()
        registry.emit(into: &buffer)
        return String(decoding: buffer, as: UTF8.self)
    }
}

/// Serves `GET /metrics` on a TCP address.
public final class MetricsServer: @unchecked Sendable {
    private let elg = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private var channel: Channel?
    public private(set) var boundPort: Int?

    public init() {}

    /// `host:port`, e.g. 127.0.0.1:9742; port 0 picks a free one (see `boundPort`).
    public func start(address: String, render: @escaping @Sendable () -> String) throws {
        guard let (host, port) = parseHostPort(address) else {
            throw KernelError.system("bad metrics address '\(address)' (want HOST:PORT)", EINVAL)
        }
        let bootstrap = ServerBootstrap(group: elg)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.pipeline.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: .seconds(10)))
                    try channel.pipeline.syncOperations.addHandler(MetricsHandler(render: render))
                }
            }
        do {
            channel = try bootstrap.bind(host: host, port: port).wait()
        } catch {
            try? elg.syncShutdownGracefully()
            let reason = (error as? IOError).map { String(cString: strerror($0.errnoCode)) } ?? "\(error)"
            throw KernelError.invalidArgument("cannot serve metrics on \(address): \(reason)\(reason.contains("in use") ? " (another program has the port: pick another with --metrics-address)" : "")")
        }
        boundPort = channel?.localAddress?.port
    }

    public func stop() {
        try? channel?.close().wait()
        try? elg.syncShutdownGracefully()
    }
}

final class MetricsHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let render: @Sendable () -> String
    var head: HTTPRequestHead?

    init(render: @escaping @Sendable () -> String) { self.render = render }

    /// Unparsable input was answered 400 by NIO's error handler: close at once.
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent { context.close(promise: nil); return }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            head = nil
            let ok = h.method == .GET && h.uri.split(separator: "?").first == "/metrics"
            let body = ok ? render() : "not found: GET /metrics\n"
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: ok ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain")
            headers.add(name: "Content-Length", value: "\(body.utf8.count)")
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: ok ? .ok : .notFound, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            let keep = h.isKeepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in if !keep { context.close(promise: nil) } }
        }
    }
}
