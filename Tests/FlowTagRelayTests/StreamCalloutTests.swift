import FlowContext
import Synchronization
import Testing
@testable import FlowTagRelay

/// Records what a session delivers (pure logic: no kernel).
final class RecordingSink: StreamSink, @unchecked Sendable {
    let state = Mutex<(bytes: [StreamDirection: [UInt8]], aborted: Bool)>(([:], false))
    func deliver(_ bytes: [UInt8], direction: StreamDirection) { state.withLock { $0.bytes[direction, default: []] += bytes } }
    func disconnect(direction: StreamDirection) {}
    func abort() { state.withLock { $0.aborted = true } }
}

@Suite("Built-in stream callouts")
struct StreamCalloutTests {
    func session(_ callouts: [StreamCallout]) -> (StreamSession, RecordingSink) {
        let sink = RecordingSink()
        let flow = FlowHandle(cookie: 1)
        return (StreamSession(flow: flow, metadata: Metadata(flow: flow, processID: 42, processPath: "/usr/bin/x"), callouts: callouts, sink: sink), sink)
    }

    @Test("block: bytes before a split pattern are delivered, then the connection drops", arguments: [1, 2, 3, 5, 9])
    func blockSplitPattern(split: Int) {
        let (s, sink) = session([BuiltinStreamCallouts.blockOnPattern(name: "b", weight: 1, pattern: Array("DROP TABLE".utf8))])
        let text = Array("select 1; DROP TABLE users".utf8)
        let cut = 10 + split // inside the pattern
        s.indicate(Array(text[..<cut]), direction: .send)
        s.indicate(Array(text[cut...]), direction: .send)
        let (bytes, aborted) = sink.state.withLock { ($0.bytes[.send] ?? [], $0.aborted) }
        #expect(aborted)
        #expect(String(decoding: bytes, as: UTF8.self).hasPrefix("select 1; "))
        #expect(!String(decoding: bytes, as: UTF8.self).contains("DROP TABLE"))
    }

    @Test("capture reports the first N bytes of each direction with the owner, once")
    func captureFirstBytes() {
        let got = Mutex<[PayloadCapture]>([])
        let (s, sink) = session([BuiltinStreamCallouts.capture(bytes: 5, report: { c in got.withLock { $0.append(c) } })])
        s.indicate(Array("abc".utf8), direction: .send)
        s.indicate(Array("defgh".utf8), direction: .send)
        s.indicate(Array("xyz".utf8), direction: .receive)
        let caps = got.withLock { $0 }
        #expect(caps.filter { $0.direction == .send }.flatMap(\.data) == Array("abcde".utf8))
        #expect(caps.filter { $0.direction == .receive }.flatMap(\.data) == Array("xyz".utf8))
        #expect(caps.allSatisfy { $0.metadata.processID == 42 })
        #expect(sink.state.withLock { $0.bytes[.send] } == Array("abcdefgh".utf8)) // capture never changes the stream
    }
}
