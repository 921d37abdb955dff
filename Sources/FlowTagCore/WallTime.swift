#if canImport(Glibc)
import Glibc
#endif

/// A wall-clock instant in nanoseconds since the Unix epoch, shown as RFC 3339 UTC with
/// nanoseconds (`2026-11-22T01:02:03.123456789Z`).
public struct WallTime: Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    public var nanoseconds: Int64

    public init(nanoseconds: Int64) { self.nanoseconds = nanoseconds }

    public static func now() -> WallTime {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return WallTime(nanoseconds: Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec))
    }

    /// Converts a kernel `bpf_ktime_get_boot_ns()` value.
    public init(bootNanoseconds: UInt64) {
        self.nanoseconds = Int64(bitPattern: bootNanoseconds) &+ BootClock.realtimeOffset
    }

    public static func < (a: WallTime, b: WallTime) -> Bool { a.nanoseconds < b.nanoseconds }

    public var seconds: Double { Double(nanoseconds) / 1e9 }

    public var description: String {
        var secs = time_t(nanoseconds / 1_000_000_000)
        var frac = nanoseconds % 1_000_000_000
        if frac < 0 { frac += 1_000_000_000; secs -= 1 }
        var tm = tm()
        gmtime_r(&secs, &tm)
        func pad(_ v: Int32, _ w: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, w - s.count)) + s
        }
        let f = String(frac)
        let fracText = String(repeating: "0", count: 9 - f.count) + f
        return "\(pad(tm.tm_year + 1900, 4))-\(pad(tm.tm_mon + 1, 2))-\(pad(tm.tm_mday, 2))T\(pad(tm.tm_hour, 2)):\(pad(tm.tm_min, 2)):\(pad(tm.tm_sec, 2)).\(fracText)Z"
    }

    /// Parses RFC 3339 (`Z` or `±hh:mm`, optional fraction); nil when malformed.
    public init?(rfc3339 text: String) {
        let chars = Array(text.utf8)
        func num(_ from: Int, _ len: Int) -> Int? {
            guard from + len <= chars.count else { return nil }
            var v = 0
            for c in chars[from..<from + len] {
                guard c >= 48 && c <= 57 else { return nil }
                v = v * 10 + Int(c - 48)
            }
            return v
        }
        guard chars.count >= 20, let y = num(0, 4), chars[4] == 45, let mo = num(5, 2), chars[7] == 45,
              let d = num(8, 2), chars[10] == 84 || chars[10] == 116 || chars[10] == 32,
              let h = num(11, 2), chars[13] == 58, let mi = num(14, 2), chars[16] == 58, let s = num(17, 2),
              (1...12).contains(mo), (1...31).contains(d), h < 24, mi < 60, s < 61 else { return nil }
        var i = 19
        var nanos: Int64 = 0
        if i < chars.count && chars[i] == 46 {
            i += 1
            var digits = 0
            while i < chars.count, chars[i] >= 48, chars[i] <= 57 {
                if digits < 9 { nanos = nanos * 10 + Int64(chars[i] - 48); digits += 1 }
                i += 1
            }
            guard digits > 0 else { return nil }
            for _ in digits..<9 { nanos *= 10 }
        }
        guard i < chars.count else { return nil }
        var offset = 0
        if chars[i] == 90 || chars[i] == 122 {
            i += 1
        } else if chars[i] == 43 || chars[i] == 45, let oh = num(i + 1, 2), chars.count > i + 3, chars[i + 3] == 58, let om = num(i + 4, 2), oh < 24, om < 60 {
            offset = (oh * 3600 + om * 60) * (chars[i] == 43 ? 1 : -1)
            i += 6
        } else {
            return nil
        }
        guard i == chars.count else { return nil }
        var t = tm()
        t.tm_year = Int32(y - 1900); t.tm_mon = Int32(mo - 1); t.tm_mday = Int32(d)
        t.tm_hour = Int32(h); t.tm_min = Int32(mi); t.tm_sec = Int32(s)
        // Years 1678...2262 fit in Int64 nanoseconds; anything further is refused, not trapped.
        let epoch = timegm(&t)
        let (seconds, o1) = Int64(epoch).subtractingReportingOverflow(Int64(offset))
        let (whole, o2) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        let (total, o3) = whole.addingReportingOverflow(nanos)
        guard !o1, !o2, !o3 else { return nil }
        nanoseconds = total
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        let text = try c.decode(String.self)
        guard let t = WallTime(rfc3339: text) else {
            throw DecodingError.dataCorruptedError(in: c, debugDescription: "not an RFC 3339 time: \(text)")
        }
        self = t
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }
}

/// Offset between CLOCK_REALTIME and CLOCK_BOOTTIME, read once (kernel events carry boot time).
public enum BootClock {
    public static let realtimeOffset: Int64 = {
        var rt = timespec(), bt = timespec()
        clock_gettime(CLOCK_REALTIME, &rt)
        clock_gettime(CLOCK_BOOTTIME, &bt)
        return (Int64(rt.tv_sec) - Int64(bt.tv_sec)) * 1_000_000_000 + (Int64(rt.tv_nsec) - Int64(bt.tv_nsec))
    }()

    public static func nowNanoseconds() -> UInt64 {
        var bt = timespec()
        clock_gettime(CLOCK_BOOTTIME, &bt)
        return UInt64(bt.tv_sec) * 1_000_000_000 + UInt64(bt.tv_nsec)
    }
}
