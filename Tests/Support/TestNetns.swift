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

    init() throws {
        name = String(uniqueName("relay").suffix(40))
        let n = nameCounter.add(1, ordering: .relaxed).newValue
        let tag = "\(getpid() % 100000)\(n % 100)"
        let hostIf = "fth\(tag)", nsIf = "ftn\(tag)"
        hostAddress = "10.\(200 + n % 50).\(getpid() % 250).1"
        nsAddress = "10.\(200 + n % 50).\(getpid() % 250).2"
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

    func remove() { _ = try? runQuickCommand(["/usr/sbin/ip", "netns", "del", name]) }
}
