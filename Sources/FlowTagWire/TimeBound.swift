#if canImport(Glibc)
import Glibc
#endif
import FlowTagCore

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
