#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import FlowTagCore

/// A UDP flow-map key as a hashable value (its raw bytes).
struct UDPKey: Hashable {
    var raw: ft_udp_key

    init(raw: ft_udp_key) { self.raw = raw }
    init(_ f: ft_flow) {
        raw = ft_udp_key()
        raw.netns_cookie = f.netns_cookie
        raw.tuple = f.tuple
    }

    static func == (a: UDPKey, b: UDPKey) -> Bool {
        var x = a.raw, y = b.raw
        return memcmp(&x, &y, MemoryLayout<ft_udp_key>.size) == 0
    }

    func hash(into h: inout Hasher) {
        var x = raw
        withUnsafeBytes(of: &x) { h.combine(bytes: $0) }
    }
}
