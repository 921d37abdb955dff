import FlowTagCore
import FoundationEssentials

/// Output formats for a stream of flow events.
public enum EventFormat: String, Sendable, CaseIterable {
    case text, json
}

/// Renders flow events one line each.
public enum EventLine {
    /// One JSON object, written by hand: the agent emits tens of thousands a second and
    /// JSONEncoder costs more than everything else per event. Same keys and values as the
    /// Codable form (FlowRecord's), checked by the tests.
    public static func json(_ event: FlowEvent) -> String {
        var w = JSONBytes()
        write(event, into: &w)
        return String(decoding: w.bytes, as: UTF8.self)
    }

    /// Appends one event as a JSON object (no newline) to `buffer`.
    public static func appendJSON(_ event: FlowEvent, to buffer: inout [UInt8]) {
        var w = JSONBytes(capacity: 0)
        swap(&w.bytes, &buffer)
        write(event, into: &w)
        swap(&w.bytes, &buffer)
    }

    static func write(_ event: FlowEvent, into w: inout JSONBytes) {
        w.raw("{\"event\":\""); w.bytes.append(contentsOf: event.kind.rawValue.utf8)
        w.raw("\",\"time\":\""); w.time(event.time); w.raw("\",")
        if let p = event.payload {
            w.raw("\"payload\":{\"direction\":"); w.quoted(p.direction)
            w.raw(",\"offset\":"); w.decimal(p.offset)
            w.raw(",\"length\":"); w.decimal(p.data.count)
            w.raw(",\"data_base64\":\""); w.bytes.append(contentsOf: Data(p.data).base64EncodedString().utf8); w.raw("\"},")
        }
        writeRecordBody(event.record, into: &w)
    }

    /// A flow record as a JSON object; `prefix` holds extra members (with a trailing comma).
    public static func recordJSON(_ r: FlowRecord, prefix: String = "") -> String {
        var w = JSONBytes()
        w.byte(123)
        w.bytes.append(contentsOf: prefix.utf8)
        writeRecordBody(r, into: &w)
        return String(decoding: w.bytes, as: UTF8.self)
    }

    /// The record's members and the closing brace (the opening one is the caller's).
    static func writeRecordBody(_ r: FlowRecord, into w: inout JSONBytes) {
        w.raw("\"flow\":"); w.decimal(r.flow)
        w.raw(",\"netns\":"); w.decimal(r.netns)
        w.raw(",\"protocol\":\""); w.bytes.append(contentsOf: r.protocol.rawValue.utf8)
        w.raw("\",\"family\":\""); w.bytes.append(contentsOf: r.family.rawValue.utf8)
        w.raw("\",\"direction\":\""); w.bytes.append(contentsOf: r.direction.rawValue.utf8)
        w.raw("\",\"local\":{\"address\":\""); w.address(r.local.address)
        w.raw("\",\"port\":"); w.decimal(r.local.port)
        w.raw("},\"remote\":{\"address\":\""); w.address(r.remote.address)
        w.raw("\",\"port\":"); w.decimal(r.remote.port)
        let p = r.process
        w.raw("},\"process\":{\"pid\":"); w.decimal(p.pid)
        w.raw(",\"tid\":"); w.decimal(p.tid)
        w.raw(",\"exe\":"); w.quoted(p.exe)
        w.raw(",\"comm\":"); w.quoted(p.comm)
        w.raw(",\"uid\":"); w.decimal(p.uid)
        w.raw(",\"gid\":"); w.decimal(p.gid)
        w.raw(",\"cgroup\":"); w.decimal(p.cgroup)
        w.raw("},\"attribution\":\""); w.bytes.append(contentsOf: r.attribution.rawValue.utf8)
        w.raw("\",\"bytes_sent\":"); w.decimal(r.bytesSent)
        w.raw(",\"bytes_received\":"); w.decimal(r.bytesReceived)
        w.raw(",\"opened_at\":\""); w.time(r.openedAt); w.byte(34)
        if let c = r.closedAt { w.raw(",\"closed_at\":\""); w.time(c); w.byte(34) }
        if let reason = r.closeReason { w.raw(",\"close_reason\":"); w.quoted(reason) }
        if let st = r.stats {
            w.raw(",\"stats\":{\"segments_out\":"); w.decimal(st.segmentsOut)
            w.raw(",\"segments_in\":"); w.decimal(st.segmentsIn)
            w.raw(",\"retransmits\":"); w.decimal(st.retransmits)
            w.raw(",\"srtt_us\":"); w.decimal(st.smoothedRTTMicroseconds); w.byte(125)
        }
        w.byte(125)
    }

    /// A JSON string literal (RFC 8259 escaping), as `JSONBytes.quoted` writes it.
    public static func quoted(_ text: String) -> String {
        var w = JSONBytes(capacity: text.utf8.count + 2)
        w.quoted(text)
        return String(decoding: w.bytes, as: UTF8.self)
    }

    public static func text(_ event: FlowEvent) -> String {
        let r = event.record
        if let p = event.payload {
            let shown = String(decoding: p.data.map { (0x20..<0x7f).contains($0) ? $0 : UInt8(ascii: ".") }, as: UTF8.self)
            return "\(event.time) payload \(p.direction) \(r.local) -> \(r.remote) pid=\(r.process.pid) comm=\(r.process.comm) "
                + "offset=\(p.offset) length=\(p.data.count) \"\(shown)\""
        }
        var line = "\(event.time) \(event.kind.rawValue.padded(to: 5)) "
        line += "\(r.protocol.rawValue) \(r.direction.rawValue) \(r.local) -> \(r.remote) "
        line += "pid=\(r.process.pid) comm=\(r.process.comm) exe=\(r.process.exe.isEmpty ? "-" : r.process.exe) "
        line += "uid=\(r.process.uid) attribution=\(r.attribution.rawValue)"
        if event.kind == .close { line += " sent=\(r.bytesSent) received=\(r.bytesReceived)" }
        return line
    }

    public static func render(_ event: FlowEvent, as format: EventFormat) -> String {
        format == .json ? json(event) : text(event)
    }
}
