#if canImport(Glibc)
import Glibc
#endif

/// An IPv4 or IPv6 address as the kernel reports it (network byte order).
public enum IPAddress: Hashable, Sendable, CustomStringConvertible, Comparable {
    case v4(UInt32)            // network order packed big-endian into the integer
    case v6(UInt64, UInt64)    // high and low halves, big-endian

    /// From the 16 bytes of an ABI address field; `family` is AF_INET or AF_INET6.
    /// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) become IPv4: that is what is on the wire.
    public init(bytes: [UInt8], family: Int32) {
        if family == AF_INET {
            self = .v4(bytes[0..<4].reduce(0) { $0 << 8 | UInt32($1) })
            return
        }
        let hi = bytes[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let lo = bytes[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        if hi == 0 && lo >> 32 == 0xffff {
            self = .v4(UInt32(truncatingIfNeeded: lo))
        } else {
            self = .v6(hi, lo)
        }
    }

    /// From 16 raw bytes in memory (the ABI's address fields), without copying them into
    /// an array: the event path builds two of these per event.
    public init(raw: UnsafeRawBufferPointer, family: Int32) {
        precondition(raw.count >= 16)
        if family == AF_INET {
            self = .v4(UInt32(bigEndian: raw.loadUnaligned(as: UInt32.self)))
            return
        }
        let hi = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        let lo = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        if hi == 0 && lo >> 32 == 0xffff {
            self = .v4(UInt32(truncatingIfNeeded: lo))
        } else {
            self = .v6(hi, lo)
        }
    }

    /// Parses dotted IPv4 or textual IPv6; nil when it is neither.
    public init?(_ text: String) {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            self = .v4(UInt32(bigEndian: v4.s_addr))
            return
        }
        var v6 = in6_addr()
        guard inet_pton(AF_INET6, text, &v6) == 1 else { return nil }
        let bytes = withUnsafeBytes(of: &v6) { Array($0) }
        self.init(bytes: bytes, family: AF_INET6)
    }

    public var isIPv4: Bool { if case .v4 = self { return true } else { return false } }

    public var isUnspecified: Bool {
        switch self {
        case .v4(let a): return a == 0
        case .v6(let h, let l): return h == 0 && l == 0
        }
    }

    /// 16 bytes, IPv4 in the first four.
    public var bytes: [UInt8] {
        switch self {
        case .v4(let a):
            return [UInt8(a >> 24), UInt8(a >> 16 & 0xff), UInt8(a >> 8 & 0xff), UInt8(a & 0xff)] + Array(repeating: 0, count: 12)
        case .v6(let h, let l):
            return (0..<8).map { UInt8(h >> (56 - 8 * UInt64($0)) & 0xff) } + (0..<8).map { UInt8(l >> (56 - 8 * UInt64($0)) & 0xff) }
        }
    }

    public var description: String {
        switch self {
        case .v4(let a):
            return "\(a >> 24).\(a >> 16 & 0xff).\(a >> 8 & 0xff).\(a & 0xff)"
        case .v6:
            var raw = in6_addr()
            let b = bytes
            withUnsafeMutableBytes(of: &raw) { dst in for i in 0..<16 { dst[i] = b[i] } }
            var buf = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            _ = inet_ntop(AF_INET6, &raw, &buf, socklen_t(buf.count))
            return String(decoding: buf.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    public static func < (a: IPAddress, b: IPAddress) -> Bool {
        switch (a, b) {
        case (.v4(let x), .v4(let y)): return x < y
        case (.v4, .v6): return true
        case (.v6, .v4): return false
        case (.v6(let h1, let l1), .v6(let h2, let l2)): return (h1, l1) < (h2, l2)
        }
    }
}

/// A CIDR prefix such as `10.0.0.0/8` or `fd00::/8`; a bare address is a /32 or /128.
public struct IPPrefix: Hashable, Sendable, CustomStringConvertible {
    public let address: IPAddress
    public let length: Int

    public init?(_ text: String) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let addr = IPAddress(String(parts[0])) else { return nil }
        let max = addr.isIPv4 ? 32 : 128
        if parts.count == 2 {
            guard let len = Int(parts[1]), (0...max).contains(len) else { return nil }
            length = len
        } else {
            length = max
        }
        address = addr
    }

    public func contains(_ other: IPAddress) -> Bool {
        switch (address, other) {
        case (.v4(let p), .v4(let a)):
            if length == 0 { return true }
            let mask: UInt32 = length == 32 ? .max : ~(UInt32.max >> UInt32(length))
            return p & mask == a & mask
        case (.v6(let ph, let pl), .v6(let ah, let al)):
            func masked(_ h: UInt64, _ l: UInt64) -> (UInt64, UInt64) {
                let hm: UInt64 = length >= 64 ? .max : (length == 0 ? 0 : ~(UInt64.max >> UInt64(length)))
                let lm: UInt64 = length <= 64 ? 0 : (length == 128 ? .max : ~(UInt64.max >> UInt64(length - 64)))
                return (h & hm, l & lm)
            }
            return masked(ph, pl) == masked(ah, al)
        default:
            return false
        }
    }

    public var description: String { "\(address)/\(length)" }
}

/// One end of a flow.
public struct Endpoint: Hashable, Sendable, Codable, CustomStringConvertible {
    public var address: IPAddress
    public var port: UInt16

    public init(address: IPAddress, port: UInt16) {
        self.address = address
        self.port = port
    }

    public var description: String {
        address.isIPv4 ? "\(address):\(port)" : "[\(address)]:\(port)"
    }

    enum CodingKeys: String, CodingKey { case address, port }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let text = try c.decode(String.self, forKey: .address)
        guard let a = IPAddress(text) else {
            throw DecodingError.dataCorruptedError(forKey: .address, in: c, debugDescription: "not an IP address: \(text)")
        }
        address = a
        port = try c.decode(UInt16.self, forKey: .port)
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(address.description, forKey: .address)
        try c.encode(port, forKey: .port)
    }
}
