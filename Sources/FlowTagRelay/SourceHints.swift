#if canImport(Glibc)
import Glibc
#endif
import FlowTagCore

/// One entry of a network namespace's source table: a connect to an address in `prefix`
/// (longest prefix wins) naturally comes from `source`.
public struct SourceHint: Sendable, Hashable, CustomStringConvertible {
    public var prefix: IPPrefix
    public var source: IPAddress

    public init(prefix: IPPrefix, source: IPAddress) {
        self.prefix = prefix
        self.source = source
    }

    public var description: String { "\(prefix) -> \(source)" }
}

/// The source address a direct connect would get, per destination prefix, for the network
/// namespace of the calling thread: what the relay's connect hook needs so that a
/// redirected socket is bound exactly as it would have been.
///
/// Every source is the kernel's own answer (a UDP connect to one address of the prefix, then
/// getsockname), never a re-implementation of source selection. IPv4 picks the source per
/// route, so the table is exact for the routes probed; IPv6 (RFC 6724) may pick per
/// destination, so a prefix's entry is the choice for its probe address.
public enum SourceHints {
    /// Bound on the table and on the probes made for it (one UDP socket each). Prefixes are
    /// taken shortest first, so a truncated table keeps the widest routes (the default first)
    /// and loses only more specific entries.
    public static let maxHints = 4096
    /// Bound on what is read of each /proc route file (whole lines only; about 7000 routes).
    static let maxProcBytes = 1 << 20
    static let probePort: UInt16 = 9

    /// The natural source address for every routed prefix of the calling thread's netns, IPv4
    /// and IPv6, plus one /32 (/128) entry per local address of an up interface, and
    /// 127.0.0.0/8, ::1/128 when the loopback is up. A prefix whose probe fails (no route,
    /// reject route) has no entry. At most `maxHints` entries, one per prefix, shortest first.
    ///
    /// A local address's entry is the kernel's answer too: usually the address itself, but a
    /// secondary IPv4 address is reached from its subnet's primary address.
    ///
    /// Synchronous on purpose: sockets, netlink (getifaddrs) and /proc/thread-self all follow
    /// the calling thread's netns, which an `await` could silently change. Routes of policy
    /// routing tables other than main are not in /proc/net/route (IPv4).
    public static func current() -> [SourceHint] {
        let links = interfaces()
        let v4 = ipv4RouteEntries(readProcFile("/proc/thread-self/net/route"))
        let v6 = ipv6RouteEntries(readProcFile("/proc/thread-self/net/ipv6_route"))
        var candidates = links.loopbackUp ? ["127.0.0.0/8", "::1/128"].compactMap { IPPrefix($0) } : []
        candidates += links.addresses.compactMap { hostPrefix($0) }
        // A route on a down interface gives no entry but stays in `spans` below: it is still a
        // more specific route to probe around.
        candidates += (v4 + v6).filter { !links.down.contains($0.interface) }.map(\.prefix)
        var seen = Set<IPPrefix>()
        // Stable: within a length, loopback, local addresses, then kernel order.
        let targets = candidates.filter { seen.insert($0).inserted }.enumerated()
            .sorted { ($0.element.length, $0.offset) < ($1.element.length, $1.offset) }
            .prefix(maxHints).map(\.element)

        let spans = (v4 + v6).map { span($0.prefix) } + targets.map(span)
        let avoid4 = avoidList(spans, v4: true), avoid6 = avoidList(spans, v4: false)
        var hints: [SourceHint] = []
        for target in targets {
            let s = span(target)
            let probe = address(probeValue(s, length: target.length, avoid: s.v4 ? avoid4 : avoid6), v4: s.v4)
            if let source = naturalSource(toward: probe) {
                hints.append(SourceHint(prefix: target, source: source))
            }
        }
        return hints
    }

    // MARK: Route files

    struct RouteEntry: Hashable {
        var prefix: IPPrefix
        var interface: String
    }

    /// Prefixes of /proc/net/route, in file order, without duplicates. Skipped: the header,
    /// malformed lines, non-contiguous masks, routes not RTF_UP.
    static func ipv4Routes(_ procNetRoute: String) -> [IPPrefix] { ipv4RouteEntries(procNetRoute).map(\.prefix) }

    /// Prefixes of /proc/net/ipv6_route, in file order, without duplicates. Skipped: malformed
    /// lines, multicast (ff00::/8) and link-local (fe80::/10) routes, source-specific routes
    /// (a probe has no source to match them), IPv4-mapped prefixes (they are IPv4 on the wire).
    static func ipv6Routes(_ procNetIPv6Route: String) -> [IPPrefix] { ipv6RouteEntries(procNetIPv6Route).map(\.prefix) }

    static func ipv4RouteEntries(_ text: String) -> [RouteEntry] {
        var seen = Set<IPPrefix>()
        var result: [RouteEntry] = []
        for line in text.split(separator: "\n") {
            // Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard f.count >= 8, let rawDst: UInt32 = hex(f[1]), let flags: UInt32 = hex(f[3]),
                  let rawMask: UInt32 = hex(f[7]), flags & 0x1 != 0 else { continue }
            // The kernel prints the __be32 as a host-order integer: back to network order.
            let dst = UInt32(bigEndian: rawDst), mask = UInt32(bigEndian: rawMask)
            let length = mask.nonzeroBitCount
            guard mask == ~(UInt32.max >> UInt32(length)),
                  let p = makePrefix(.v4(dst & mask), length), seen.insert(p).inserted else { continue }
            result.append(RouteEntry(prefix: p, interface: String(f[0])))
        }
        return result
    }

    static func ipv6RouteEntries(_ text: String) -> [RouteEntry] {
        var seen = Set<IPPrefix>()
        var result: [RouteEntry] = []
        for line in text.split(separator: "\n") {
            // dst dst_len src src_len next_hop metric refcnt use flags iface
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard f.count >= 10, f[0].utf8.count == 32, let hi: UInt64 = hex(f[0].prefix(16)),
                  let lo: UInt64 = hex(f[0].suffix(16)), let length: UInt8 = hex(f[1]), length <= 128,
                  let srcLength: UInt8 = hex(f[3]), srcLength == 0 else { continue }
            let s = span(value: UInt128(hi) << 64 | UInt128(lo), v4: false, length: Int(length))
            guard !ignoredIPv6.contains(where: { $0.covers(s) }),
                  let p = makePrefix(address(s.first, v4: false), Int(length)), seen.insert(p).inserted else { continue }
            result.append(RouteEntry(prefix: p, interface: String(f[9])))
        }
        return result
    }

    /// Only whole ASCII hex digits: `UInt(_:radix:)` alone would take a sign.
    static func hex<T: FixedWidthInteger & UnsignedInteger>(_ text: Substring) -> T? {
        guard !text.isEmpty, text.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x66) })
        else { return nil }
        return T(text, radix: 16)
    }

    /// Whole lines of a /proc file, at most `limit` bytes; "" when it cannot be read.
    static func readProcFile(_ path: String, limit: Int = maxProcBytes) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while bytes.count < limit {
            let want = min(chunk.count, limit - bytes.count)
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, want) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            bytes += chunk[0..<n]
        }
        if bytes.count >= limit {
            // Truncated: a partial last line could parse as a different route.
            if let end = bytes.lastIndex(of: 0x0A) { bytes.removeSubrange((end + 1)...) } else { bytes = [] }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    // MARK: Probe address

    /// An inclusive address range as integers, IPv4 in the low 32 bits.
    struct Span: Hashable {
        var v4: Bool
        var first: UInt128
        var last: UInt128

        /// `other` lies inside this range (same family).
        func covers(_ other: Span) -> Bool { v4 == other.v4 && first <= other.first && other.last <= last }
    }

    /// Ranges the kernel treats specially whatever the routes say (0/8, loopback, multicast,
    /// class E; ::/8 with ::1 and v4-mapped, link-local, multicast): never a probe for a
    /// wider prefix such as a default route.
    static let specials: [Span] = ["0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4", "::/8", "fe80::/10", "ff00::/8"]
        .compactMap { IPPrefix($0) }.map(span)
    static let ignoredIPv6: [Span] = ["fe80::/10", "ff00::/8"].compactMap { IPPrefix($0) }.map(span)

    /// The address to probe for `prefix`: the lowest usable one (from network+1, network itself
    /// for /32 and /128) inside no more specific prefix of `all` nor special range; network+1
    /// (network for /32, /128) when there is none. Prefixes of the other family are ignored.
    static func probeAddress(for prefix: IPPrefix, among all: [IPPrefix]) -> IPAddress {
        let s = span(prefix)
        let avoid = avoidList(all.map(span), v4: s.v4)
        return address(probeValue(s, length: prefix.length, avoid: avoid), v4: s.v4)
    }

    /// What probes avoid: `spans` of one family plus its special ranges, sorted by first address.
    static func avoidList(_ spans: [Span], v4: Bool) -> [Span] {
        Set((spans + specials).filter { $0.v4 == v4 }).sorted { ($0.first, $0.last) < ($1.first, $1.last) }
    }

    /// `avoid` comes from `avoidList` (sorted, one family). Prefixes nest or are disjoint, so the
    /// spans inside `target` are those starting within it: a binary search finds the first, and
    /// the walk stops at the first gap, so a probe costs O(log n + prefixes it skips).
    static func probeValue(_ target: Span, length: Int, avoid: [Span]) -> UInt128 {
        let width = target.v4 ? 32 : 128
        let low = length >= width ? target.first : target.first + 1
        // The last address of a wider prefix is its broadcast (IPv4): connect() refuses it.
        let high = length >= width - 1 ? target.last : target.last - 1
        var (lo, hi) = (0, avoid.count)
        while lo < hi {
            let mid = (lo + hi) / 2
            if avoid[mid].first < target.first { lo = mid + 1 } else { hi = mid }
        }
        var candidate = low
        for s in avoid[lo...] {
            if s.first > candidate { break }          // a gap starts at `candidate` (or past `target`)
            guard target.covers(s), s != target else { continue }
            if s.last >= high { return low }          // covered to the end: no free address
            candidate = max(candidate, s.last + 1)    // no overflow: s.last < high
        }
        return candidate <= high ? candidate : low
    }

    static func span(_ prefix: IPPrefix) -> Span {
        span(value: value(prefix.address), v4: prefix.address.isIPv4, length: prefix.length)
    }

    static func span(value: UInt128, v4: Bool, length: Int) -> Span {
        let width = v4 ? 32 : 128
        let hostBits = width - min(max(length, 0), width)
        let hostMask: UInt128 = hostBits == 0 ? 0 : UInt128.max >> (128 - hostBits)
        let first = value & ~hostMask & (v4 ? UInt128(UInt32.max) : UInt128.max)
        return Span(v4: v4, first: first, last: first | hostMask)
    }

    static func address(_ value: UInt128, v4: Bool) -> IPAddress {
        v4 ? .v4(UInt32(truncatingIfNeeded: value))
            : .v6(UInt64(truncatingIfNeeded: value >> 64), UInt64(truncatingIfNeeded: value))
    }

    /// FlowTagCore builds prefixes from text only. nil for IPv4-mapped IPv6 addresses: their
    /// text reads back as IPv4, so the result would not be the prefix asked for.
    static func makePrefix(_ address: IPAddress, _ length: Int) -> IPPrefix? {
        guard let p = IPPrefix("\(address)/\(length)"), p.address == address, p.length == length else { return nil }
        return p
    }

    static func hostPrefix(_ address: IPAddress) -> IPPrefix? { makePrefix(address, address.isIPv4 ? 32 : 128) }

    // MARK: Kernel

    /// The source the kernel picks for a connect to `destination` from the calling thread's
    /// netns: a UDP connect routes and binds the source without sending anything. nil when
    /// there is no route (ENETUNREACH, a reject or blackhole route, …).
    static func naturalSource(toward destination: IPAddress) -> IPAddress? {
        let family = destination.isIPv4 ? AF_INET : AF_INET6
        let fd = socket(family, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var peer = sockaddr_storage()
        let peerLength: Int
        switch destination {
        case .v4(let a):
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = probePort.bigEndian
            sin.sin_addr.s_addr = a.bigEndian
            withUnsafeMutableBytes(of: &peer) { $0.storeBytes(of: sin, as: sockaddr_in.self) }
            peerLength = MemoryLayout<sockaddr_in>.size
        case .v6:
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = probePort.bigEndian
            let bytes = destination.bytes
            withUnsafeMutableBytes(of: &sin6.sin6_addr) { for i in 0..<16 { $0[i] = bytes[i] } }
            withUnsafeMutableBytes(of: &peer) { $0.storeBytes(of: sin6, as: sockaddr_in6.self) }
            peerLength = MemoryLayout<sockaddr_in6>.size
        }
        let connected = withUnsafePointer(to: &peer) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(peerLength)) }
        }
        guard connected == 0 else { return nil }
        var local = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let named = withUnsafeMutablePointer(to: &local) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard named == 0, let source = ipAddress(local), source.isIPv4 == destination.isIPv4,
              !source.isUnspecified else { return nil }
        return source
    }

    /// The address of an AF_INET or AF_INET6 socket address; nil for other families.
    static func ipAddress(_ storage: sockaddr_storage) -> IPAddress? {
        let family = Int32(storage.ss_family)
        return withUnsafeBytes(of: storage) { raw in
            switch family {
            case AF_INET:
                return .v4(UInt32(bigEndian: raw.load(as: sockaddr_in.self).sin_addr.s_addr))
            case AF_INET6:
                let sin6 = raw.load(as: sockaddr_in6.self)
                return withUnsafeBytes(of: sin6.sin6_addr) { IPAddress(bytes: Array($0), family: AF_INET6) }
            default:
                return nil
            }
        }
    }

    struct Interfaces {
        var addresses: [IPAddress] = []
        var down: Set<String> = []
        var loopbackUp = false
    }

    /// Addresses of up interfaces (no IPv6 link-local: it needs a scope the table cannot
    /// carry), names of down ones, whether a loopback is up. getifaddrs asks over a netlink
    /// socket it creates, so this is the calling thread's netns.
    static func interfaces() -> Interfaces {
        var head: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&head) == 0, let first = head else { return Interfaces() }
        defer { freeifaddrs(first) }
        var result = Interfaces()
        var cursor: UnsafeMutablePointer<ifaddrs>? = first
        var visited = 0  // bounded like the table: a netns with more entries is not served whole
        while let entry = cursor, visited < 4 * maxHints {
            visited += 1
            cursor = entry.pointee.ifa_next
            let flags = entry.pointee.ifa_flags
            let up = flags & UInt32(IFF_UP) != 0
            if !up, let name = entry.pointee.ifa_name { result.down.insert(String(cString: name)) }
            if up && flags & UInt32(IFF_LOOPBACK) != 0 { result.loopbackUp = true }
            guard up, let sa = entry.pointee.ifa_addr else { continue }
            let family = Int32(sa.pointee.sa_family)
            let length = family == AF_INET ? MemoryLayout<sockaddr_in>.size
                : family == AF_INET6 ? MemoryLayout<sockaddr_in6>.size : 0
            guard length > 0 else { continue }
            var storage = sockaddr_storage()
            withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: UnsafeRawBufferPointer(start: sa, count: length)) }
            guard let a = ipAddress(storage), !isIgnoredIPv6(a) else { continue }
            result.addresses.append(a)
        }
        return result
    }

    /// IPv6 multicast or link-local: no table entry can serve it (link-local needs a scope).
    static func isIgnoredIPv6(_ a: IPAddress) -> Bool {
        let s = span(value: value(a), v4: a.isIPv4, length: a.isIPv4 ? 32 : 128)
        return ignoredIPv6.contains { $0.covers(s) }
    }

    static func value(_ a: IPAddress) -> UInt128 {
        switch a {
        case .v4(let x): return UInt128(x)
        case .v6(let h, let l): return UInt128(h) << 64 | UInt128(l)
        }
    }
}
