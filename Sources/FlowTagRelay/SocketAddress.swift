#if canImport(Glibc)
import Glibc
#endif
import FlowTagCore

/// An IPv4 or IPv6 socket address in the family a socket uses (an IPv4 address on an
/// AF_INET6 socket is written v4-mapped).
struct SocketAddress: Hashable, Sendable, CustomStringConvertible {
    var family: Int32
    var address: IPAddress
    var port: UInt16

    var description: String { address.isIPv4 ? "\(address):\(port)" : "[\(address)]:\(port)" }

    init(family: Int32, address: IPAddress, port: UInt16) {
        self.family = family; self.address = address; self.port = port
    }

    init?(_ storage: sockaddr_storage) {
        var s = storage
        switch Int32(s.ss_family) {
        case AF_INET:
            let sin = withUnsafeBytes(of: &s) { $0.loadUnaligned(as: sockaddr_in.self) }
            self.init(family: AF_INET, address: .v4(UInt32(bigEndian: sin.sin_addr.s_addr)), port: UInt16(bigEndian: sin.sin_port))
        case AF_INET6:
            let sin6 = withUnsafeBytes(of: &s) { $0.loadUnaligned(as: sockaddr_in6.self) }
            var a = sin6.sin6_addr
            let address = withUnsafeBytes(of: &a) { IPAddress(raw: $0, family: AF_INET6) }
            self.init(family: AF_INET6, address: address, port: UInt16(bigEndian: sin6.sin6_port))
        default:
            return nil
        }
    }

    /// The 16 bytes of the address as this family writes it (v4-mapped on AF_INET6).
    var wireBytes: [UInt8] {
        if family == AF_INET6, case .v4 = address { return Array(repeating: 0, count: 10) + [0xff, 0xff] + address.bytes.prefix(4) }
        return address.bytes
    }

    func withSockaddr<T>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        let bytes = wireBytes
        if family == AF_INET {
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = port.bigEndian
            withUnsafeMutableBytes(of: &sin.sin_addr) { for i in 0..<4 { $0[i] = bytes[i] } }
            return withUnsafePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        }
        var sin6 = sockaddr_in6()
        sin6.sin6_family = sa_family_t(AF_INET6)
        sin6.sin6_port = port.bigEndian
        withUnsafeMutableBytes(of: &sin6.sin6_addr) { for i in 0..<16 { $0[i] = bytes[i] } }
        return withUnsafePointer(to: &sin6) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in6>.size)) } }
    }

    static func local(_ fd: Int32) -> SocketAddress? { name(fd, getsockname) }
    static func peer(_ fd: Int32) -> SocketAddress? { name(fd, getpeername) }

    private static func name(_ fd: Int32, _ call: (Int32, UnsafeMutablePointer<sockaddr>, UnsafeMutablePointer<socklen_t>) -> Int32) -> SocketAddress? {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { call(fd, $0, &len) } }
        return rc == 0 ? SocketAddress(storage) : nil
    }
}
