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
/// Nil for anything else, including times a nanosecond clock cannot hold (before 1678 or
/// after 2262) and durations reaching past them: never a trap on hostile input.
public func parseTimeBound(_ text: String, now: WallTime = .now()) -> WallTime? {
    if let t = WallTime(rfc3339: text) { return t }
    let digits = text.utf8.dropLast()
    guard text.utf8.count <= 32, !digits.isEmpty, digits.allSatisfy({ $0 >= 48 && $0 <= 57 }),
          let unit = text.last, let n = Int64(text.dropLast()) else { return nil }
    let unitSeconds: Int64
    switch unit {
    case "s": unitSeconds = 1
    case "m": unitSeconds = 60
    case "h": unitSeconds = 3600
    case "d": unitSeconds = 86400
    default: return nil
    }
    let (seconds, o1) = n.multipliedReportingOverflow(by: unitSeconds)
    let (nanos, o2) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
    let (back, o3) = now.nanoseconds.subtractingReportingOverflow(nanos)
    guard !o1, !o2, !o3 else { return nil }
    return WallTime(nanoseconds: back)
}

/// What `parseTimeBound` accepts, for error messages.
public let timeBoundHelp = "RFC 3339 (between 1678 and 2262) or a duration back from now like 90s, 15m, 2h, 7d"

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

/// A request target split into its path and decoded `k=v` parameters. Any byte string is
/// taken: empty keys and `=` alone are skipped, bad percent escapes kept as written.
public func parseRequestTarget(_ uri: String) -> (path: String, items: [(String, String)]) {
    let parts = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
    let path = String(parts.first ?? "")
    guard parts.count == 2 else { return (path, []) }
    var items: [(String, String)] = []
    for item in parts[1].split(separator: "&") {
        let kv = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
        guard let rawKey = kv.first, !rawKey.isEmpty else { continue }
        items.append((percentDecoded(rawKey), kv.count > 1 ? percentDecoded(kv[1], plusIsSpace: true) : ""))
    }
    return (path, items)
}

/// `%XX` escapes decoded (a malformed escape stays as written); invalid UTF-8 is repaired.
public func percentDecoded(_ text: Substring, plusIsSpace: Bool = false) -> String {
    let bytes = Array(text.utf8)
    var out: [UInt8] = []
    out.reserveCapacity(bytes.count)
    func hex(_ b: UInt8) -> UInt8? {
        switch b {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return b - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return b - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return b - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
    var i = 0
    while i < bytes.count {
        let b = bytes[i]
        if b == UInt8(ascii: "%"), i + 2 < bytes.count, let h = hex(bytes[i + 1]), let l = hex(bytes[i + 2]) {
            out.append(h << 4 | l)
            i += 3
            continue
        }
        out.append(plusIsSpace && b == UInt8(ascii: "+") ? UInt8(ascii: " ") : b)
        i += 1
    }
    return String(decoding: out, as: UTF8.self)
}

extension String {
    /// At most 64 characters of a value a client sent, for an error message.
    public var clipped: String { count <= 64 ? self : String(prefix(61)) + "..." }
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
