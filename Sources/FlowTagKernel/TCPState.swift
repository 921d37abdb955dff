/// A TCP state as the kernel numbers it (include/net/tcp_states.h): one name for the
/// numbers the BPF programs, sock_diag and TCP_INFO report.
public enum TCPState: UInt8, Sendable, CaseIterable {
    case established = 1, synSent, synReceived, finWait1, finWait2, timeWait, close, closeWait, lastAck, listen, closing, newSynReceived

    /// An unknown number becomes `.close` (what the kernel reports for a socket gone).
    public init(_ raw: UInt32) { self = TCPState(rawValue: UInt8(truncatingIfNeeded: raw)) ?? .close }

    /// How a connection that was in this state ended: straight from ESTABLISHED or a
    /// handshake state is a reset; from a FIN state an orderly close.
    public var closeReason: String {
        switch self {
        case .established, .synSent, .synReceived: return "reset"
        case .finWait1, .finWait2, .timeWait, .closeWait, .lastAck, .closing: return "fin"
        default: return "closed"
        }
    }

    /// sock_diag's state filter bit.
    public var diagBit: UInt32 { 1 << UInt32(rawValue) }
}
