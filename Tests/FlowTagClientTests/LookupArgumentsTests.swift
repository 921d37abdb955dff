import Testing
@testable import FlowTagClient

@Suite("flowtag lookup's fast path: only well-formed command lines")
struct LookupArgumentsTests {
    @Test("accepted forms and what they mean")
    func accepted() throws {
        let plain = try #require(LookupArguments(fastPath: ["lookup", "10.0.0.1:80", "[fd00::2]:5555"]))
        #expect(plain == LookupArguments(socket: "/run/flowtag/flowtag.sock", format: .table, noHeaders: false,
                                         local: "10.0.0.1:80", remote: "[fd00::2]:5555", proto: .tcp, netns: nil))
        #expect(plain.path == "/v1/lookup?proto=tcp&local=10.0.0.1:80&remote=%5Bfd00::2%5D:5555")
        let all = try #require(LookupArguments(fastPath: ["lookup", "--socket", "/tmp/s", "1.2.3.4:1", "-o", "json", "5.6.7.8:2",
                                                          "--proto=udp", "--netns=4026531840", "--no-headers"]))
        #expect(all == LookupArguments(socket: "/tmp/s", format: .json, noHeaders: true, local: "1.2.3.4:1", remote: "5.6.7.8:2",
                                       proto: .udp, netns: 4026531840))
        #expect(LookupArguments(fastPath: ["lookup", "1.2.3.4:1", "5.6.7.8:2", "--output=wide"])?.format == .wide)
    }

    @Test("anything else goes to the full parser (help, errors, other commands)", arguments: [
        [], ["flows"], ["lookup"], ["lookup", "1.2.3.4:1"], ["lookup", "1.2.3.4:1", "5.6.7.8:2", "9.9.9.9:3"],
        ["lookup", "--help"], ["lookup", "1.2.3.4:1", "5.6.7.8:2", "-h"], ["lookup", "1.2.3.4", "5.6.7.8:2"],
        ["lookup", "1.2.3.4:1", "5.6.7.8:2", "-o", "yaml"], ["lookup", "1.2.3.4:1", "5.6.7.8:2", "--proto", "sctp"],
        ["lookup", "1.2.3.4:1", "5.6.7.8:2", "--netns", "-1"], ["lookup", "1.2.3.4:1", "5.6.7.8:2", "--socket"],
        ["lookup", "1.2.3.4:1", "5.6.7.8:2", "--socket", "a", "--socket", "b"], ["lookup", "1.2.3.4:1", "5.6.7.8:2", "-o", "json", "--output", "wide"],
        ["lookup", "1.2.3.4:1", "5.6.7.8:2", "--no-headers=1"], ["lookup", "1.2.3.4:1", "5.6.7.8:2", "--pid", "1"],
        ["lookup", "1.2.3.4:1", "5.6.7.8:70000"], ["lookup", "1.2.3.4:1", "5.6.7.8:2", "--socket="],
    ])
    func refused(_ arguments: [String]) {
        #expect(LookupArguments(fastPath: arguments) == nil)
    }

    @Test("the client stops reading once a Content-Length answer is whole")
    func responseCompleteness() throws {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n"
        #expect(!APIClient.isComplete(Array(head.utf8)))
        #expect(!APIClient.isComplete(Array((head + "{\"flows\":").utf8)))
        #expect(APIClient.isComplete(Array((head + "{\"flows\":[]").utf8)))
        #expect(!APIClient.isComplete(Array("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello".utf8)))
        #expect(try APIClient.parse(Array((head + "{\"flows\":[]").utf8)).text == "{\"flows\":[]")
    }

    @Test("headers are read byte by byte: any case, with or without CR; bad status lines refused")
    func headerParsing() throws {
        let mixed = Array("HTTP/1.1 404 Not Found\r\ncontent-LENGTH:  3 \r\nX-Content-Length: 9\nTRANSFER-encoding: Chunked\r\n\r\n".utf8)
        let end = try #require(APIClient.find(mixed, [13, 10, 13, 10]))
        #expect(APIClient.headerValue(mixed, headEnd: end, name: "content-length").map { String(decoding: $0, as: UTF8.self) } == "  3 ")
        #expect(APIClient.headerValue(mixed, headEnd: end, name: "connection") == nil)
        #expect(APIClient.isChunked(mixed, headEnd: end))
        let chunked = try APIClient.parse(Array("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n".utf8))
        #expect(chunked.status == 200 && chunked.text == "hello!")
        #expect(try APIClient.parse(mixed).status == 404)
        for bad in ["HTTP/1.1 20 OK\r\n\r\n", "HTTP/1.1\r\n\r\n", "garbage\r\n\r\n"] {
            #expect(throws: ClientError.self) { try APIClient.parse(Array(bad.utf8)) }
        }
    }
}

@Suite("global options before the command")
struct GlobalOptionsTests {
    @Test("moved after the command; everything else as it was", arguments: [
        (["--socket", "/s", "flows", "--port", "80"], ["flows", "--socket", "/s", "--port", "80"]),
        (["--socket=/s", "-o", "json", "--no-headers", "history"], ["history", "--socket=/s", "-o", "json", "--no-headers"]),
        (["flows", "--socket", "/s"], ["flows", "--socket", "/s"]),
        (["--socket", "/s"], ["--socket", "/s"]),
        (["--socket"], ["--socket"]),
        (["--bogus", "flows"], ["--bogus", "flows"]),
        (["-o", "wide", "lookup", "1.2.3.4:1", "5.6.7.8:2"], ["lookup", "-o", "wide", "1.2.3.4:1", "5.6.7.8:2"]),
        ([], []),
    ])
    func reordered(_ given: [String], _ expected: [String]) {
        #expect(GlobalOptions.commandFirst(given) == expected)
    }

    @Test("a reordered lookup takes the fast path")
    func lookupFastPath() throws {
        let l = try #require(LookupArguments(fastPath: GlobalOptions.commandFirst(["--socket", "/x.sock", "lookup", "1.2.3.4:1", "5.6.7.8:2"])))
        #expect(l.socket == "/x.sock")
    }
}
