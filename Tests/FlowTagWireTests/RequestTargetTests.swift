import Testing
@testable import FlowTagWire

/// The API's request-target parser takes any string a client sends (`/v1/flows?=` once
/// crashed the agent: an empty split indexed at 0).
@Suite("request target")
struct RequestTargetTests {
    @Test("path and parameters")
    func plain() {
        let (path, items) = parseRequestTarget("/v1/flows?pid=12&remote=10.0.0.0%2F8&exe=%2Fusr%2Fbin%2Fcurl")
        #expect(path == "/v1/flows")
        #expect(items.map(\.0) == ["pid", "remote", "exe"])
        #expect(items.map(\.1) == ["12", "10.0.0.0/8", "/usr/bin/curl"])
    }

    @Test("plus is a space in values; a key without value is empty")
    func plusAndBare() {
        let (_, items) = parseRequestTarget("/x?comm=a+b&payload")
        #expect(items.map(\.1) == ["a b", ""])
    }

    @Test("degenerate and hostile targets never trap",
          arguments: ["", "?", "??", "/v1/flows?", "/v1/flows?=", "/v1/flows?&&&", "/v1/flows?=&=", "/v1/flows?==",
                      "/v1/flows?%", "/v1/flows?%zz=%", "/v1/flows?a=%4", "/v1/flows?a=%ff%fe", "/v1/flows?%00=%00",
                      "/v1/flows?a==b", "\u{0}", "/v1/flows?" + String(repeating: "a=b&", count: 10_000)])
    func hostile(_ target: String) {
        let (path, items) = parseRequestTarget(target)
        #expect(path.utf8.count <= target.utf8.count)
        #expect(items.allSatisfy { !$0.0.isEmpty })
    }

    @Test("bad escapes stay as written; invalid UTF-8 is repaired")
    func escapes() {
        #expect(percentDecoded("a%zzb") == "a%zzb")
        #expect(percentDecoded("%4") == "%4")
        #expect(percentDecoded("%41%42") == "AB")
        #expect(percentDecoded("%ff") == "\u{FFFD}")
    }

    @Test("values echoed in errors are clipped")
    func clippedEcho() {
        #expect(String(repeating: "x", count: 1000).clipped.count == 64)
        #expect("short".clipped == "short")
    }
}
