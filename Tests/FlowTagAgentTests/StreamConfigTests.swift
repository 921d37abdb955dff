import Testing
@testable import FlowTagAgent

@Suite("stream config")
struct StreamConfigTests {
    @Test("stream config: defaults, and every callout type parses")
    func streamConfigParses() throws {
        let c = try AgentConfig.parse("""
            stream:
              pool_size: 8
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
        #expect(c.stream.poolSize == 8)
        #expect(c.stream.rules.first?.remotePort == 443)
        #expect(c.stream.callouts.map(\.type) == ["edit", "block", "capture", "pass"])
        #expect(c.stream.callouts[0].outOfBand)
        #expect(try c.stream.kernelRules().first?.remote?.length == 8)
        #expect(AgentConfig().stream.rules.isEmpty)
    }
}
