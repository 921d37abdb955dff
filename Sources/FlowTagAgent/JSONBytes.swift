#if canImport(Glibc)
import Glibc
#endif
import FlowTagCore
import FlowTagKernel

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

    mutating func decimal<T: BinaryInteger>(_ value: T) {
        if value < 0 {
            bytes.append(UInt8(ascii: "-"))
            decimal(UInt64(-Int64(value)))
            return
        }
        var v = UInt64(value)
        if v < 10 { bytes.append(48 + UInt8(v)); return }
        var tmp: (UInt64, UInt64, UInt64) = (0, 0, 0) // 24 bytes of scratch, more than 20 digits
        withUnsafeMutableBytes(of: &tmp) { buf in
            var i = buf.count
            while v > 0 { i -= 1; buf[i] = 48 + UInt8(v % 10); v /= 10 }
            bytes.append(contentsOf: buf[i...])
        }
    }

    /// Zero-padded decimal of a fixed width.
    mutating func padded(_ value: Int, width: Int) {
        var digits = [UInt8](repeating: 48, count: width)
        var v = value, i = width
        while v > 0 && i > 0 { i -= 1; digits[i] = 48 + UInt8(v % 10); v /= 10 }
        bytes.append(contentsOf: digits)
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
                let hex: [UInt8] = Array("0123456789abcdef".utf8)
                bytes.append(hex[Int(b >> 4)]); bytes.append(hex[Int(b & 15)])
            default: bytes.append(b)
            }
        }
        bytes.append(34)
    }

    mutating func address(_ a: IPAddress) {
        switch a {
        case .v4(let v):
            decimal(v >> 24); byte(46); decimal(v >> 16 & 0xff); byte(46); decimal(v >> 8 & 0xff); byte(46); decimal(v & 0xff)
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
