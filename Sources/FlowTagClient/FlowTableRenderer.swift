import FlowTagCore
import FoundationEssentials

/// Renders flows as an aligned table.
public enum FlowTableRenderer {
    public static func render(_ flows: [(FlowRecord, FlowState)], wide: Bool, headers: Bool) -> String {
        var rows: [[String]] = []
        if headers {
            rows.append(wide
                ? ["PROTO", "STATE", "LOCAL", "REMOTE", "DIR", "PID", "COMM", "EXE", "UID", "CGROUP", "ATTRIBUTION", "SENT", "RECV", "FLOW", "NETNS"]
                : ["PROTO", "STATE", "LOCAL", "REMOTE", "PID", "COMM", "EXE"])
        }
        for (r, s) in flows {
            let exe = r.process.exe.isEmpty ? "-" : r.process.exe
            let comm = r.process.comm.isEmpty ? "-" : r.process.comm
            if wide {
                rows.append([r.protocol.rawValue, s.rawValue, r.local.description, r.remote.description, r.direction.rawValue,
                             "\(r.process.pid)", comm, exe, "\(r.process.uid)", "\(r.process.cgroup)", r.attribution.rawValue,
                             "\(r.bytesSent)", "\(r.bytesReceived)", "\(r.flow)", "\(r.netns)"])
            } else {
                rows.append([r.protocol.rawValue, s.rawValue, r.local.description, r.remote.description, "\(r.process.pid)", comm, exe])
            }
        }
        guard let first = rows.first else { return "" }
        var widths = Array(repeating: 0, count: first.count)
        for row in rows { for (i, c) in row.enumerated() { widths[i] = max(widths[i], c.count) } }
        return rows.map { row in
            row.enumerated().map { i, c in i == row.count - 1 ? c : c.padded(to: widths[i] + 2) }
                .joined()
        }.joined(separator: "\n") + "\n"
    }

    public static func stats(_ s: AgentStats) -> String {
        var lines = [
            ("active flows", "\(s.activeFlows)"), ("flows opened", "\(s.flowsOpened)"), ("flows closed", "\(s.flowsClosed)"),
            ("bytes sent", "\(s.bytesSent)"), ("bytes received", "\(s.bytesReceived)"),
            ("kernel events lost", "\(s.kernelEventsLost)"), ("kernel flows dropped", "\(s.kernelFlowsDropped)"),
            ("resynchronised flows", "\(s.resynchronisedFlows)"), ("recovered closes", "\(s.recoveredCloses)"),
            ("reconciliations", "\(s.reconciliations)"), ("watchers", "\(s.watchers)"), ("watchers dropped", "\(s.watchersDropped)"),
            ("journal rows waiting", "\(s.journalRowsWaiting)"), ("journal rows dropped", "\(s.journalRowsDropped)"),
        ]
        for (k, v) in s.attribution.sorted(by: { $0.key < $1.key }) { lines.append(("attribution \(k)", "\(v)")) }
        for (k, v) in s.extra.sorted(by: { $0.key < $1.key }) { lines.append((k.replacingUnderscores, "\(v)")) }
        let w = lines.map(\.0.count).max() ?? 0
        return lines.map { $0.0.padded(to: w + 2) + $0.1 }.joined(separator: "\n") + "\n"
    }
}

extension String {
    /// `relay_pool_empty` → `relay pool empty` (a stats key as a table label).
    var replacingUnderscores: String { String(map { $0 == "_" ? " " : $0 }) }
}
