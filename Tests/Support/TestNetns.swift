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
    private let subnetClaim: Claim

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
        var found: (Int, Claim)?
        for step in 0..<4096 where found == nil {
            let i = (start + step) % Self.subnetCount
            if let c = try HostClaims.shared.claim(HostClaims.subnetBase + i) { found = (i, c) }
        }
        guard let (i, claim) = found else { throw TestFailure("no free test subnet (4096 claimed)") }
        subnetClaim = claim
        let net = "10.\(200 + i / (256 * 64)).\(i / 64 % 256).", first = i % 64 * 4
        hostAddress = net + "\(first + 1)"
        nsAddress = net + "\(first + 2)"
        for argv in [["netns", "add", name], ["-n", name, "link", "set", "lo", "up"],
                     ["link", "add", hostIf, "type", "veth", "peer", "name", nsIf, "netns", name],
                     ["addr", "add", hostAddress + "/30", "dev", hostIf], ["link", "set", hostIf, "up"],
                     ["-n", name, "addr", "add", nsAddress + "/30", "dev", nsIf], ["-n", name, "link", "set", nsIf, "up"],
                     ["-n", name, "route", "add", "default", "via", hostAddress]] {
            let (rc, _, err) = try runQuickCommand(["/usr/sbin/ip"] + argv)
            guard rc == 0 else { remove(); throw TestFailure("ip \(argv): \(err)") }
        }
    }

    /// argv run inside the namespace.
    func wrap(_ argv: [String]) -> [String] { ["/usr/sbin/ip", "netns", "exec", name] + argv }

    func remove() {
        _ = try? runQuickCommand(["/usr/sbin/ip", "netns", "del", name])
        subnetClaim.release()
    }
}
