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
        // Fixed widths (pid, counter): "\(pid)\(n)" made pid 8306 n 68 and pid 830 n 668 one
        // name. 3 + 12 characters: an interface name's limit.
        let tag = String(format: "%07d%05d", Int(getpid()), n % 100_000)
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
