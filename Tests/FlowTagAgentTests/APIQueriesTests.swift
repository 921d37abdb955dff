import Testing
@testable import FlowTagAgent
import FlowTagWire

/// The API's parameter parsing: every refusal is a 400 naming the parameter.
@Suite("API queries")
struct APIQueriesTests {
    @Test("lookup: the 5-tuple and its netns")
    func lookup() throws {
        let q = try LookupQuery([("local", "10.0.0.1:80"), ("remote", "[fd00::1]:443"), ("proto", "udp"), ("netns", "7")])
        #expect(q.local.port == 80 && q.remote.port == 443 && q.proto == .udp && q.netns == 7)
    }

    @Test("lookup refusals name the parameter", arguments: [
        ([("local", "10.0.0.1:80")], "lookup needs"),
        ([("local", "10.0.0.1"), ("remote", "1.2.3.4:5")], "bad local"),
        ([("local", "1.1.1.1:1"), ("remote", "1.2.3.4:70000")], "bad remote"),
        ([("local", "1.1.1.1:1"), ("remote", "1.2.3.4:5"), ("proto", "sctp")], "bad proto"),
        ([("local", "1.1.1.1:1"), ("remote", "1.2.3.4:5"), ("netns", "-1")], "bad netns"),
        ([("bogus", "1")], "unknown parameter bogus"),
    ])
    func lookupRefusals(_ items: [(String, String)], _ says: String) {
        #expect(throws: APIRefusal.self) { try LookupQuery(items) }
        do { _ = try LookupQuery(items) } catch { #expect(error.status == 400 && error.message.contains(says), "\(error.message)") }
    }

    @Test("history: bounds, limit and filters; refusals at and past the limits")
    func history() throws {
        let now = WallTime(nanoseconds: 1_800_000_000_000_000_000)
        let q = try HistoryQuery([("since", "2h"), ("limit", "100000"), ("remote", "10.0.0.0/8")], now: now)
        #expect(q.since?.nanoseconds == now.nanoseconds - 7_200_000_000_000 && q.limit == 100_000 && q.filter.remote != nil)
        for (items, says) in [([("limit", "100001")], "bad limit"), ([("limit", "0")], "bad limit"),
                              ([("since", "106752d")], "bad since"), ([("until", "2300-01-01T00:00:00Z")], "bad until"),
                              ([("pid", "x")], "bad filter pid")] {
            do { _ = try HistoryQuery(items, now: now); Issue.record("\(items) accepted") } catch {
                #expect(error.status == 400 && error.message.contains(says), "\(error.message)")
            }
        }
    }

    @Test("watch: payload takes 1, true, 0, false; the last one counts")
    func watch() throws {
        #expect(try WatchQuery([("payload", "1")]).payload)
        #expect(try !WatchQuery([("payload", "true"), ("payload", "0")]).payload)
        #expect(throws: APIRefusal.self) { try WatchQuery([("payload", "yes")]) }
    }
}
