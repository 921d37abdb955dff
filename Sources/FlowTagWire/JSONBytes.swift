#if canImport(Glibc)
import Glibc
#endif
import FlowTagCore

/// Appends JSON text straight into a byte buffer: the agent writes tens of thousands of
/// events a second, and building Strings by interpolation cost it more than everything
/// else per event (B3 profile).
struct JSONBytes {
    var bytes: [UInt8]

    init(capacity: Int = 512) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    mutating func raw(_ s: StaticString) {
        s.withUTF8Buffer { bytes.append(contentsOf: $0) }
    }

    mutating func byte(_ b: UInt8) { bytes.append(b) }

    mutating func decimal(_ value: UInt64) {
        var v = value
        if v < 10 { bytes.append(48 + UInt8(v)); return }
        // Digits written backwards into room made at the end (no temporary buffer).
        var n = 0, t = v
        while t > 0 { n += 1; t /= 10 }
        let end = bytes.count + n
        bytes.append(contentsOf: repeatElement(48, count: n))
        var i = end
        while v > 0 { i -= 1; bytes[i] = 48 + UInt8(v % 10); v /= 10 }
    }
    mutating func decimal(_ value: UInt32) { decimal(UInt64(value)) }
    mutating func decimal(_ value: UInt16) { decimal(UInt64(value)) }
    mutating func decimal(_ value: Int) {
        if value < 0 { bytes.append(UInt8(ascii: "-")); decimal(UInt64(value.magnitude)) } else { decimal(UInt64(value)) }
    }

    /// Zero-padded decimal of a fixed width.
    mutating func padded(_ value: Int, width: Int) {
        let end = bytes.count + width
        bytes.append(contentsOf: repeatElement(48, count: width))
        var v = value, i = end
        while v > 0 && i > end - width { i -= 1; bytes[i] = 48 + UInt8(v % 10); v /= 10 }
    }

    /// A JSON string literal (RFC 8259 escaping).
    mutating func quoted(_ text: String) {
        bytes.append(34)
        for b in text.utf8 {
            switch b {
            case 34: bytes.append(92); bytes.append(34)
            case 92: bytes.append(92); bytes.append(92)
            case 10: bytes.append(92); bytes.append(110)
            case 13: bytes.append(92); bytes.append(114)
            case 9: bytes.append(92); bytes.append(116)
            case 0..<0x20:
                raw("\\u00")
                bytes.append(Self.hex(b >> 4)); bytes.append(Self.hex(b & 15))
            default: bytes.append(b)
            }
        }
        bytes.append(34)
    }

    static func hex(_ nibble: UInt8) -> UInt8 { nibble < 10 ? 48 + nibble : 87 + nibble }

    mutating func address(_ a: IPAddress) {
        switch a {
        case .v4(let v):
            decimal(UInt64(v >> 24)); byte(46); decimal(UInt64(v >> 16 & 0xff)); byte(46)
            decimal(UInt64(v >> 8 & 0xff)); byte(46); decimal(UInt64(v & 0xff))
        case .v6:
            bytes.append(contentsOf: a.description.utf8)
        }
    }

    /// RFC 3339 UTC with nanoseconds, as `WallTime.description`.
    mutating func time(_ t: WallTime) {
        var secs = time_t(t.nanoseconds / 1_000_000_000)
        var frac = t.nanoseconds % 1_000_000_000
        if frac < 0 { frac += 1_000_000_000; secs -= 1 }
        var tm = tm()
        gmtime_r(&secs, &tm)
        padded(Int(tm.tm_year) + 1900, width: 4); byte(45); padded(Int(tm.tm_mon) + 1, width: 2); byte(45)
        padded(Int(tm.tm_mday), width: 2); byte(84); padded(Int(tm.tm_hour), width: 2); byte(58)
        padded(Int(tm.tm_min), width: 2); byte(58); padded(Int(tm.tm_sec), width: 2); byte(46)
        padded(Int(frac), width: 9); byte(90)
    }
}
