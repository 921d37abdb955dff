import Foundation
import Glibc
import Synchronization
import Testing
@testable import FlowTagRelay

/// The fast path's base at entry: bytes ever put into a send queue, read while ACKs move
/// bytes from "queued" to "acknowledged" (a real loopback connection, no agent).
@Suite("Send-queue count")
struct SendQueueCountTests {
    /// A connected loopback pair: (writer, reader), both blocking.
    func pair() throws -> (Int32, Int32) {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        try #require(listener >= 0)
        defer { close(listener) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, len) == 0 && listen(listener, 1) == 0
                && getsockname(listener, $0, &len) == 0 }
        }
        try #require(bound, "bind/listen: \(String(cString: strerror(errno)))")
        let writer = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        let connected = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(writer, $0, len) == 0 }
        }
        try #require(connected, "connect: \(String(cString: strerror(errno)))")
        let reader = accept(listener, nil, nil)
        try #require(reader >= 0)
        return (writer, reader)
    }

    @Test("exact while a reader drains: every reading equals what was written, never an ACK counted twice")
    func exactWhileAcksArrive() throws {
        let (writer, reader) = try pair()
        defer { close(writer); close(reader) }
        _ = fcntl(writer, F_SETFL, fcntl(writer, F_GETFL) | O_NONBLOCK)
        // The count includes the SYN for the side that connected: what matters is the
        // difference from a base read before any write.
        let base = try #require(StreamRelay.queuedTotal(writer, exact: true))
        let chunk = [UInt8](repeating: 0x5a, count: 65536)
        var written = 0, readings = 0, rounds = 0, wrong: [Int64] = [], lowerAbove = 0
        // Rounds until enough readings fell into drains (few per round on a loaded machine).
        while readings < 1000 && rounds < 50 {
            rounds += 1
            // Fill both buffers: the reader reads nothing yet, so the writer's queue ends full.
            var filled = 0
            while true {
                let n = chunk.withUnsafeBytes { send(writer, $0.baseAddress, $0.count, 0) }
                if n <= 0 { break }
                filled += n
            }
            written += filled
            #expect(filled > 1 << 20, "round \(rounds): the queues took only \(filled) bytes")
            // The reader drains in small reads: each opens the window, the writer's kernel
            // sends more and ACKs move bytes out of its queue while it is measured.
            let drained = Atomic<Int>(0)
            let done = Atomic<Bool>(false)
            let toRead = filled
            Thread.detachNewThread {
                var buffer = [UInt8](repeating: 0, count: 4096)
                var got = 0
                while got < toRead {
                    let n = buffer.withUnsafeMutableBytes { recv(reader, $0.baseAddress, $0.count, 0) }
                    if n <= 0 { break }
                    got += n
                }
                drained.store(got, ordering: .sequentiallyConsistent)
                done.store(true, ordering: .sequentiallyConsistent)
            }
            while !done.load(ordering: .sequentiallyConsistent) {
                guard let exact = StreamRelay.queuedTotal(writer, exact: true) else { Issue.record("exact reading failed"); return }
                if exact != base + UInt64(written) { wrong.append(Int64(bitPattern: exact &- base) - Int64(written)) }
                if let lower = StreamRelay.queuedTotal(writer), lower > base + UInt64(written) { lowerAbove += 1 }
                readings += 1
            }
            try #require(drained.load(ordering: .sequentiallyConsistent) == filled, "round \(rounds): the reader stopped early")
        }
        #expect(readings >= 1000, "only \(readings) readings in \(rounds) drains")
        #expect(wrong.isEmpty, "\(wrong.count) of \(readings) exact readings were off (by bytes: e.g. \(wrong.prefix(5)))")
        #expect(lowerAbove == 0, "the lower bound exceeded what was written \(lowerAbove) times")
        #expect(StreamRelay.queuedTotal(writer, exact: true) == base + UInt64(written))
    }

    @Test("a socket that is not TCP: no count, not a made-up one")
    func notTCP() {
        let udp = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(udp) }
        #expect(StreamRelay.queuedTotal(udp, exact: true) == nil)
        #expect(StreamRelay.queuedTotal(-1) == nil)
    }
}
