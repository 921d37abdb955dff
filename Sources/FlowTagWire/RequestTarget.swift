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
