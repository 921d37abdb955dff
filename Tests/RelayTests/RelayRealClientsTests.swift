import Foundation
import Testing
@testable import FlowTagTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// Common clients and servers nobody here wrote, relayed with a pass-through callout:
/// they must work exactly as without the relay.
@Suite("Stream relay: real clients and servers (real agent)", .serialized)
struct RelayRealClientsTests {
    @Test("socat -b 1000 as the relayed client: 2,000,016 bytes then half-close, the answer after it (10 runs)", arguments: ["copy", "sockmap"])
    func socatClient(fastPath: String) async throws {
        let (server, port) = try await startServer(mode: "digest")
        defer { server.kill() }
        let data = try await randomFile(size: 2_000_016, seed: 21)
        defer { unlink(data.path) }
        try await withRelayAgent("  rules:\n    - remote_port: \(port)\n" + fastPathStream(fastPath)) { a in
            var took: [Double] = []
            for run in 0..<10 {
                let started = Date()
                // socat waits 0.5 s (-t) for the answer after its stdin's end, while up to
                // megabytes it wrote still sit in socket buffers (the relay's among them):
                // a timed assertion on a loaded machine. 60 s: the answer, not the clock.
                let socat = "exec /usr/bin/socat -t 60 -b 1000 STDIO TCP:127.0.0.1:\(port) < \(data.path)"
                let (rc, out, err) = try await runCommand(a.cgroup.wrap(["/bin/sh", "-c", socat]))
                #expect(rc == 0, "run \(run): \(err)")
                let answer = (try? JSONSerialization.jsonObject(with: Data(out.utf8))) as? [String: Any] ?? [:]
                took.append(Date().timeIntervalSince(started))
                #expect(answer["received"] as? Int == 2_000_016 && answer["sha"] as? String == data.sha,
                        "run \(run): \(out) \(err) after \(took[run]) s; the server saw: \(server.stdout.suffix(600))")
            }
            print("socat client (\(fastPath)): runs took \(took.map { String(format: "%.2f", $0) }.joined(separator: " ")) s")
            #expect(try await relayedFlowCount(a) == 10)
            try await expectFastPathUsed(a, fastPath, flows: 10)
        }
    }

    @Test("socat -b 1000 as the server, relayed clients download from it (socat and relaypeer), byte-exact", arguments: ["copy", "sockmap"])
    func socatServer(fastPath: String) async throws {
        let data = try await randomFile(size: 3_000_000, seed: 22)
        defer { unlink(data.path) }
        let (server, port) = try await startListening { port in
            ["/usr/bin/socat", "-b", "1000", "TCP-LISTEN:\(port),bind=127.0.0.1,reuseaddr,fork", "OPEN:\(data.path),rdonly"]
        }
        defer { server.kill() }
        try await withRelayAgent("  rules:\n    - remote_port: \(port)\n" + fastPathStream(fastPath)) { a in
            for run in 0..<5 {
                let out = tempPath("download")
                defer { unlink(out) }
                let (rc, _, err) = try await runCommand(a.cgroup.wrap(["/bin/sh", "-c", "exec /usr/bin/socat -b 1000 -u TCP:127.0.0.1:\(port) CREATE:\(out)"]))
                #expect(rc == 0, "run \(run): \(err)")
                #expect(try await sha256(out) == data.sha, "run \(run)")
            }
            #expect(try await relayedFlowCount(a) == 5)
            try await expectFastPathUsed(a, fastPath, flows: 5)
        }
    }

    @Test("nc -N: send a file, shut down at EOF, read the answer", arguments: ["copy", "sockmap"])
    func netcatHalfClose(fastPath: String) async throws {
        let (server, port) = try await startServer(mode: "digest")
        defer { server.kill() }
        let data = try await randomFile(size: 5_000_000, seed: 23)
        defer { unlink(data.path) }
        try await withRelayAgent("  rules:\n    - remote_port: \(port)\n" + fastPathStream(fastPath)) { a in
            for run in 0..<5 {
                let (rc, out, err) = try await runCommand(a.cgroup.wrap(["/bin/sh", "-c", "exec /usr/bin/nc -N 127.0.0.1 \(port) < \(data.path)"]))
                #expect(rc == 0, "run \(run): \(err)")
                let answer = (try? JSONSerialization.jsonObject(with: Data(out.utf8))) as? [String: Any] ?? [:]
                #expect(answer["received"] as? Int == 5_000_000 && answer["sha"] as? String == data.sha, "run \(run): \(out)")
            }
            try await expectFastPathUsed(a, fastPath, flows: 5)
        }
    }

    @Test("iperf3: control and data connections relayed, the test completes both ways", arguments: ["copy", "sockmap"])
    func iperf3(fastPath: String) async throws {
        let (server, port) = try await startListening { port in ["/usr/bin/iperf3", "-s", "-B", "127.0.0.1", "-p", "\(port)"] }
        defer { server.kill() }
        try await withRelayAgent("  rules:\n    - remote_port: \(port)\n" + fastPathStream(fastPath)) { a in
            // iperf3's server closes its listener after each test and opens a new one: a
            // client started in between is refused (and, relayed, reset on its first read).
            var listener: String? = nil
            for reverse in [false, true] {
                listener = try await awaitListener(port: port, server: server, replacing: listener)
                try #require(listener != nil, "iperf3 -s is not listening again on \(port): \(socketState(port: port))")
                let (rc, out, err) = try await runCommand(a.cgroup.wrap(["/usr/bin/iperf3", "-c", "127.0.0.1", "-p", "\(port)", "-t", "2", "-J"]
                                                                  + (reverse ? ["-R"] : [])), timeout: 60)
                #expect(rc == 0, "\(err) \(out.suffix(500))")
                let report = (try? JSONSerialization.jsonObject(with: Data(out.utf8))) as? [String: Any] ?? [:]
                let sum = ((report["end"] as? [String: Any])?["sum_received"] as? [String: Any])?["bytes"] as? Int ?? 0
                // iperf3 -J exits 0 on errors too; its report says.
                #expect(report["error"] == nil && sum > 10_000_000, "reverse \(reverse): \(out.suffix(800))")
            }
            // Each test is one control and one data connection.
            #expect(try await relayedFlowCount(a) == 4)
            try await expectFastPathUsed(a, fastPath, flows: 4)
        }
    }

    @Test("curl downloads from nginx through the relay: byte-exact, the owner and real destination journaled", arguments: ["copy", "sockmap"])
    func curlFromNginx(fastPath: String) async throws {
        let dir = tempPath("nginx")
        try FileManager.default.createDirectory(atPath: dir + "/www", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let data = try await randomFile(size: 8_000_000, seed: 24)
        defer { unlink(data.path) }
        _ = try await runCommand(["/bin/cp", data.path, dir + "/www/blob"])
        let (nginx, port) = try await startListening { port in
            try """
                daemon off; master_process off; worker_processes 1; pid \(dir)/nginx.pid; error_log \(dir)/error.log;
                events { worker_connections 64; }
                http { access_log off; client_body_temp_path \(dir); proxy_temp_path \(dir); fastcgi_temp_path \(dir);
                       uwsgi_temp_path \(dir); scgi_temp_path \(dir);
                       server { listen 127.0.0.1:\(port); root \(dir)/www; } }
                """.write(toFile: dir + "/nginx.conf", atomically: true, encoding: .utf8)
            return ["/usr/sbin/nginx", "-c", dir + "/nginx.conf", "-p", dir]
        }
        defer { nginx.kill() }
        try await withRelayAgent("  rules:\n    - remote_port: \(port)\n" + fastPathStream(fastPath)) { a in
            for run in 0..<5 {
                let out = tempPath("blob")
                defer { unlink(out) }
                let (rc, code, err) = try await runCommand(a.cgroup.wrap(["/usr/bin/curl", "-sS", "-o", out, "-w", "%{http_code}",
                                                                    "http://127.0.0.1:\(port)/blob"]))
                #expect(rc == 0 && code == "200", "run \(run): \(code) \(err)")
                #expect(try await sha256(out) == data.sha, "run \(run)")
            }
            #expect(try await relayedFlowCount(a) == 5)
            try await expectFastPathUsed(a, fastPath, flows: 5)
            var curls: [[String: Any]] = []
            for _ in 0..<50 where curls.count < 5 {
                let (_, history, _) = try await a.cli(["history", "--port", "\(port)", "-o", "json"])
                let flows = ((try? JSONSerialization.jsonObject(with: Data(history.utf8))) as? [String: Any])?["flows"] as? [[String: Any]] ?? []
                curls = flows.filter { ($0["process"] as? [String: Any])?["comm"] as? String == "curl" }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(curls.count == 5 && curls.allSatisfy { ($0["remote"] as? [String: Any])?["port"] as? Int == Int(port) }, "\(curls)")
            #expect(curls.allSatisfy { ($0["bytes_received"] as? Int ?? 0) >= 8_000_000 }, "\(curls)")
        }
    }
}
