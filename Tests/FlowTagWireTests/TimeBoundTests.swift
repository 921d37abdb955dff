import Testing
@testable import FlowTagWire

/// `--since`/`--until` and the API's `since`/`until`: every value a client can send is
/// either a time or nil, never a trap (a duration of 106752d once killed the agent).
@Suite("time bounds")
struct TimeBoundTests {
    static let now = WallTime(nanoseconds: 1_800_000_000_000_000_000)

    @Test("durations back from now")
    func durations() {
        #expect(parseTimeBound("90s", now: Self.now)?.nanoseconds == Self.now.nanoseconds - 90_000_000_000)
        #expect(parseTimeBound("15m", now: Self.now)?.nanoseconds == Self.now.nanoseconds - 900_000_000_000)
        #expect(parseTimeBound("2h", now: Self.now)?.nanoseconds == Self.now.nanoseconds - 7_200_000_000_000)
        #expect(parseTimeBound("7d", now: Self.now)?.nanoseconds == Self.now.nanoseconds - 604_800_000_000_000)
        #expect(parseTimeBound("0s", now: Self.now) == Self.now)
    }

    @Test("durations at and past what a nanosecond clock holds are refused",
          arguments: ["106752d", "999999999d", "9223372036854775807s", "9223372036854775807d",
                      "153722867280912930m", "2562047788015216h", "9223372037s", "-1s", "+5s", "1.5h",
                      "99999999999999999999999d", "5y", "s", "", "d1", "1 d", "１d"])
    func hostileDurations(_ text: String) {
        #expect(parseTimeBound(text, now: Self.now) == nil)
    }

    @Test("the largest duration that still fits is taken")
    func largestDuration() {
        // now − 106751 days is still after 1677-09-21 (Int64.min ns).
        #expect(parseTimeBound("106751d", now: Self.now) != nil)
    }

    @Test("RFC 3339 times outside 1678...2262 are refused, inside taken",
          arguments: ["2300-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "0000-01-01T00:00:00Z", "1600-01-01T00:00:00Z",
                      "2262-04-12T00:00:00Z", "1677-09-21T00:00:00Z", "2262-04-11T23:47:16+99:99"])
    func hostileTimes(_ text: String) {
        #expect(parseTimeBound(text, now: Self.now) == nil)
        #expect(WallTime(rfc3339: text) == nil)
    }

    @Test("the edges of the representable range")
    func edges() {
        #expect(WallTime(rfc3339: "2262-04-11T23:47:16Z")?.nanoseconds == 9_223_372_036_000_000_000)
        #expect(WallTime(rfc3339: "1677-09-21T00:12:44Z") != nil)
        #expect(WallTime(rfc3339: "1970-01-01T00:00:00Z")?.nanoseconds == 0)
        #expect(WallTime(rfc3339: "2026-11-22T01:00:00+01:00") == WallTime(rfc3339: "2026-11-22T00:00:00Z"))
    }

    @Test("a huge string is refused quickly")
    func hugeInput() {
        #expect(parseTimeBound(String(repeating: "9", count: 1 << 20) + "d", now: Self.now) == nil)
        #expect(parseTimeBound(String(repeating: "2026-11-22T00:00:00Z", count: 10_000), now: Self.now) == nil)
    }
}
