import Foundation
import Testing
@testable import FlowTagWire

@Suite("Event lines")
struct EventLineTests {
    static func event(exe: String, closed: Bool) -> FlowEvent {
        let r = FlowRecord(flow: 8193, netns: 4026531840, protocol: .tcp, family: .ipv6, direction: .inbound,
                           local: Endpoint(address: IPAddress("::1")!, port: 443),
                           remote: Endpoint(address: IPAddress("fd00::2")!, port: 50123),
                           process: ProcessOwner(pid: 10, tid: 11, exe: exe, comm: "we\"ird", uid: 1000, gid: 1000, cgroup: 77),
                           attribution: .seeded, bytesSent: 5, bytesReceived: 6,
                           openedAt: WallTime(nanoseconds: 1_795_000_000_000_000_001),
                           closedAt: closed ? WallTime(nanoseconds: 1_795_000_001_000_000_000) : nil,
                           closeReason: closed ? "fin" : nil,
                           stats: closed ? CloseStats(segmentsOut: 1, segmentsIn: 2, retransmits: 3, smoothedRTTMicroseconds: 4) : nil)
        return FlowEvent(kind: closed ? .close : .open, time: WallTime(nanoseconds: 1_795_000_002_000_000_000), record: r)
    }

    @Test("the hand-written JSON decodes to the same record as the Codable form", arguments: [false, true])
    func jsonMatchesCodable(closed: Bool) throws {
        let e = Self.event(exe: "/opt/a \"b\"\\c\n\t\u{1}é", closed: closed)
        let line = EventLine.json(e)
        #expect(!line.contains("\n"))
        let decoded = try JSONDecoder().decode(FlowRecord.self, from: Data(line.utf8))
        #expect(decoded == e.record)
        let obj = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(obj["event"] as? String == e.kind.rawValue)
        #expect(obj["time"] as? String == e.time.description)
        // The same keys as encoding the record with JSONEncoder.
        let codable = try #require(try JSONSerialization.jsonObject(with: JSONEncoder().encode(e)) as? [String: Any])
        #expect(Set(obj.keys) == Set(codable.keys))
    }

    @Test func textLine() {
        let line = EventLine.text(Self.event(exe: "/usr/bin/curl", closed: true))
        #expect(line.contains("tcp inbound [::1]:443 -> [fd00::2]:50123 pid=10"))
        #expect(line.contains("exe=/usr/bin/curl") && line.contains("sent=5 received=6"))
    }
}
