/// A number an optional part of the agent (the stream relay) reports: as a Prometheus
/// metric and, when it has a `statsField`, in `/v1/stats`. The agent registers these
/// without knowing what they count.
public struct ReportedValue: Sendable {
    public enum Kind: Sendable { case counter, gauge }
    /// The metric's name after `flowtag_` and before the unit (`relay_flows`).
    public var metric: String
    /// `total` for counters, a base unit (`bytes`) or "".
    public var unit: String
    public var help: String
    public var labels: [(String, String)]
    public var kind: Kind
    /// Its key in `/v1/stats`, if it is shown there.
    public var statsField: String?
    public var value: @Sendable () -> UInt64

    public init(metric: String, unit: String, help: String, labels: [(String, String)] = [], kind: Kind,
                statsField: String? = nil, value: @escaping @Sendable () -> UInt64) {
        self.metric = metric; self.unit = unit; self.help = help; self.labels = labels
        self.kind = kind; self.statsField = statsField; self.value = value
    }
}
