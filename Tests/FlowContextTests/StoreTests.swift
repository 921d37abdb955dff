import Foundation
import FlowTagCore
import Synchronization
import Testing
@testable import FlowContext

/// Records callbacks for assertions.
final class Recorder: Sendable {
    let deletes = Mutex<[(FlowHandle, Layer, CalloutID, String)]>([])
    let classifies = Mutex<[(Layer, String?, UInt32, String)]>([])
    var deleteCount: Int { deletes.withLock { $0.count } }
    var deletedContexts: [String] { deletes.withLock { $0.map(\.3) } }
}

struct Fixture {
    let engine = FilterEngine()
    let rec = Recorder()
    let sub = UUID()
    let flow = FlowHandle(cookie: 42, netns: 7)

    init() { engine.addSublayer(Sublayer(key: sub, weight: 10)) }

    var values: IncomingValues {
        IncomingValues(localAddress: IPAddress("10.0.0.1")!, localPort: 40000, remoteAddress: IPAddress("10.0.0.2")!,
                       remotePort: 443, protocol: .tcp, direction: .outbound)
    }
    func metadata(_ f: FlowHandle? = nil) -> Metadata {
        Metadata(flow: f ?? flow, processID: 1234, threadID: 1235, processPath: "/usr/bin/curl", userID: 1000, cgroupID: 99)
    }

    /// A callout with a String context that records every call.
    func callout(flags: CalloutFlags = [], withDelete: Bool = true, action: Action = .continue,
                 key: UUID = UUID(), onClassify: (@Sendable (ClassifyRequest, String?) -> Void)? = nil) -> Callout<String> {
        let rec = self.rec
        let classify: @Sendable (ClassifyRequest, String?) -> Action = { req, ctx in
            rec.classifies.withLock { $0.append((req.layer, ctx, req.metadata.processID, req.metadata.processPath)) }
            onClassify?(req, ctx)
            return action
        }
        let delete: @Sendable (FlowDeletion<String>) -> Void = { d in
            rec.deletes.withLock { $0.append((d.flow, d.layer, d.calloutID, d.context)) }
        }
        return Callout<String>(key: key, flags: flags, classify: classify, flowDelete: withDelete ? delete : nil)
    }

    func register(_ c: Callout<String>) throws -> CalloutID { try engine.register(c).get() }

    @discardableResult
    func filter(_ layer: Layer, _ action: FilterAction, weight: UInt64 = 1, sublayer: UUID? = nil) throws -> UInt64 {
        try engine.addFilter(Filter(layer: layer, sublayer: sublayer ?? sub, weight: weight, action: action)).get()
    }
}

@Suite("WFP flow-context store: the cases of WFP-SEMANTICS.md")
struct StoreCaseTests {
    let stream = Layer.stream(.v4)
    let established = Layer.aleFlowEstablished(.v4)

    @Test("1. associate with an empty context → invalidParameter, nothing stored")
    func case01() throws {
        let f = Fixture()
        let id = try f.register(f.callout())
        #expect(f.engine.associate(flow: f.flow, layer: stream, callout: id, context: String?.none) == .invalidParameter)
        #expect(f.engine.associationCount(flow: f.flow) == 0)
    }

    @Test("2. associate for a callout with no flowDelete → invalidParameter")
    func case02() throws {
        let f = Fixture()
        let id = try f.register(f.callout(withDelete: false))
        #expect(f.engine.associate(flow: f.flow, layer: stream, callout: id, context: "A") == .invalidParameter)
        #expect(f.engine.associationCount(flow: f.flow) == 0)
    }

    @Test("3. associate → success; the stream classify gets A, a flow-established callout gets none")
    func case03() throws {
        let f = Fixture()
        let c = f.callout(), e = f.callout()
        let id = try f.register(c)
        _ = try f.register(e)
        try f.filter(stream, .calloutInspection(c.key))
        try f.filter(established, .calloutInspection(e.key))
        #expect(f.engine.associate(flow: f.flow, layer: stream, callout: id, context: "A") == .success)
        _ = f.engine.classify(layer: stream, values: f.values, metadata: f.metadata())
        _ = f.engine.classify(layer: established, values: f.values, metadata: f.metadata())
        let calls = f.rec.classifies.withLock { $0 }
        #expect(calls.count == 2)
        #expect(calls[0].0 == stream && calls[0].1 == "A")
        #expect(calls[1].0 == established && calls[1].1 == nil)
    }

    @Test("4. associate again → objectNameExists; A stays; flowDelete gets A once, never B")
    func case04() throws {
        let f = Fixture()
        let id = try f.register(f.callout())
        #expect(f.engine.associate(flow: f.flow, layer: stream, callout: id, context: "A") == .success)
        let again = f.engine.associate(flow: f.flow, layer: stream, callout: id, context: "B")
        #expect(again == .objectNameExists)
        #expect(again.isSuccess) // success-class, as in WFP: testing for success alone is not enough
        #expect(f.engine.context(flow: f.flow, layer: stream, callout: id, as: String.self) == "A")
        f.engine.endFlow(f.flow)
        #expect(f.rec.deletedContexts == ["A"])
    }

    @Test("5. two callouts on one flow → both success; teardown gives two flowDeletes with their own layer, callout, context")
    func case05() throws {
        let f = Fixture()
        let a = try f.register(f.callout()), b = try f.register(f.callout())
        #expect(f.engine.associate(flow: f.flow, layer: stream, callout: a, context: "A") == .success)
        #expect(f.engine.associate(flow: f.flow, layer: established, callout: b, context: "B") == .success)
        #expect(f.engine.endFlow(f.flow) == 2)
        let d = f.rec.deletes.withLock { $0 }.sorted { $0.3 < $1.3 }
        #expect(d.count == 2)
        #expect(d[0].1 == stream && d[0].2 == a && d[0].3 == "A")
        #expect(d[1].1 == established && d[1].2 == b && d[1].3 == "B")
    }

    @Test("6. remove with none → unsuccessful, no callback")
    func case06() throws {
        let f = Fixture()
        let id = try f.register(f.callout())
        #expect(f.engine.remove(flow: f.flow, layer: stream, callout: id) == .unsuccessful)
        #expect(f.rec.deleteCount == 0)
    }

    @Test("7. remove outside classify → success, flowDelete done on return; a conditional-on-flow callout is no longer called")
    func case07() throws {
        let f = Fixture()
        let c = f.callout(flags: .conditionalOnFlow)
        let id = try f.register(c)
        try f.filter(stream, .calloutInspection(c.key))
        f.engine.associate(flow: f.flow, layer: stream, callout: id, context: "A")
        _ = f.engine.classify(layer: stream, values: f.values, metadata: f.metadata())
        #expect(f.engine.remove(flow: f.flow, layer: stream, callout: id) == .success)
        #expect(f.rec.deletedContexts == ["A"])
        _ = f.engine.classify(layer: stream, values: f.values, metadata: f.metadata())
        #expect(f.rec.classifies.withLock { $0.count } == 1)
    }

    @Test("8. remove during classify → pending; flowDelete once, after classify returns")
    func case08() throws {
        let f = Fixture()
        let box = Mutex<(FilterEngine?, CalloutID?, Status?, Int?)>((nil, nil, nil, nil))
        let rec = f.rec
        let c = f.callout(onClassify: { req, _ in
            let (engine, id, _, _) = box.withLock { $0 }
            let st = engine!.remove(flow: req.metadata.flow, layer: req.layer, callout: id!)
            let deletesDuring = rec.deleteCount
            box.withLock { $0.2 = st; $0.3 = deletesDuring }
        })
        let id = try f.register(c)
        box.withLock { $0.0 = f.engine; $0.1 = id }
        try f.filter(stream, .calloutInspection(c.key))
        f.engine.associate(flow: f.flow, layer: stream, callout: id, context: "A")
        _ = f.engine.classify(layer: stream, values: f.values, metadata: f.metadata())
        let (_, _, status, during) = box.withLock { $0 }
        #expect(status == .pending)
        #expect(during == 0)
        #expect(f.rec.deletedContexts == ["A"])
        f.engine.endFlow(f.flow)
        #expect(f.rec.deleteCount == 1)
    }

    @Test("9. remove, then associate B → success; teardown delivers B only")
    func case09() throws {
        let f = Fixture()
        let id = try f.register(f.callout())
        f.engine.associate(flow: f.flow, layer: stream, callout: id, context: "A")
        #expect(f.engine.remove(flow: f.flow, layer: stream, callout: id) == .success)
        #expect(f.engine.associate(flow: f.flow, layer: stream, callout: id, context: "B") == .success)
        f.engine.endFlow(f.flow)
        #expect(f.rec.deletedContexts == ["A", "B"])
        #expect(f.rec.deletedContexts.last == "B")
    }

    @Test("10. teardown (also with no classify before it) → one flowDelete per association; remove afterwards → unsuccessful; FIN alone → none")
    func case10() throws {
        let f = Fixture()
        let a = try f.register(f.callout()), b = try f.register(f.callout())
        f.engine.associate(flow: f.flow, layer: stream, callout: a, context: "A")
        f.engine.associate(flow: f.flow, layer: stream, callout: b, context: "B")
        // A FIN is a stream indication, not the end of the flow: the store is untouched.
        #expect(f.rec.deleteCount == 0 && f.engine.associationCount(flow: f.flow) == 2)
        #expect(f.engine.endFlow(f.flow) == 2)
        #expect(Set(f.rec.deletedContexts) == ["A", "B"])
        #expect(f.engine.remove(flow: f.flow, layer: stream, callout: a) == .unsuccessful)
        #expect(f.engine.endFlow(f.flow) == 0)
        #expect(f.rec.deleteCount == 2)
    }

    @Test("11. a conditional-on-flow callout behind an unconditioned filter is not called for flows without its context")
    func case11() throws {
        let f = Fixture()
        let c = f.callout(flags: .conditionalOnFlow)
        let id = try f.register(c)
        try f.filter(stream, .calloutInspection(c.key))
        let other = FlowHandle(cookie: 43, netns: 7)
        f.engine.associate(flow: f.flow, layer: stream, callout: id, context: "A")
        _ = f.engine.classify(layer: stream, values: f.values, metadata: f.metadata(other))
        #expect(f.rec.classifies.withLock { $0.count } == 0)
        _ = f.engine.classify(layer: stream, values: f.values, metadata: f.metadata())
        #expect(f.rec.classifies.withLock { $0.count } == 1)
    }

    @Test("12. same key twice → alreadyExists; different keys → different nonzero ids")
    func case12() throws {
        let f = Fixture()
        let key = UUID()
        let first = try f.register(f.callout(key: key))
        #expect(f.engine.register(f.callout(key: key)) == .failure(.alreadyExists))
        let second = try f.register(f.callout())
        #expect(first != second && first.rawValue != 0 && second.rawValue != 0)
    }

    @Test("13. unregister with a live context → deviceBusy, intact; remove, unregister → success; again → calloutNotFound")
    func case13() throws {
        let f = Fixture()
        let c = f.callout()
        let id = try f.register(c)
        f.engine.associate(flow: f.flow, layer: stream, callout: id, context: "A")
        #expect(f.engine.unregister(key: c.key) == .deviceBusy)
        #expect(f.engine.context(flow: f.flow, layer: stream, callout: id, as: String.self) == "A")
        #expect(f.engine.isRegistered(key: c.key))
        #expect(f.engine.remove(flow: f.flow, layer: stream, callout: id) == .success)
        #expect(f.engine.unregister(key: c.key) == .success)
        #expect(f.engine.unregister(key: c.key) == .calloutNotFound)
    }

    @Test("14. callout unregistered: a terminating filter blocks, an inspection filter is skipped")
    func case14() throws {
        let f = Fixture()
        let ghost = UUID()
        let inspection = try f.filter(stream, .calloutInspection(ghost), weight: 2)
        var out = f.engine.classify(layer: stream, values: f.values, metadata: f.metadata())
        #expect(out.action == .permit && !out.invokedFilters.contains(inspection))
        let terminating = try f.filter(stream, .calloutTerminating(ghost), weight: 1)
        out = f.engine.classify(layer: stream, values: f.values, metadata: f.metadata())
        #expect(out.action == .block && out.decidingFilter == terminating)
        f.engine.deleteFilter(id: terminating)
        _ = try f.filter(stream, .calloutUnknown(ghost), weight: 1)
        #expect(f.engine.classify(layer: stream, values: f.values, metadata: f.metadata()).action == .block)
    }

    @Test("15. notify: an error on add stops the add; delete happens whatever notify returns")
    func case15() throws {
        let f = Fixture()
        let notified = Mutex<[NotifyKind]>([])
        var c = f.callout(action: .block)
        c.notify = { kind, _ in
            let n = notified.withLock { $0.append(kind); return $0.count }
            switch kind {
            case .addFilter: return n == 1 ? .invalidParameter : .success
            case .deleteFilter: return .unsuccessful
            }
        }
        _ = try f.register(c)
        #expect(f.engine.addFilter(Filter(layer: stream, sublayer: f.sub, action: .calloutTerminating(c.key))) == .failure(.invalidParameter))
        #expect(f.engine.classify(layer: stream, values: f.values, metadata: f.metadata()).action == .permit)
        let id = try f.filter(stream, .calloutTerminating(c.key))
        #expect(f.engine.classify(layer: stream, values: f.values, metadata: f.metadata()).action == .block)
        #expect(f.engine.deleteFilter(id: id) == .success) // notify said unsuccessful: deleted anyway
        #expect(f.engine.classify(layer: stream, values: f.values, metadata: f.metadata()).action == .permit)
        #expect(notified.withLock { $0 } == [.addFilter, .addFilter, .deleteFilter])
    }

    @Test("16. process id and path at flow-established, stream and transport layers; the flow handle is equal across them")
    func case16() throws {
        let f = Fixture()
        let seen = Mutex<[(Layer, UInt32, String, FlowHandle)]>([])
        for layer in [established, stream, Layer.outboundTransport(.v4), Layer.inboundTransport(.v4)] {
            let c = Callout<String>(key: UUID(), classify: { req, _ in
                seen.withLock { $0.append((req.layer, req.metadata.processID, req.metadata.processPath, req.metadata.flow)) }
                return .continue
            }, flowDelete: { _ in })
            _ = try f.register(c)
            try f.filter(layer, .calloutInspection(c.key))
            _ = f.engine.classify(layer: layer, values: f.values, metadata: f.metadata())
        }
        let s = seen.withLock { $0 }
        #expect(s.count == 4)
        #expect(s.allSatisfy { $0.1 == 1234 && $0.2 == "/usr/bin/curl" && $0.3 == f.flow })
    }
}

@Suite("WFP store: beyond the numbered cases")
struct StoreRuleTests {
    let stream = Layer.stream(.v4)

    @Test("re-authorisation at flow-established must not associate twice")
    func reauthorisation() throws {
        let f = Fixture()
        let streamCallout = f.callout(flags: .conditionalOnFlow)
        let streamID = try f.register(streamCallout)
        let engine = f.engine
        let statuses = Mutex<[Status]>([])
        let est = Callout<String>(key: UUID(), classify: { req, _ in
            let st = engine.associate(flow: req.metadata.flow, layer: .stream(.v4), callout: streamID, context: "ctx")
            statuses.withLock { $0.append(st) }
            return .continue
        }, flowDelete: { _ in })
        _ = try f.register(est)
        try f.filter(.aleFlowEstablished(.v4), .calloutInspection(est.key))
        for _ in 0..<3 { _ = engine.classify(layer: .aleFlowEstablished(.v4), values: f.values, metadata: f.metadata()) }
        #expect(statuses.withLock { $0 } == [.success, .objectNameExists, .objectNameExists])
        #expect(engine.associationCount(flow: f.flow) == 1)
        engine.endFlow(f.flow)
        #expect(f.rec.deletedContexts == ["ctx"])
    }

    @Test("a context of another type than the callout's is refused")
    func wrongContextType() throws {
        let f = Fixture()
        let id = try f.register(f.callout())
        #expect(f.engine.associate(flow: f.flow, layer: stream, callout: id, context: 17) == .invalidParameter)
        #expect(f.engine.associate(flow: f.flow, layer: stream, callout: CalloutID(rawValue: 999), context: "x") == .calloutNotFound)
    }

    @Test("sublayers run by weight; a block in any sublayer wins; filters match on conditions")
    func arbitration() throws {
        let f = Fixture()
        let low = UUID()
        f.engine.addSublayer(Sublayer(key: low, weight: 1))
        let permitHigh = try f.engine.addFilter(Filter(layer: stream, sublayer: f.sub, weight: 5, action: .permit)).get()
        #expect(f.engine.classify(layer: stream, values: f.values, metadata: f.metadata()).decidingFilter == permitHigh)
        let blockLow = try f.engine.addFilter(Filter(layer: stream, sublayer: low, weight: 1,
                                                     conditions: [.remotePort(400...500), .processPath("/usr/bin/curl"),
                                                                  .remoteAddress(IPPrefix("10.0.0.0/8")!)],
                                                     action: .block)).get()
        let out = f.engine.classify(layer: stream, values: f.values, metadata: f.metadata())
        #expect(out.action == .block && out.decidingFilter == blockLow)
        var other = f.values
        other.remotePort = 80
        #expect(f.engine.classify(layer: stream, values: other, metadata: f.metadata()).action == .permit)
    }

    @Test("an inspection callout cannot permit or block; a terminating one can")
    func inspectionCannotDecide() throws {
        let f = Fixture()
        let blocker = f.callout(action: .block)
        _ = try f.register(blocker)
        try f.filter(stream, .calloutInspection(blocker.key))
        #expect(f.engine.classify(layer: stream, values: f.values, metadata: f.metadata()).action == .permit)
        let blocker2 = f.callout(action: .block)
        _ = try f.register(blocker2)
        try f.filter(stream, .calloutTerminating(blocker2.key), weight: 0)
        #expect(f.engine.classify(layer: stream, values: f.values, metadata: f.metadata()).action == .block)
    }

    @Test("orderly unload: every flowDelete runs, nothing is left, every callout is unregistered")
    func orderlyUnload() async throws {
        let f = Fixture()
        let a = try f.register(f.callout()), b = try f.register(f.callout())
        for i in 0..<100 {
            let flow = FlowHandle(cookie: UInt64(i))
            f.engine.associate(flow: flow, layer: stream, callout: a, context: "a\(i)")
            f.engine.associate(flow: flow, layer: .aleFlowEstablished(.v6), callout: b, context: "b\(i)")
        }
        let report = await f.engine.unload()
        #expect(report.flowDeletes == 200 && report.calloutsUnregistered == 2)
        #expect(f.rec.deleteCount == 200)
        #expect(f.engine.totalAssociations == 0)
        #expect(f.engine.associate(flow: f.flow, layer: stream, callout: a, context: "late") != .success)
    }

    @Test("concurrent associate, classify and remove on many flows: each association ends in exactly one flowDelete")
    func concurrency() async throws {
        let f = Fixture()
        let c = f.callout(flags: .conditionalOnFlow)
        let id = try f.register(c)
        try f.filter(stream, .calloutInspection(c.key))
        let engine = f.engine
        let values = f.values
        let fx = f
        await withTaskGroup(of: Void.self) { group in
            for t in 0..<4 {
                group.addTask {
                    for i in 0..<2000 {
                        let flow = FlowHandle(cookie: UInt64(i % 64))
                        switch (i + t) % 3 {
                        case 0: engine.associate(flow: flow, layer: .stream(.v4), callout: id, context: "\(t)-\(i)")
                        case 1: _ = engine.classify(layer: .stream(.v4), values: values, metadata: fx.metadata(flow))
                        default: engine.remove(flow: flow, layer: .stream(.v4), callout: id)
                        }
                    }
                }
            }
        }
        for i in 0..<64 { engine.endFlow(FlowHandle(cookie: UInt64(i))) }
        #expect(engine.totalAssociations == 0)
        #expect(engine.unregister(key: c.key) == .success)
        // Every context that was stored was deleted once: no duplicates among deletions.
        let deleted = f.rec.deletedContexts
        #expect(Set(deleted).count == deleted.count)
    }
}
