import Foundation
import FlowTagCore
import Synchronization
import Testing
import SeededRandom
@testable import FlowContext

/// A sink that keeps what it is given.
final class BufferSink: StreamSink, @unchecked Sendable {
    private let state = Mutex<(send: [UInt8], receive: [UInt8], fins: [StreamDirection], aborts: Int)>(([], [], [], 0))
    func deliver(_ bytes: [UInt8], direction: StreamDirection) {
        state.withLock { direction == .send ? $0.send.append(contentsOf: bytes) : $0.receive.append(contentsOf: bytes) }
    }
    func disconnect(direction: StreamDirection) { state.withLock { $0.fins.append(direction) } }
    func abort() { state.withLock { $0.aborts += 1 } }
    var sent: String { String(decoding: state.withLock { $0.send }, as: UTF8.self) }
    var received: String { String(decoding: state.withLock { $0.receive }, as: UTF8.self) }
    var sentBytes: [UInt8] { state.withLock { $0.send } }
    var receivedBytes: [UInt8] { state.withLock { $0.receive } }
    var fins: [StreamDirection] { state.withLock { $0.fins } }
    var aborts: Int { state.withLock { $0.aborts } }
}

/// Indications a callout saw, for assertions.
final class Seen: Sendable {
    let items = Mutex<[(String, StreamFlags, UInt32)]>([])
    func add(_ i: StreamIndication) {
        items.withLock { $0.append((String(decoding: i.data, as: UTF8.self), i.flags, i.metadata.processID)) }
    }
    var texts: [String] { items.withLock { $0.map(\.0) } }
    var all: [(String, StreamFlags, UInt32)] { items.withLock { $0 } }
}

func session(_ callouts: [StreamCallout], sink: BufferSink, limit: Int = 8 << 20) -> StreamSession {
    StreamSession(flow: FlowHandle(cookie: 1), metadata: Metadata(flow: FlowHandle(cookie: 1), processID: 4242, processPath: "/usr/bin/curl"),
                  callouts: callouts, sink: sink, bufferLimit: limit)
}

func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }
let noCompletion: @Sendable (Status) -> Void = { _ in }

@Suite("Stream callouts: the cases of WFP-SEMANTICS.md")
struct StreamCaseTests {
    @Test("17. permit with countBytesEnforced 2 on AAcloudyBB → AA delivered, cloudyBB indicated again at once")
    func case17() {
        let sink = BufferSink(), seen = Seen()
        let first = Mutex(true)
        let c = StreamCallout(name: "c", weight: 1) { ind, _ in
            seen.add(ind)
            return first.withLock { f in defer { f = false }; return f } ? .permit(2) : .needMoreData(100)
        }
        let s = session([c], sink: sink)
        s.indicate(bytes("AAcloudyBB"), direction: .send)
        #expect(sink.sent == "AA")
        #expect(seen.texts == ["AAcloudyBB", "cloudyBB"])
    }

    @Test("18. inline replace → the peer reads AAsunnyBB; the injector never sees sunny; a lower-weight callout does")
    func case18() {
        let sink = BufferSink(), injectorSeen = Seen(), lowerSeen = Seen()
        let editor = StreamCallout(name: "edit", weight: 2) { ind, inj in
            injectorSeen.add(ind)
            let text = String(decoding: ind.data, as: UTF8.self)
            guard let r = text.range(of: "cloudy") else { return .permit }
            let offset = text.utf8.distance(from: text.startIndex, to: r.lowerBound)
            if offset > 0 { return .permit(offset) }
            inj.inject(flags: .send, data: bytes("sunny"), completion: noCompletion)
            return .block(6)
        }
        let lower = StreamCallout(name: "lower", weight: 1) { ind, _ in lowerSeen.add(ind); return .permit }
        let s = session([lower, editor], sink: sink)
        s.indicate(bytes("AAcloudyBB"), direction: .send)
        #expect(sink.sent == "AAsunnyBB")
        #expect(!injectorSeen.texts.contains { $0.contains("sunny") })
        #expect(lowerSeen.texts.joined().contains("sunny"))
    }

    @Test("19. needMoreData(6) on 3 bytes → nothing delivered; next indication has the old 3 plus the new from offset 0; FIN has noMoreData")
    func case19() {
        let sink = BufferSink(), seen = Seen()
        let c = StreamCallout(name: "c", weight: 1) { ind, _ in
            seen.add(ind)
            if ind.data.count < 6 && !ind.flags.contains(.noMoreData) { return .needMoreData(6) }
            return .permit
        }
        let s = session([c], sink: sink)
        s.indicate(bytes("abc"), direction: .receive)
        #expect(sink.received == "")
        s.indicate(bytes("defgh"), direction: .receive)
        #expect(seen.texts == ["abc", "abcdefgh"])
        #expect(sink.received == "abcdefgh")
        s.indicate(bytes("xy"), direction: .receive)
        s.indicate([], direction: .receive, flags: .disconnect)
        let last = seen.all
        #expect(last[2].0 == "xy" && !last[2].1.contains(.noMoreData))
        #expect(last.last!.0 == "" && last.last!.1.contains(.noMoreData) && last.last!.1.contains(.disconnect))
        #expect(sink.received == "abcdefghxy" && sink.fins == [.receive])
    }

    @Test("20. dropConnection under a terminating filter drops the flow; under an inspection filter it is ignored")
    func case20() {
        for terminating in [true, false] {
            let sink = BufferSink()
            let c = StreamCallout(name: "c", weight: 1, isTerminating: terminating) { _, _ in StreamDecision(.permit, .dropConnection) }
            let s = session([c], sink: sink)
            s.indicate(bytes("hello"), direction: .send)
            s.indicate(bytes("more"), direction: .send)
            if terminating {
                #expect(sink.aborts == 1 && sink.sent == "")
            } else {
                #expect(sink.aborts == 0 && sink.sent == "hellomore")
            }
        }
    }

    @Test("21. block everything, then 3 injections from another task → call order, one completion each; a failed inject gets none")
    func case21() async {
        let sink = BufferSink()
        let c = StreamCallout(name: "oob", weight: 1) { _, _ in .block }
        let s = session([c], sink: sink)
        s.indicate(bytes("original"), direction: .send)
        #expect(sink.sent == "")
        let completions = Mutex<[String]>([])
        let inj = s.injector(for: "oob")!
        // Injected from another task; its statuses are checked here, in the test's own task
        // (an expectation inside a detached task reports to no test).
        let statuses = await Task.detached { () -> [Status] in
            var out: [Status] = []
            for part in ["one ", "two ", "three"] {
                out.append(inj.inject(flags: .send, data: bytes(part), completion: { _ in completions.withLock { $0.append(part) } }))
            }
            out.append(inj.inject(flags: [.disconnect], data: bytes("x"), completion: { _ in completions.withLock { $0.append("failed") } }))
            return out
        }.value
        #expect(statuses == [.success, .success, .success, .invalidParameter])
        #expect(sink.sent == "one two three")
        #expect(completions.withLock { $0 } == ["one ", "two ", "three"])
    }

    @Test("22. inject checks: disconnect without direction, no completion, empty bytes with send+disconnect")
    func case22() {
        let sink = BufferSink()
        let s = session([StreamCallout(name: "c", weight: 1) { _, _ in .permit }], sink: sink)
        let inj = s.injector(for: "c")!
        let called = Mutex(0)
        #expect(inj.inject(flags: .disconnect, data: [], completion: nil) == .invalidParameter)
        #expect(inj.inject(flags: .send, data: bytes("x"), completion: nil) == .nullPointer)
        #expect(inj.inject(flags: .send, data: [], completion: nil) == .invalidParameter)
        #expect(inj.inject(flags: [.send, .disconnect], data: [], completion: nil) == .success)
        #expect(sink.fins == [.send])
        #expect(called.withLock { $0 } == 0)
    }

    @Test("23. defer on receive → nothing indicated until continue from outside classify; nothing lost; continue inside classify is rejected")
    func case23() {
        let sink = BufferSink(), seen = Seen()
        let insideStatus = Mutex<Status?>(nil)
        let holder = Mutex<StreamSession?>(nil)
        let deferOnce = Mutex(true)
        let c = StreamCallout(name: "d", weight: 1) { ind, _ in
            seen.add(ind)
            if deferOnce.withLock({ f in defer { f = false }; return f }) {
                let st = holder.withLock { $0 }!.continueIndications(from: "d")
                insideStatus.withLock { $0 = st }
                return StreamDecision(.permit, .defer)
            }
            return .permit
        }
        let s = session([c], sink: sink)
        holder.withLock { $0 = s }
        s.indicate(bytes("first"), direction: .receive)
        s.indicate(bytes("second"), direction: .receive)
        #expect(insideStatus.withLock { $0 } == .invalidParameter)
        #expect(seen.texts == ["first"])
        #expect(sink.received == "")
        #expect(s.continueIndications(from: "d") == .success)
        #expect(sink.received == "firstsecond")
        #expect(seen.texts == ["first", "firstsecond"])
    }

    @Test("24. allowConnection → never called again for that flow; flowDelete still fires at teardown")
    func case24() throws {
        let engine = FilterEngine()
        let deletes = Mutex(0)
        let id = try engine.register(Callout<String>(key: UUID(), classify: { _, _ in .continue },
                                                      flowDelete: { _ in deletes.withLock { $0 += 1 } })).get()
        let flow = FlowHandle(cookie: 1)
        engine.associate(flow: flow, layer: .stream(.v4), callout: id, context: "stream ctx")
        let sink = BufferSink(), seen = Seen()
        let c = StreamCallout(name: "c", weight: 1) { ind, _ in seen.add(ind); return StreamDecision(.permit, .allowConnection) }
        let s = session([c], sink: sink)
        s.indicate(bytes("one"), direction: .send)
        s.indicate(bytes("two"), direction: .send)
        s.indicate(bytes("back"), direction: .receive)
        #expect(seen.texts == ["one", "back"]) // once per direction, then never again
        #expect(sink.sent == "onetwo" && sink.received == "back")
        engine.endFlow(flow)
        #expect(deletes.withLock { $0 } == 1)
    }

    @Test("after allow-connection by every callout the source may bypass the session; one still-inspecting callout keeps it in")
    func passesThroughAfterAllow() {
        let allow = StreamCallout(name: "allow", weight: 2) { _, _ in StreamDecision(.permit, .allowConnection) }
        let inspect = StreamCallout(name: "inspect", weight: 1) { _, _ in .permit }
        let holder = StreamCallout(name: "hold", weight: 3) { ind, _ in ind.flags.contains(.noMoreData) ? .permit : .needMoreData(10) }
        let sink = BufferSink()
        let s = session([allow], sink: sink)
        #expect(!s.passesThrough(.send), "not before the callout has decided")
        s.indicate(bytes("one"), direction: .send)
        #expect(s.passesThrough(.send) && !s.passesThrough(.receive), "per direction")
        s.indicate([], direction: .send, flags: .disconnect)
        #expect(sink.fins == [.send] && sink.sent == "one")
        let both = session([allow, inspect], sink: BufferSink())
        both.indicate(bytes("x"), direction: .send)
        #expect(!both.passesThrough(.send))
        let held = session([holder, allow], sink: BufferSink())
        held.indicate(bytes("abc"), direction: .send)
        #expect(!held.passesThrough(.send), "bytes held by needMoreData must not be overtaken")
        held.abort()
        #expect(!held.passesThrough(.send))
    }

    @Test("25. a higher-weight callout blocks a segment → lower callouts never see it")
    func case25() {
        let sink = BufferSink(), lowSeen = Seen()
        let high = StreamCallout(name: "high", weight: 9) { ind, _ in
            String(decoding: ind.data, as: UTF8.self).hasPrefix("secret") ? .block(6) : .permit
        }
        let low = StreamCallout(name: "low", weight: 1) { ind, _ in lowSeen.add(ind); return .permit }
        let s = session([low, high], sink: sink)
        s.indicate(bytes("secretpublic"), direction: .send)
        #expect(sink.sent == "public")
        #expect(!lowSeen.texts.joined().contains("secret"))
    }
}

@Suite("Stream engine: rules beyond the cases")
struct StreamRuleTests {
    @Test("every indication carries the owner, both directions, FIN and abort included")
    func metadataEverywhere() {
        let sink = BufferSink(), seen = Seen()
        let s = session([StreamCallout(name: "c", weight: 1) { ind, _ in seen.add(ind); return .permit }], sink: sink)
        s.indicate(bytes("a"), direction: .send)
        s.indicate(bytes("b"), direction: .receive)
        s.indicate([], direction: .send, flags: .disconnect)
        s.abort()
        let all = seen.all
        #expect(all.count == 5) // a, b, FIN, abort on each direction
        #expect(all.allSatisfy { $0.2 == 4242 })
        #expect(all.filter { $0.1.contains(.abort) }.count == 2)
        #expect(sink.aborts == 1)
    }

    @Test("push and expedited reach every callout with the data they came with")
    func pushAndExpedited() {
        let sink = BufferSink(), high = Seen(), low = Seen()
        let s = session([StreamCallout(name: "h", weight: 2) { ind, _ in high.add(ind); return .permit },
                         StreamCallout(name: "l", weight: 1) { ind, _ in low.add(ind); return .permit }], sink: sink)
        s.indicate(bytes("urgent"), direction: .send, flags: [.push, .expedited])
        s.indicate(bytes("plain"), direction: .send)
        for seen in [high, low] {
            #expect(seen.all[0].1.contains(.push) && seen.all[0].1.contains(.expedited))
            #expect(!seen.all[1].1.contains(.push))
        }
    }

    @Test("never inject after abort; pending injections complete with an error at abort")
    func noInjectAfterAbort() {
        let sink = BufferSink()
        let s = session([StreamCallout(name: "hold", weight: 2) { _, _ in .permit },
                         StreamCallout(name: "wait", weight: 1) { ind, _ in ind.flags.contains(.noMoreData) ? .permit : .needMoreData(1000) }],
                        sink: sink)
        let inj = s.injector(for: "hold")!
        let results = Mutex<[Status]>([])
        #expect(inj.inject(flags: .send, data: bytes("held"), completion: { st in results.withLock { $0.append(st) } }) == .success)
        s.abort()
        #expect(results.withLock { $0 } == [.unsuccessful])
        #expect(inj.inject(flags: .send, data: bytes("late"), completion: noCompletion) == .unsuccessful)
        #expect(sink.sent == "")
    }

    @Test("past the buffer limit the callout is told and must take what it has")
    func bufferLimit() {
        let sink = BufferSink(), seen = Seen()
        let c = StreamCallout(name: "c", weight: 1) { ind, _ in seen.add(ind); return .needMoreData(1 << 30) }
        let s = session([c], sink: sink, limit: 16)
        s.indicate(Array(repeating: 65, count: 10), direction: .send)
        #expect(sink.sentBytes.isEmpty)
        s.indicate(Array(repeating: 66, count: 10), direction: .send)
        #expect(seen.all.last!.1.contains(.bufferLimitReached))
        #expect(sink.sentBytes.count == 20)
    }

    @Test("a conditional stream callout is skipped for flows it does not hold")
    func conditional() {
        let sink = BufferSink(), seen = Seen()
        let c = StreamCallout(name: "c", weight: 1, appliesTo: { $0.cookie == 99 }) { ind, _ in seen.add(ind); return .block }
        let s = session([c], sink: sink)
        s.indicate(bytes("untouched"), direction: .send)
        #expect(seen.texts.isEmpty && sink.sent == "untouched")
    }
}


@Suite("Stream engine properties")
struct StreamPropertyTests {
    /// A callout that, at random, permits a prefix, asks for more data, or blocks a prefix
    /// and injects the same bytes back (an identity edit). Output must equal input.
    static func chaosCallout(name: String, weight: UInt16, seed: UInt64) -> StreamCallout {
        let rng = Mutex(SeededGenerator(seed: seed))
        return StreamCallout(name: name, weight: weight) { ind, inj in
            if ind.data.isEmpty { return .permit }
            let roll = rng.withLock { Int.random(in: 0..<4, using: &$0) }
            let k = rng.withLock { Int.random(in: 1...ind.data.count, using: &$0) }
            switch roll {
            case 0: return .permit(k)
            case 1 where !ind.flags.contains(.noMoreData): return .needMoreData(ind.data.count + k)
            case 2:
                let dir: StreamFlags = ind.direction == .send ? .send : .receive
                inj.inject(flags: dir, data: Array(ind.data[0..<k]), completion: noCompletion)
                return .block(k)
            default: return .permit
            }
        }
    }

    @Test("random chunks through random permit/needMoreData/inject-back callouts reassemble exactly", arguments: 0..<40)
    func identityUnderChaos(seed: Int) {
        var rng = SeededGenerator(seed: UInt64(seed) &+ 1)
        let sink = BufferSink()
        let callouts = (0..<Int.random(in: 1...4, using: &rng)).map {
            Self.chaosCallout(name: "c\($0)", weight: UInt16($0 + 1), seed: rng.next())
        }
        let s = session(callouts, sink: sink)
        let input: [[UInt8]] = StreamDirection.allCases.map { _ in
            (0..<Int.random(in: 0...5000, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        }
        var offsets = [0, 0]
        while offsets[0] < input[0].count || offsets[1] < input[1].count {
            let d = Int.random(in: 0...1, using: &rng)
            guard offsets[d] < input[d].count else { continue }
            let n = min(Int.random(in: 1...700, using: &rng), input[d].count - offsets[d])
            s.indicate(Array(input[d][offsets[d]..<offsets[d] + n]), direction: StreamDirection.allCases[d])
            offsets[d] += n
        }
        s.indicate([], direction: .send, flags: .disconnect)
        s.indicate([], direction: .receive, flags: .disconnect)
        #expect(sink.sentBytes == input[0])
        #expect(sink.receivedBytes == input[1])
        #expect(Set(sink.fins) == [.send, .receive] && sink.fins.count == 2)
        #expect(s.heldBytes == 0)
    }

    @Test("abort at any position: what was delivered is a prefix of the input, nothing after the abort", arguments: 0..<20)
    func abortAnywhere(seed: Int) {
        var rng = SeededGenerator(seed: UInt64(seed) &+ 1000)
        let sink = BufferSink()
        let s = session([Self.chaosCallout(name: "c", weight: 1, seed: rng.next())], sink: sink)
        let input = (0..<3000).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let abortAt = Int.random(in: 0...input.count, using: &rng)
        var off = 0
        while off < input.count {
            let n = min(Int.random(in: 1...300, using: &rng), input.count - off)
            if off <= abortAt && abortAt < off + n { s.abort() }
            s.indicate(Array(input[off..<off + n]), direction: .send)
            off += n
        }
        if abortAt == input.count { s.abort() }
        let out = sink.sentBytes
        #expect(out.count <= min(abortAt, input.count))
        #expect(Array(input.prefix(out.count)) == out)
        #expect(sink.aborts == 1 && sink.fins.isEmpty)
    }
}
