import Testing
@testable import FlowTagAgent

@Suite("stream config")
struct StreamConfigTests {
    @Test("stream config: defaults, and every callout type parses")
    func streamConfigParses() throws {
        let c = try AgentConfig.parse("""
            stream:
              max_flows: 8
              drain_seconds: 3
              fast_path: sockmap
              rules:
                - remote_port: 443
                  direction: outbound
                  remote: 10.0.0.0/8
              callouts:
                - {type: edit, pattern: a, replacement: b, mode: out-of-band, direction: send}
                - {type: block, pattern: x}
                - {type: capture, bytes: 16}
                - {type: pass}
            """)
        #expect(c.stream.maxFlows == 8 && c.stream.drainSeconds == 3)
        #expect(c.stream.fastPath == .sockmap && AgentConfig().stream.fastPath == .copy)
        #expect(AgentConfig().stream.maxFlows == 4096 && AgentConfig().stream.drainSeconds == 10)
        #expect(c.stream.rules.first?.remotePort == 443)
        #expect(c.stream.callouts.map(\.type) == ["edit", "block", "capture", "pass"])
        #expect(c.stream.callouts[0].outOfBand)
        #expect(try c.stream.kernelRules().first?.remote?.length == 8)
        #expect(AgentConfig().stream.rules.isEmpty)
    }
}
