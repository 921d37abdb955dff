import Foundation
import Testing
@testable import FlowTagAgent

/// The agent's stderr lines: parseable `key=value` pairs, debug lines stamped with a time.
@Suite("agent log lines")
struct AgentLogTests {
    @Test("values with spaces, quotes or '=' are quoted and escaped; plain ones are not")
    func quoting() {
        #expect(StderrLogHandler.quoted("plain") == "plain")
        #expect(StderrLogHandler.quoted("") == "\"\"")
        #expect(StderrLogHandler.quoted("two words") == "\"two words\"")
        #expect(StderrLogHandler.quoted("a=b") == "\"a=b\"")
        #expect(StderrLogHandler.quoted("say \"hi\"\n") == "\"say \\\"hi\\\"\\n\"")
    }

    @Test("the debug time is CLOCK_MONOTONIC seconds with three decimals, and does not go back")
    func monotonicStamp() throws {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        let first = AgentLog.monotonicSeconds(), second = AgentLog.monotonicSeconds()
        for stamp in [first, second] {
            let parts = stamp.split(separator: ".")
            #expect(parts.count == 2 && parts[1].count == 3 && parts.allSatisfy { $0.allSatisfy(\.isNumber) }, "\(stamp)")
        }
        let a = try #require(Double(first)), b = try #require(Double(second))
        #expect(a >= Double(ts.tv_sec) && b >= a)
    }
}
