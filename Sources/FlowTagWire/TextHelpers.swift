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

extension String {
    /// At most 64 characters of a value a client sent, for an error message.
    public var clipped: String { count <= 64 ? self : String(prefix(61)) + "..." }
}
