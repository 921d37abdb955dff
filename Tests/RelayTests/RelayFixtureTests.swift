import Foundation
import Testing
@testable import FlowTagTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// The fixtures the relay suites start real servers with: a port taken between its pick and
/// the server's bind (other suites pick ports too) must not fail a relay test.
@Suite("Relay test fixtures: real servers on free ports")
struct RelayFixtureTests {
    @Test("a server whose port is taken starts again on the next port; with one attempt the error names the bind failure")
    func takenPortIsRetried() async throws {
        let (holder, taken) = try takeFreePort()
        defer { close(holder) }
        let socat = { (port: UInt16) in
            ["/usr/bin/socat", "TCP-LISTEN:\(port),bind=127.0.0.1,reuseaddr,fork", "OPEN:/dev/null,rdonly"]
        }

        do {
            let (server, port) = try await startListening(attempts: 1, ports: { taken }, socat)
            server.kill()
            Issue.record("socat listened on the taken port \(port)")
        } catch {
            #expect("\(error)".contains("port \(taken)") && "\(error)".contains("Address already in use"), "\(error)")
        }

        var picked: [UInt16] = []
        let (server, port) = try await startListening(ports: {
            let port = picked.isEmpty ? taken : try freeTCPPort()
            picked.append(port)
            return port
        }, socat)
        defer { server.kill() }
        #expect(picked.count == 2 && port == picked[1] && port != taken, "picked \(picked), listening on \(port)")
        #expect(server.isRunning)
    }

    @Test("a poller starved past its deadline (every pool thread blocked) still finds the port written meanwhile")
    func starvedPollerLooksOnceMore() async throws {
        let file = tempPath("port")
        defer { unlink(file) }
        let waiter = Task { try await waitForPort(file, timeout: 0.5) }
        try await Task.sleep(for: .milliseconds(100)) // its first look found no file
        // Block every thread of the pool for 1.5 s, as tests waiting in runCommand do; the
        // port is written by a thread outside the pool while they block.
        let blockers = (0...ProcessInfo.processInfo.activeProcessorCount).map { _ in Task.detached { usleep(1_500_000) } }
        Thread.detachNewThread {
            usleep(200_000)
            try? "4242".write(toFile: file, atomically: true, encoding: .utf8)
        }
        for b in blockers { await b.value }
        #expect(try await waiter.value == 4242)
    }
}

/// A socket listening on a free port of 127.0.0.1 without SO_REUSEADDR, as another suite's
/// server: the next free port if the one picked was taken meanwhile (seen once).
private func takeFreePort() throws -> (Int32, UInt16) {
    var failures: [String] = []
    for _ in 0..<10 {
        let port = try freeTCPPort()
        do {
            let fd = try listeningSocket(port: port)
            if !failures.isEmpty { print("taken before the holder listened: \(failures) \(socketState(port: port))") }
            return (fd, port)
        } catch { failures.append("\(error) \(socketState(port: port))") }
    }
    throw TestFailure(failures.joined(separator: "; "))
}

private func listeningSocket(port: UInt16) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw TestFailure("socket: \(String(cString: strerror(errno)))") }
    var sin = sockaddr_in()
    sin.sin_family = sa_family_t(AF_INET)
    sin.sin_port = port.bigEndian
    sin.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    let bound = withUnsafePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    guard bound == 0 else { return try failed("bind") }
    guard listen(fd, 8) == 0 else { return try failed("listen") }
    return fd

    func failed(_ call: String) throws -> Int32 {
        let message = String(cString: strerror(errno))
        close(fd)
        throw TestFailure("\(call) 127.0.0.1:\(port): \(message)")
    }
}
