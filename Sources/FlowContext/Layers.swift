import FlowTagCore

/// IP version of a layer.
public enum IPVersion: String, Sendable, Hashable, CaseIterable {
    case v4, v6
}

/// A filtering layer: WFP's layer identifiers, each for IPv4 and IPv6.
///
/// | WFP | Linux hook flowtag uses |
/// |---|---|
/// | `ALE_AUTH_CONNECT` | `cgroup/connect4/6` |
/// | `ALE_AUTH_RECV_ACCEPT` | accept completion |
/// | `ALE_FLOW_ESTABLISHED` | `sock_ops` established |
/// | `OUTBOUND/INBOUND_TRANSPORT` | `cgroup_skb` egress/ingress |
/// | `STREAM` | `sk_msg` / `sk_skb` relay |
/// | `DATAGRAM_DATA` | `cgroup/sendmsg`, `recvmsg` |
public enum Layer: Sendable, Hashable, CustomStringConvertible {
    case aleAuthConnect(IPVersion)
    case aleAuthRecvAccept(IPVersion)
    case aleFlowEstablished(IPVersion)
    case outboundTransport(IPVersion)
    case inboundTransport(IPVersion)
    case stream(IPVersion)
    case datagramData(IPVersion)

    public var version: IPVersion {
        switch self {
        case .aleAuthConnect(let v), .aleAuthRecvAccept(let v), .aleFlowEstablished(let v),
             .outboundTransport(let v), .inboundTransport(let v), .stream(let v), .datagramData(let v):
            return v
        }
    }

    /// ALE layers are the ones where WFP itself supplies process id and path.
    public var isALE: Bool {
        switch self {
        case .aleAuthConnect, .aleAuthRecvAccept, .aleFlowEstablished: return true
        default: return false
        }
    }

    public static let all: [Layer] = IPVersion.allCases.flatMap { v in
        [.aleAuthConnect(v), .aleAuthRecvAccept(v), .aleFlowEstablished(v), .outboundTransport(v),
         .inboundTransport(v), .stream(v), .datagramData(v)]
    }

    public var description: String {
        switch self {
        case .aleAuthConnect(let v): return "ale_auth_connect_\(v)"
        case .aleAuthRecvAccept(let v): return "ale_auth_recv_accept_\(v)"
        case .aleFlowEstablished(let v): return "ale_flow_established_\(v)"
        case .outboundTransport(let v): return "outbound_transport_\(v)"
        case .inboundTransport(let v): return "inbound_transport_\(v)"
        case .stream(let v): return "stream_\(v)"
        case .datagramData(let v): return "datagram_data_\(v)"
        }
    }
}

/// The flow handle: a socket cookie, qualified by the network namespace's cookie.
/// It is the same at every layer of one flow.
public struct FlowHandle: Sendable, Hashable, CustomStringConvertible {
    public var cookie: UInt64
    public var netns: UInt64

    public init(cookie: UInt64, netns: UInt64 = 0) {
        self.cookie = cookie
        self.netns = netns
    }

    public var description: String { "flow(\(cookie)@\(netns))" }
}

/// The flow's direction and transport as flowtag reports them everywhere (FlowTagCore's
/// types): WFP's FWPS_FIELD_*_DIRECTION and _IP_PROTOCOL conditions test these.
public typealias Direction = FlowDirection
public typealias TransportProtocol = FlowProtocol

/// Incoming values of a classify: what the packet or connection says.
public struct IncomingValues: Sendable, Hashable {
    public var localAddress: IPAddress
    public var localPort: UInt16
    public var remoteAddress: IPAddress
    public var remotePort: UInt16
    public var `protocol`: TransportProtocol
    public var direction: Direction

    public init(localAddress: IPAddress, localPort: UInt16, remoteAddress: IPAddress, remotePort: UInt16,
                protocol: TransportProtocol, direction: Direction) {
        self.localAddress = localAddress; self.localPort = localPort
        self.remoteAddress = remoteAddress; self.remotePort = remotePort
        self.protocol = `protocol`; self.direction = direction
    }
}

/// Metadata of a classify. Unlike WFP, process id and path are present at every layer.
public struct Metadata: Sendable, Hashable {
    public var flow: FlowHandle
    public var processID: UInt32
    public var threadID: UInt32
    public var processPath: String
    public var userID: UInt32
    public var cgroupID: UInt64

    public init(flow: FlowHandle, processID: UInt32, threadID: UInt32 = 0, processPath: String,
                userID: UInt32 = 0, cgroupID: UInt64 = 0) {
        self.flow = flow; self.processID = processID; self.threadID = threadID
        self.processPath = processPath; self.userID = userID; self.cgroupID = cgroupID
    }
}
