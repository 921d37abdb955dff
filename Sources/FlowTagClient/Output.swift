import FlowTagCore
import FoundationEssentials

/// CLI output formats, kubectl-style.
public enum OutputFormat: String, Sendable, CaseIterable {
    case table, wide, json
}

/// Exit codes of the CLI (sysexits.h where one fits).
public enum ExitStatus: Int32, Sendable {
    case ok = 0
    case nothingFound = 1
    case usage = 64         // EX_USAGE: a bad argument or filter
    case agentDown = 69     // EX_UNAVAILABLE: the agent is not running
    case tempFailure = 75   // EX_TEMPFAIL: the agent ended a watch that read too slowly
    case protocolError = 76 // EX_PROTOCOL
    case permission = 77    // EX_NOPERM
}

/// A flow as the API returns it: the record's fields plus `state`.
public struct APIFlow: Decodable, Sendable {
    public var state: FlowState
    public var record: FlowRecord

    enum CodingKeys: String, CodingKey { case state }
    public init(from decoder: any Decoder) throws {
        state = try decoder.container(keyedBy: CodingKeys.self).decode(FlowState.self, forKey: .state)
        record = try FlowRecord(from: decoder)
    }
}

public struct APIFlowList: Decodable, Sendable {
    public var flows: [APIFlow]
}

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
