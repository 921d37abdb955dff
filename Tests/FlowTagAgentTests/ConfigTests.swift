import Foundation
import Testing
@testable import FlowTagAgent

@Suite("Config")
struct ConfigTests {
    @Test func defaultsAndOverrides() throws {
        let c = try AgentConfig.parse("""
            # comment
            socket: ""
            metrics_address: "[::1]:9000"
            udp_idle_seconds: 30
            journal: null
            """)
        #expect(c.socket == nil && c.metricsAddress == "[::1]:9000" && c.udpIdleSeconds == 30 && c.journal == nil)
        #expect(c.bpffs == AgentConfig().bpffs)
        #expect(try AgentConfig.parse("") == AgentConfig())
    }

    @Test func refusals() {
        let cases: [(String, String)] = [
            ("udp_idle_seconds: 0", "udp_idle_seconds"), ("udp_idle_seconds: true", "whole number"),
            ("bpffs: relative/path", "absolute path"), ("- a\n- b", "mapping"), ("journal_max_bytes: 10", "out of range"),
        ]
        for (yaml, expected) in cases {
            #expect(throws: ConfigError.self) { try AgentConfig.parse(yaml) }
            do { _ = try AgentConfig.parse(yaml) } catch { #expect(error.description.contains(expected), "\(yaml): \(error)") }
        }
    }

    /// The file `make install` and the image ship: it must start the agent as it stands,
    /// and equal the embedded defaults apart from what it sets on purpose.
    @Test("the shipped deploy/flowtagd.yaml parses")
    func shippedConfigParses() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let text = try String(contentsOf: root.appendingPathComponent("deploy/flowtagd.yaml"), encoding: .utf8)
        let c = try AgentConfig.parse(text)
        #expect(c.stream.rules.isEmpty, "the shipped config relays nothing until an operator adds rules")
    }
}
