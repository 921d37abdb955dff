import Foundation
import FlowTagCore
import Synchronization
import Testing
import SeededRandom
@testable import FlowContext

/// A port of the behaviour of Microsoft's stmedit sample: two callout pairs, each a
/// flow-established inspection callout that associates a stream context and a
/// conditional-on-flow stream callout. "rainy"→"cloudy" out-of-band at the higher
/// sublayer weight, "cloudy"→"sunny" inline at the lower, in both directions.
final class StmeditPort: @unchecked Sendable {
    /// The out-of-band editor's per-flow context: bytes it took and has not injected yet.
    final class OOBContext: Sendable {
        let pending = Mutex<[StreamDirection: [UInt8]]>([:])
    }
    final class InlineContext: Sendable {}

    let engine = FilterEngine()
    let oobKey = UUID(), inlineKey = UUID(), oobEstKey = UUID(), inlineEstKey = UUID()
    var oobID: CalloutID!, inlineID: CalloutID!
    let flow = FlowHandle(cookie: 7, netns: 1)
    var session: StreamSession!
    let sink = BufferSink()

    init() throws {
        let engine = self.engine
        // Stream callouts registered with the engine (their contexts live there).
        oobID = try engine.register(Callout<OOBContext>(key: oobKey, flags: .conditionalOnFlow,
                                                        classify: { _, _ in .continue }, flowDelete: { _ in })).get()
        inlineID = try engine.register(Callout<InlineContext>(key: inlineKey, flags: .conditionalOnFlow,
                                                              classify: { _, _ in .continue }, flowDelete: { _ in })).get()
        let oobID = self.oobID!, inlineID = self.inlineID!
        // Flow-established inspection callouts associate the stream contexts (once).
        _ = try engine.register(Callout<String>(key: oobEstKey, classify: { req, _ in
            engine.associate(flow: req.metadata.flow, layer: .stream(.v4), callout: oobID, context: OOBContext())
            return .continue
        }, flowDelete: { _ in })).get()
        _ = try engine.register(Callout<String>(key: inlineEstKey, classify: { req, _ in
            engine.associate(flow: req.metadata.flow, layer: .stream(.v4), callout: inlineID, context: InlineContext())
            return .continue
        }, flowDelete: { _ in })).get()
        let sub = UUID()
        engine.addSublayer(Sublayer(key: sub, weight: 1))
        _ = try engine.addFilter(Filter(layer: .aleFlowEstablished(.v4), sublayer: sub, action: .calloutInspection(oobEstKey))).get()
        _ = try engine.addFilter(Filter(layer: .aleFlowEstablished(.v4), sublayer: sub, action: .calloutInspection(inlineEstKey))).get()

        let meta = Metadata(flow: flow, processID: 777, processPath: "/usr/bin/weather")
        let values = IncomingValues(localAddress: IPAddress("127.0.0.1")!, localPort: 5000, remoteAddress: IPAddress("127.0.0.1")!,
                                    remotePort: 80, protocol: .tcp, direction: .outbound)
        _ = engine.classify(layer: .aleFlowEstablished(.v4), values: values, metadata: meta)
        _ = engine.classify(layer: .aleFlowEstablished(.v4), values: values, metadata: meta) // re-authorisation

        let flow = self.flow
        let oob = StreamCallout(name: "rainy->cloudy", weight: 20,
                                appliesTo: { engine.context(flow: $0, layer: .stream(.v4), callout: oobID, as: OOBContext.self) != nil }) { ind, inj in
            let ctx = engine.context(flow: ind.flow, layer: .stream(.v4), callout: oobID, as: OOBContext.self)!
            ctx.pending.withLock { $0[ind.direction, default: []].append(contentsOf: ind.data) }
            if ind.flags.contains(.disconnect) {
                // Before the FIN moves on, the out-of-band editor hands over what it holds.
                StmeditPort.flush(ctx, inj, ind.direction, final: true)
                return .permit
            }
            return .block
        }
        let inline = StreamCallout(name: "cloudy->sunny", weight: 10,
                                   appliesTo: { engine.context(flow: $0, layer: .stream(.v4), callout: inlineID, as: InlineContext.self) != nil }) { ind, inj in
            StreamEdits.inline(ind, inj, pattern: Array("cloudy".utf8), replacement: Array("sunny".utf8))
        }
        session = StreamSession(flow: flow, metadata: meta, callouts: [inline, oob], sink: sink)
    }

    /// The out-of-band worker: replaces and injects what is safe (a possible pattern start
    /// at the end is kept back until more data or the FIN).
    static func flush(_ ctx: OOBContext, _ inj: StreamInjector, _ d: StreamDirection, final: Bool) {
        let out: [UInt8] = ctx.pending.withLock { p in
            let buf = p[d] ?? []
            let keep = final ? 0 : StreamEdits.partialSuffix(buf, Array("rainy".utf8))
            p[d] = Array(buf.suffix(keep))
            return StreamEdits.replaceAll(Array(buf.dropLast(keep)), Array("rainy".utf8), Array("cloudy".utf8))
        }
        if !out.isEmpty { inj.inject(flags: .direction(d), data: out, completion: noCompletion) }
    }

    func runOutOfBandWorker() {
        let ctx = engine.context(flow: flow, layer: .stream(.v4), callout: oobID, as: OOBContext.self)!
        let inj = session.injector(for: "rainy->cloudy")!
        for d in StreamDirection.allCases { Self.flush(ctx, inj, d, final: false) }
    }

    func send(_ s: String, _ d: StreamDirection = .send) {
        session.indicate(Array(s.utf8), direction: d)
        runOutOfBandWorker()
    }
}

@Suite("stmedit port")
struct StmeditPortTests {
    @Test("re-authorisation associates each stream context once")
    func contextsOnce() throws {
        let p = try StmeditPort()
        #expect(p.engine.associationCount(flow: p.flow) == 2)
    }

    @Test("rainy → cloudy → sunny in both directions, patterns split across indications", arguments: StreamDirection.allCases)
    func chainedEdits(direction: StreamDirection) throws {
        let p = try StmeditPort()
        p.send("It is rai", direction)
        p.send("ny today, and clou", direction)
        p.send("dy tomorrow; r", direction)
        p.send("ainy", direction)
        p.session.indicate([], direction: direction, flags: .disconnect)
        let out = direction == .send ? p.sink.sent : p.sink.received
        #expect(out == "It is sunny today, and sunny tomorrow; sunny")
        #expect(p.sink.fins == [direction])
    }

    @Test("a pattern split at every position")
    func everySplit() throws {
        let text = "before rainy middle cloudy after"
        for cut in 1..<text.count {
            let p = try StmeditPort()
            p.send(String(text.prefix(cut)))
            p.send(String(text.dropFirst(cut)))
            p.session.indicate([], direction: .send, flags: .disconnect)
            #expect(p.sink.sent == "before sunny middle sunny after", "cut at \(cut)")
        }
    }

    @Test("1 MB with no pattern passes byte-exact, then the FIN")
    func megabyte() throws {
        let p = try StmeditPort()
        var rng = SeededGenerator(seed: 99)
        // Letters without 'y' cannot form either pattern.
        let alphabet = Array("abcdefghijklmnopqrstuvwxz ".utf8)
        let input = (0..<(1 << 20)).map { _ in alphabet[Int.random(in: 0..<alphabet.count, using: &rng)] }
        var off = 0
        while off < input.count {
            let n = min(Int.random(in: 1...65536, using: &rng), input.count - off)
            p.session.indicate(Array(input[off..<off + n]), direction: .receive)
            p.runOutOfBandWorker()
            off += n
        }
        p.session.indicate([], direction: .receive, flags: .disconnect)
        #expect(p.sink.receivedBytes == input)
        #expect(p.sink.fins == [.receive])
    }

    @Test("teardown: both stream contexts get their flowDelete; the engine unloads clean")
    func teardown() async throws {
        let p = try StmeditPort()
        p.send("rainy")
        #expect(p.engine.endFlow(p.flow) == 2)
        let report = await p.engine.unload()
        #expect(report.calloutsUnregistered == 4)
        #expect(p.engine.totalAssociations == 0)
    }
}
