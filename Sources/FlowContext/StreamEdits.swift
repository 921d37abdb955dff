/// Byte-pattern helpers for stream callouts that edit or watch for patterns, including
/// patterns split across indications (the stmedit sample's technique).
public enum StreamEdits {
    /// Inline editing: permits up to a match, injects `replacement` in place of the match,
    /// holds back a possible partial match at the end until more bytes (or the FIN) come.
    public static func inline(_ ind: StreamIndication, _ inj: StreamInjector, pattern: [UInt8], replacement: [UInt8]) -> StreamDecision {
        let data = ind.data
        if data.isEmpty { return .permit }
        if let at = firstIndex(of: pattern, in: data) {
            if at > 0 { return .permit(at) }
            _ = inj.inject(flags: .direction(ind.direction), data: replacement, completion: { _ in })
            return .block(pattern.count)
        }
        return permitHoldingPartial(ind, pattern: pattern)
    }

    /// Permits what cannot be the start of `pattern`, asks for more data for a tail that
    /// could be (none is held once no more data will come).
    public static func permitHoldingPartial(_ ind: StreamIndication, pattern: [UInt8]) -> StreamDecision {
        let data = ind.data
        let partial = ind.flags.contains(.noMoreData) ? 0 : partialSuffix(data, pattern)
        if partial == 0 { return .permit }
        if partial < data.count { return .permit(data.count - partial) }
        return .needMoreData(pattern.count)
    }

    /// Where `p` first occurs in `d`.
    public static func firstIndex(of p: [UInt8], in d: [UInt8]) -> Int? {
        guard !p.isEmpty, d.count >= p.count else { return nil }
        for i in 0...(d.count - p.count) where d[i] == p[0] && d[i..<i + p.count].elementsEqual(p) { return i }
        return nil
    }

    /// Length of the longest proper prefix of `p` that ends `d`.
    public static func partialSuffix(_ d: [UInt8], _ p: [UInt8]) -> Int {
        for n in stride(from: min(p.count - 1, d.count), to: 0, by: -1) where d.suffix(n).elementsEqual(p.prefix(n)) { return n }
        return 0
    }

    /// `d` with every occurrence of `p` replaced by `r`.
    public static func replaceAll(_ d: [UInt8], _ p: [UInt8], _ r: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(d.count)
        var i = 0
        while i < d.count {
            if i + p.count <= d.count && d[i] == p[0] && d[i..<i + p.count].elementsEqual(p) { out += r; i += p.count } else { out.append(d[i]); i += 1 }
        }
        return out
    }
}
