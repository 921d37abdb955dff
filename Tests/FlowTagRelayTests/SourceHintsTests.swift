import FlowTagCore
import Testing
@testable import FlowTagRelay

private func prefixes(_ texts: [String]) -> [IPPrefix] { texts.compactMap { IPPrefix($0) } }
private func ip(_ text: String) -> IPAddress? { IPAddress(text) }

/// The entry a longest-prefix match over `hints` picks for `address`.
private func lookup(_ address: IPAddress, in hints: [SourceHint]) -> SourceHint? {
    hints.filter { $0.prefix.contains(address) }.max { $0.prefix.length < $1.prefix.length }
}

@Suite("Source hints")
struct SourceHintsTests {
    // As a little-endian host prints it: header, default, subnet, a host route, a /16,
    // then lines the parser must skip.
    static let route = """
        Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT                                                       
        eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0                                                                               
        eth0\t000200C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0                                                                               
        wg0\t0A01A8C0\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0                                                                               
        docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0                                                                               
        eth0\t000200C0\t00000000\t0001\t0\t0\t200\t00FFFFFF\t0\t0\t0
        eth0\t050200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
        eth1\t0000000A\t00000000\t0000\t0\t0\t0\t000000FF\t0\t0\t0
        eth1\t0000000A\t00000000\t0001\t0\t0\t0\t00FF00FF\t0\t0\t0
        eth1\tZZ00000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0
        eth1\t+000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0
        eth1\t1000000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0
        eth1\t0000000A\t00000000
        \t\t\t

        garbage 🙂 line with ünïcode and nothing else at all here
        """

    @Test("IPv4 routes: default, subnet, host route; header, duplicates and malformed lines skipped")
    func ipv4Routes() {
        #expect(SourceHints.ipv4Routes(Self.route) == prefixes(["0.0.0.0/0", "192.0.2.0/24", "192.168.1.10/32", "172.17.0.0/16"]))
        #expect(SourceHints.ipv4RouteEntries(Self.route).map(\.interface) == ["eth0", "eth0", "wg0", "docker0"])
        #expect(SourceHints.ipv4Routes("").isEmpty)
        #expect(SourceHints.ipv4Routes(String(Self.route.split(separator: "\n")[0])).isEmpty)
    }

    // This host's own table plus a gateway route; then what the parser must skip.
    static let ipv6Route = """
        fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
        fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth0
        00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0
        00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000004 00000000 80200001       lo
        fd000000000000000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001     eth0
        fe8000000000000000fc00fffe000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001     eth0
        ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth0
        00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
        20010db8000000000000000000000000 20 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
        20010db8000100000000000000000000 30 fd000000000000000000000000000000 40 00000000000000000000000000000000 00000400 00000001 00000000 00000001     eth0
        00000000000000000000ffff00000000 60 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     eth0
        20010db800020000000000000000000 30 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     eth0
        20010db8000200000000000000000000 81 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     eth0
        20010db800020000000000000000000g 30 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     eth0
        20010db8000200000000000000000000 30 00000000000000000000000000000000
        ff020000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001     eth0
        """

    @Test("IPv6 routes: default, subnets, local /128s; multicast, link-local, source-specific, mapped and malformed skipped")
    func ipv6Routes() {
        #expect(SourceHints.ipv6Routes(Self.ipv6Route) == prefixes(["fd00::/64", "::/0", "::1/128", "fd00::2/128", "2001:db8::/32"]))
        #expect(SourceHints.ipv6RouteEntries(Self.ipv6Route).map(\.interface) == ["eth0", "eth0", "lo", "eth0", "eth0"])
        #expect(SourceHints.ipv6Routes("not a route\n\n").isEmpty)
    }

    @Test("probe address avoids more specific prefixes and special ranges")
    func probeAddress() {
        func probe(_ prefix: String, _ among: [String]) -> IPAddress? {
            IPPrefix(prefix).map { SourceHints.probeAddress(for: $0, among: prefixes(among)) }
        }
        #expect(probe("192.0.2.0/24", []) == ip("192.0.2.1"))
        #expect(probe("192.0.2.0/24", ["192.0.2.0/24", "192.0.2.1/32"]) == ip("192.0.2.2"))
        #expect(probe("192.0.2.0/24", ["192.0.2.0/25", "192.0.2.128/32", "10.0.0.0/8", "::/0"]) == ip("192.0.2.129"))
        // Fully covered: network+1, the documented fallback.
        #expect(probe("192.0.2.0/24", ["192.0.2.0/25", "192.0.2.128/25"]) == ip("192.0.2.1"))
        // Only the broadcast address is left: refused by connect(), so not a probe.
        #expect(probe("192.0.2.0/24", ["192.0.2.0/25", "192.0.2.128/26", "192.0.2.192/27", "192.0.2.224/28",
                                        "192.0.2.240/29", "192.0.2.248/30", "192.0.2.252/31", "192.0.2.254/32"]) == ip("192.0.2.1"))
        #expect(probe("192.0.2.7/32", ["192.0.2.0/24"]) == ip("192.0.2.7"))
        #expect(probe("192.0.2.6/31", []) == ip("192.0.2.7"))
        // A default route is probed outside 0/8 and outside the listed subnet.
        #expect(probe("0.0.0.0/0", []) == ip("1.0.0.0"))
        #expect(probe("0.0.0.0/0", ["1.0.0.0/24"]) == ip("1.0.1.0"))
        #expect(probe("127.0.0.0/8", ["127.0.0.1/32"]) == ip("127.0.0.2"))
        #expect(probe("::/0", ["::1/128", "fd00::/64"]) == ip("100::"))
        #expect(probe("::/0", ["100::/8", "200::/7"]) == ip("400::"))
        #expect(probe("fd00::/127", []) == ip("fd00::1"))
        #expect(probe("2001:db8::/32", ["2001:db8::/48", "2001:db8:1::/48"]) == ip("2001:db8:2::"))
        #expect(probe("fd00::2/128", ["fd00::/64"]) == ip("fd00::2"))
        // The probe never lands in a more specific prefix when a free address exists.
        let all = prefixes(["10.0.0.0/8", "10.0.0.0/16", "10.1.0.0/16", "10.2.0.0/15", "10.0.0.0/24"])
        for p in all {
            let a = SourceHints.probeAddress(for: p, among: all)
            #expect(p.contains(a))
            #expect(!all.contains { $0.length > p.length && p.contains($0.address) && $0.contains(a) }, "\(p) probed at \(a)")
        }
    }

    @Test("live: the calling thread's table agrees with direct connects")
    func live() throws {
        let hints = SourceHints.current()
        #expect(!hints.isEmpty && hints.count <= SourceHints.maxHints)
        #expect(Set(hints.map(\.prefix)).count == hints.count)
        #expect(hints.allSatisfy { $0.prefix.address.isIPv4 == $0.source.isIPv4 && !$0.source.isUnspecified })
        let loopback = try #require(IPPrefix("127.0.0.0/8"))
        #expect(hints.first { $0.prefix == loopback }?.source == ip("127.0.0.1"))
        #expect(!hints.contains { SourceHints.isIgnoredIPv6($0.prefix.address) })

        for text in ["1.1.1.1", "2606:4700:4700::1111"] {
            let target = try #require(ip(text))
            guard let entry = lookup(target, in: hints), let direct = SourceHints.naturalSource(toward: target) else {
                print("note: no route to \(text) in this netns; its check is skipped")
                continue
            }
            #expect(entry.source == direct, "\(text) matched \(entry), a direct connect comes from \(direct)")
        }
    }
}
