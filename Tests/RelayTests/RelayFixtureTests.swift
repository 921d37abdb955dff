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
        // Another suite's server: listening, without SO_REUSEADDR.
        let (holder, taken) = socketListener()
        defer { close(holder) }
        try #require(holder >= 0 && taken != 0, "no loopback listener")
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

    @Test("a claim another process holds is refused until that process dies; two claims of one index conflict in one process too")
    func hostClaimsAreExclusive() async throws {
        let claims = HostClaims(path: tempPath("claims"))
        defer { unlink(claims.path) }
        let holder = try await holdClaims(claims, from: 7, count: 1)
        defer { holder.kill() }
        #expect(try claims.claim(7) == nil, "byte 7 is the other process's")
        let mine = try #require(try claims.claim(8))
        #expect(try claims.claim(8) == nil, "a second claim of 8 in this process")
        mine.release()
        #expect(try claims.claim(8) != nil, "8 after its release")
        holder.kill()
        #expect(try await holder.wait(timeout: 10) != 0)
        #expect(try claims.claim(7) != nil, "7 once its holder died")
    }

    @Test("freeTCPPort skips ports another test process claimed: with all of them claimed it fails, naming why")
    func freeTCPPortHonoursClaims() async throws {
        let claims = HostClaims(path: tempPath("claims"))
        defer { unlink(claims.path) }
        let holder = try await holdClaims(claims, from: 0, count: 65_536)
        defer { holder.kill() }
        let error = #expect(throws: TestFailure.self) { try freeTCPPort(claims: claims) }
        #expect("\(error.map { "\($0)" } ?? "")".contains("unclaimed TCP port"), "\(String(describing: error))")
        holder.kill()
        #expect(try await holder.wait(timeout: 10) != 0)
        let port = try freeTCPPort(claims: claims)
        #expect(port >= 10_000)
    }

    /// A python process holding `count` claims from `from` until killed.
    private func holdClaims(_ claims: HostClaims, from: Int, count: Int) async throws -> Child {
        let holder = try Child([Paths.python, "-c", """
            import fcntl, os, struct, sys, time
            fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('hhqqi4x', fcntl.F_WRLCK, os.SEEK_SET, \(from), \(count), 0))
            print('{"held": true}', flush=True)
            time.sleep(120)
            """, claims.path])
        _ = try await holder.waitForLines(1)
        return holder
    }

    @Test("a poller starved past its deadline still finds what appeared while it was held up")
    func starvedPollerLooksOnceMore() async throws {
        // Its first look is held up past the deadline (as a poller on a busy pool is), and
        // what it waits for appears meanwhile: only a look after the deadline finds it.
        let appeared = Locked(false)
        var looks = 0
        let found = try await poll(timeout: 0.2) { () -> Bool? in
            looks += 1
            if looks == 1 {
                usleep(400_000)
                appeared.withLock { $0 = true }
                return nil
            }
            return appeared.withLock { $0 } ? true : nil
        }
        #expect(found == true, "\(looks) looks")
    }

    @Test("a peer that exits without writing its port fails the wait at once, with its exit status and stderr")
    func exitedPeerFailsAtOnce() async throws {
        let file = tempPath("port")
        defer { unlink(file) }
        let peer = try Child(["/bin/sh", "-c", "echo cannot bind >&2; exit 3"])
        let started = ContinuousClock.now
        do {
            let port = try await waitForPort(file, timeout: 600, peer: peer)
            Issue.record("a port from a peer that wrote none: \(port)")
        } catch {
            #expect("\(error)".contains("exited with status 3") && "\(error)".contains("cannot bind"), "\(error)")
        }
        // Not a speed check: without the early exit the wait runs its whole 600 s.
        #expect(ContinuousClock.now - started < .seconds(300))
    }

    @Test("commands waited for by more tests than the pool has threads leave it free: a task that must run meanwhile runs")
    func runCommandLeavesThePoolFree() async throws {
        let flag = tempPath("flag")
        defer { unlink(flag) }
        // Each command ends only once the flag exists; a blocking wait deadlocks here until
        // the commands' 20 s timeouts fail them.
        let codes = try await morePoolWaitersThanThreads(makingFlag: flag) {
            try await runCommand(["/bin/sh", "-c", "while [ ! -e \"$0\" ]; do sleep 0.02; done", flag], timeout: 20).0
        }
        #expect(codes == Array(repeating: 0, count: ProcessInfo.processInfo.activeProcessorCount + 1))
    }

    @Test("blocking work run off the pool (API reads) by more tests than the pool has threads leaves it free")
    func offPoolLeavesThePoolFree() async throws {
        let flag = tempPath("flag")
        defer { unlink(flag) }
        // Work that blocks its thread (as a socket read with a timeout does) until the flag
        // exists; on the pool itself it would give up at 20 s.
        let seen = try await morePoolWaitersThanThreads(makingFlag: flag) {
            try await offPool { () -> Bool in
                let deadline = Date().addingTimeInterval(20)
                while access(flag, F_OK) != 0 && Date() < deadline { usleep(20_000) }
                return access(flag, F_OK) == 0
            }
        }
        #expect(seen == Array(repeating: true, count: ProcessInfo.processInfo.activeProcessorCount + 1))
    }

    /// Runs `waiter` in one more task than the pool has threads, beside a task on the pool
    /// that makes `flag` after 200 ms (the only way the waiters can end early); their results.
    private func morePoolWaitersThanThreads<T: Sendable>(makingFlag flag: String,
                                                         _ waiter: @escaping @Sendable () async throws -> T) async throws -> [T] {
        try await withThrowingTaskGroup(of: T?.self) { group in
            for _ in 0...ProcessInfo.processInfo.activeProcessorCount { group.addTask { try await waiter() } }
            group.addTask {
                try await Task.sleep(for: .milliseconds(200))
                #expect(FileManager.default.createFile(atPath: flag, contents: nil))
                return nil
            }
            var results: [T] = []
            for try await r in group { if let r { results.append(r) } }
            return results
        }
    }

    @Test("a listener the test holds is not inherited by the children tests start (ss would name them as listening)")
    func heldSocketsStayInTheTestProcess() async throws {
        let (holder, port) = socketListener()
        defer { close(holder) }
        try #require(holder >= 0 && port != 0, "no loopback listener")
        let first = try Child(["/bin/sleep", "30"])
        defer { first.kill() }
        let child = try Child(["/bin/sleep", "30"])
        defer { child.kill() }
        var st = stat()
        try #require(fstat(holder, &st) == 0)
        func targets(_ pid: Int32) throws -> [String: String] {
            let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")
            return Dictionary(uniqueKeysWithValues: fds.map { ($0, (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)")) ?? "") })
        }
        let held = try targets(child.pid)
        #expect(!held.values.contains("socket:[\(st.st_ino)]"), "the child holds the listener: \(held)")
        // Nor the other child's stdin pipe (its write end is the test's).
        let firstStdin = try #require(try targets(first.pid)["0"])
        #expect(!held.filter { $0.key != "0" }.values.contains(firstStdin), "the child holds another child's stdin \(firstStdin): \(held)")
    }
}
