import FoundationEssentials
/// Transport protocol of a flow.
public enum FlowProtocol: String, Codable, Sendable, CaseIterable {
    case tcp, udp
}

/// Address family as seen on the wire (IPv4-mapped IPv6 sockets carry IPv4 flows).
public enum AddressFamily: String, Codable, Sendable, CaseIterable {
    case ipv4, ipv6
}

public enum FlowDirection: String, Codable, Sendable, CaseIterable {
    case outbound, inbound
}

/// How the owner of a flow was learned.
public enum Attribution: String, Codable, Sendable, CaseIterable {
    /// Stamped in the kernel, in the context of the process that acted on the socket.
    case kernel
    /// The process acted in the kernel, but its executable came from /proc because it
    /// started before the programs were loaded.
    case seeded
    /// Cloned from the listening socket; no process has accepted the connection yet.
    case inherited
    /// The socket predates the programs: no stamp.
    case unknown
}

/// The process that owns a flow.
public struct ProcessOwner: Codable, Sendable, Hashable {
    public var pid: UInt32
    public var tid: UInt32
    public var exe: String
    public var comm: String
    public var uid: UInt32
    public var gid: UInt32
    /// cgroup v2 id (the inode number of the cgroup directory).
    public var cgroup: UInt64

    public init(pid: UInt32, tid: UInt32, exe: String, comm: String, uid: UInt32, gid: UInt32, cgroup: UInt64) {
        self.pid = pid; self.tid = tid; self.exe = exe; self.comm = comm
        self.uid = uid; self.gid = gid; self.cgroup = cgroup
    }
}

/// Counters the kernel reports when a TCP flow closes (UDP: what the agent counted).
public struct CloseStats: Codable, Sendable, Hashable {
    public var segmentsOut: UInt32
    public var segmentsIn: UInt32
    public var retransmits: UInt32
    public var smoothedRTTMicroseconds: UInt32

    public init(segmentsOut: UInt32 = 0, segmentsIn: UInt32 = 0, retransmits: UInt32 = 0, smoothedRTTMicroseconds: UInt32 = 0) {
        self.segmentsOut = segmentsOut; self.segmentsIn = segmentsIn
        self.retransmits = retransmits; self.smoothedRTTMicroseconds = smoothedRTTMicroseconds
    }

    enum CodingKeys: String, CodingKey {
        case segmentsOut = "segments_out", segmentsIn = "segments_in", retransmits
        case smoothedRTTMicroseconds = "srtt_us"
    }
}

/// One flow as flowtag reports it: identity, owner, counters.
public struct FlowRecord: Codable, Sendable, Hashable {
    /// Socket cookie: the flow handle, stable across every layer of the flow.
    public var flow: UInt64
    /// Network-namespace cookie: qualifies the flow handle and the 5-tuple.
    public var netns: UInt64
    public var `protocol`: FlowProtocol
    public var family: AddressFamily
    public var direction: FlowDirection
    public var local: Endpoint
    public var remote: Endpoint
    public var process: ProcessOwner
    public var attribution: Attribution
    public var bytesSent: UInt64
    public var bytesReceived: UInt64
    /// Boot-time nanoseconds of the open; converted to wall time for display.
    public var openedAt: WallTime
    public var closedAt: WallTime?
    /// Why it ended: `fin`, `reset`, `closed` (TCP), `released` or `idle` (UDP).
    public var closeReason: String?
    public var stats: CloseStats?
    /// The kernel's boot-clock nanoseconds of the open (0 when not from the kernel): with
    /// the cookie, it names the flow exactly across agent restarts (wall time is derived
    /// with an offset each process reads anew). Not part of the JSON.
    public var openedBootNanoseconds: UInt64 = 0

    public init(flow: UInt64, netns: UInt64, protocol: FlowProtocol, family: AddressFamily, direction: FlowDirection,
                local: Endpoint, remote: Endpoint, process: ProcessOwner, attribution: Attribution,
                bytesSent: UInt64 = 0, bytesReceived: UInt64 = 0, openedAt: WallTime, closedAt: WallTime? = nil,
                closeReason: String? = nil, stats: CloseStats? = nil) {
        self.flow = flow; self.netns = netns; self.protocol = `protocol`; self.family = family
        self.direction = direction; self.local = local; self.remote = remote; self.process = process
        self.attribution = attribution; self.bytesSent = bytesSent; self.bytesReceived = bytesReceived
        self.openedAt = openedAt; self.closedAt = closedAt; self.closeReason = closeReason; self.stats = stats
    }

    enum CodingKeys: String, CodingKey {
        case flow, netns, `protocol`, family, direction, local, remote, process, attribution
        case bytesSent = "bytes_sent", bytesReceived = "bytes_received"
        case openedAt = "opened_at", closedAt = "closed_at", closeReason = "close_reason", stats
    }
}

public enum FlowEventKind: String, Codable, Sendable {
    case open, close
    /// Bytes a capture stream callout took from a relayed flow (watch --payload).
    case payload
}

/// Captured bytes of a relayed flow: where in which direction's stream they start.
public struct FlowPayload: Codable, Sendable, Hashable {
    /// `send` (what the owning process sent) or `receive`.
    public var direction: String
    public var offset: Int
    public var data: [UInt8]

    public init(direction: String, offset: Int, data: [UInt8]) {
        self.direction = direction; self.offset = offset; self.data = data
    }

    enum CodingKeys: String, CodingKey { case direction, offset, length, dataBase64 = "data_base64" }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        direction = try c.decode(String.self, forKey: .direction)
        offset = try c.decode(Int.self, forKey: .offset)
        guard let d = Data(base64Encoded: try c.decode(String.self, forKey: .dataBase64)) else {
            throw DecodingError.dataCorruptedError(forKey: .dataBase64, in: c, debugDescription: "not base64")
        }
        data = Array(d)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(direction, forKey: .direction)
        try c.encode(offset, forKey: .offset)
        try c.encode(data.count, forKey: .length)
        try c.encode(Data(data).base64EncodedString(), forKey: .dataBase64)
    }
}

/// Where a close waits in the kernel until the journal holds it, so that a crash of the
/// agent in between loses nothing: the flow's own entry in the TCP flow map (marked
/// closed by the kernel), or the agent's outbox map. Given back once journaled.
public enum CloseReceipt: Sendable, Hashable {
    /// The flow's TCP entry (or the copy the kernel moved to the outbox when the socket
    /// connected again), named by cookie and the kernel's open time.
    case tcpEntry(cookie: UInt64, openedNanoseconds: UInt64)
    case outbox(key: UInt64)
}

/// A flow opening or closing, as `flowtagd --json` prints it: one JSON object a line.
public struct FlowEvent: Sendable, Hashable, Encodable {
    public var kind: FlowEventKind
    public var time: WallTime
    public var record: FlowRecord
    /// Only for `payload` events.
    public var payload: FlowPayload?
    /// Only for `close` events: what to give back once the close is journaled.
    public var receipt: CloseReceipt?

    public init(kind: FlowEventKind, time: WallTime, record: FlowRecord, payload: FlowPayload? = nil, receipt: CloseReceipt? = nil) {
        self.kind = kind; self.time = time; self.record = record; self.payload = payload; self.receipt = receipt
    }

    enum CodingKeys: String, CodingKey { case event, time, payload }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(kind, forKey: .event)
        try c.encode(time, forKey: .time)
        try c.encodeIfPresent(payload, forKey: .payload)
        try record.encode(to: encoder)
    }
}
