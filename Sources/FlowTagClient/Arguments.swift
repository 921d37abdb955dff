@_exported import FlowTagCore
#if canImport(Glibc)
import Glibc
#endif

public let flowtagVersion = "0.1.0"

/// `ip:port` or `[ipv6]:port`.
public func parseEndpoint(_ text: String) -> Endpoint? {
    var host = Substring(text), port: Substring
    if host.hasPrefix("[") {
        guard let close = host.firstIndex(of: "]"), host[host.index(after: close)...].hasPrefix(":") else { return nil }
        port = host[host.index(close, offsetBy: 2)...]
        host = host[host.index(after: host.startIndex)..<close]
    } else {
        guard let colon = host.lastIndex(of: ":") else { return nil }
        port = host[host.index(after: colon)...]
        host = host[..<colon]
    }
    guard let a = IPAddress(String(host)), let p = UInt16(port) else { return nil }
    return Endpoint(address: a, port: p)
}

/// `--since`/`--until`: RFC 3339, or a duration back from now (`90s`, `15m`, `2h`, `7d`).
public func parseTimeBound(_ text: String, now: WallTime = .now()) -> WallTime? {
    if let t = WallTime(rfc3339: text) { return t }
    guard let unit = text.last, let n = Int64(text.dropLast()), n >= 0 else { return nil }
    let seconds: Int64
    switch unit {
    case "s": seconds = n
    case "m": seconds = n * 60
    case "h": seconds = n * 3600
    case "d": seconds = n * 86400
    default: return nil
    }
    return WallTime(nanoseconds: now.nanoseconds - seconds * 1_000_000_000)
}

extension StringProtocol {
    /// Left-aligned in a column at least `width` characters wide (never truncated).
    public func padded(to width: Int) -> String {
        let n = count
        return n >= width ? String(self) : String(self) + String(repeating: " ", count: width - n)
    }

    /// Without leading and trailing white space (spaces, tabs, line ends).
    public var trimmed: Substring {
        let s = Substring(self)
        let isBlank: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" || $0 == "\r\n" }
        guard let start = s.firstIndex(where: { !isBlank($0) }), let end = s.lastIndex(where: { !isBlank($0) }) else { return "" }
        return s[start...end]
    }
}

/// `k=v&k=v` with each value percent-encoded.
public func queryString(_ items: [(String, String)]) -> String {
    items.map { "\($0)=\(percentEncoded($1))" }.joined(separator: "&")
}

/// A query parameter value percent-encoded (RFC 3986: unreserved characters, `/` and `:` stay).
public func percentEncoded(_ text: String) -> String {
    var out = ""
    for b in text.utf8 {
        switch b {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
             UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"), UInt8(ascii: "/"), UInt8(ascii: ":"):
            out.unicodeScalars.append(Unicode.Scalar(b))
        default:
            out.unicodeScalars.append("%")
            out.unicodeScalars.append(Unicode.Scalar(hexDigit(b >> 4)))
            out.unicodeScalars.append(Unicode.Scalar(hexDigit(b & 15)))
        }
    }
    return out
}

private func hexDigit(_ v: UInt8) -> UInt8 { v < 10 ? UInt8(ascii: "0") + v : UInt8(ascii: "A") + v - 10 }

/// Writes all of a string to a file descriptor (stdout/stderr) in as few writes as it takes.
public func writeAll(_ fd: Int32, _ text: String) {
    writeAll(fd, bytes: Array(text.utf8))
}

public func writeAll(_ fd: Int32, bytes: [UInt8]) {
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return }
        done += n
    }
}
