import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A network namespace joined to the host's by a veth pair (unique names and a /30 of
/// its own), removed with everything in it by `remove()`.
final class TestNetns: @unchecked Sendable {
    let name: String
    let hostAddress: String
    let nsAddress: String
    private let subnetClaim: HostClaims.Claim

    /// The /30s 10.200.0.0 to 10.249.255.252, one per claim (HostClaims): other test
    /// processes on the host make namespaces too.
    static let subnetCount = 50 * 256 * 64

    init() throws {
        name = String(uniqueName("relay").suffix(40))
        let n = nameCounter.add(1, ordering: .relaxed).newValue
        // Fixed widths (pid, counter): "\(pid)\(n)" made pid 8306 n 68 and pid 830 n 668 one
        // name. 3 + 12 characters: an interface name's limit.
        let tag = String(format: "%07d%05d", Int(getpid()), n % 100_000)
        let hostIf = "fth\(tag)", nsIf = "ftn\(tag)"
        let start = (Int(getpid()) &* 64 &+ n) % Self.subnetCount
        var found: (Int, HostClaims.Claim)?
        for step in 0..<4096 where found == nil {
            let i = (start + step) % Self.subnetCount
            // Claimed, and no address in it: a killed test process's namespace keeps its
            // veth (and /30) until cleanup-stale.sh removes it.
            if let c = try HostClaims.shared.claim(HostClaims.subnetBase + i), try !Self.inUse(subnet: i) { found = (i, c) }
        }
        guard let (i, claim) = found else { throw TestFailure("no free test subnet (4096 claimed)") }
        subnetClaim = claim
        hostAddress = Self.address(subnet: i, host: 1)
        nsAddress = Self.address(subnet: i, host: 2)
        for argv in [["netns", "add", name], ["-n", name, "link", "set", "lo", "up"],
                     ["link", "add", hostIf, "type", "veth", "peer", "name", nsIf, "netns", name],
                     ["addr", "add", hostAddress + "/30", "dev", hostIf], ["link", "set", hostIf, "up"],
                     ["-n", name, "addr", "add", nsAddress + "/30", "dev", nsIf], ["-n", name, "link", "set", nsIf, "up"],
                     ["-n", name, "route", "add", "default", "via", hostAddress]] {
            let (rc, _, err) = try runQuickCommand(["/usr/sbin/ip"] + argv)
            guard rc == 0 else { remove(); throw TestFailure("ip \(argv): \(err)") }
        }
    }

    static func address(subnet i: Int, host: Int) -> String {
        "10.\(200 + i / (256 * 64)).\(i / 64 % 256).\(i % 64 * 4 + host)"
    }

    private static func inUse(subnet i: Int) throws -> Bool {
        let (rc, out, err) = try runQuickCommand(["/usr/sbin/ip", "-o", "-4", "addr", "show", "to", address(subnet: i, host: 0) + "/30"])
        guard rc == 0 else { throw TestFailure("ip addr show: \(err)") }
        return !out.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty
    }

    /// argv run inside the namespace.
    func wrap(_ argv: [String]) -> [String] { ["/usr/sbin/ip", "netns", "exec", name] + argv }

    func remove() {
        _ = try? runQuickCommand(["/usr/sbin/ip", "netns", "del", name])
        subnetClaim.release()
    }
}
