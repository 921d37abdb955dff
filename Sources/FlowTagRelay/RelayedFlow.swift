#if canImport(Glibc)
import Glibc
#endif
import DequeModule
import FlowContext
import FlowTagCore
import Synchronization

/// One relayed connection: the agent's socket facing the process (accepted from its
/// listener) and the one facing the peer (connected to the original destination), and
/// per direction the bytes the callouts let through that wait to be written.
///
/// `send` is process → peer (read from `processSide`, written to `peerSide`), `receive`
/// the other way. The relay thread reads, writes and closes; the session may deliver
/// from other threads too (out-of-band injection), so the output is locked.
final class RelayedFlow: StreamSink, @unchecked Sendable {
    let cookie: UInt64
    let netns: UInt64
    let processSide: Int32
    var peerSide: Int32 = -1
    /// The process's address (as the peer sees it) and the original destination.
    let source: SocketAddress
    let destination: SocketAddress
    var record: FlowRecord
    var session: StreamSession?
    /// Outbound: the agent accepted the process's socket and connects `peerSide`.
    /// Inbound: the agent accepted the client's connection (`peerSide`) and connects
    /// `processSide` to the server from `inboundEndpoint`.
    var inboundEndpoint: SocketAddress?
    var isInbound: Bool { inboundEndpoint != nil }
    /// The socket whose connect the agent made (writable when it finished).
    var connectingSide: Int32 { isInbound ? processSide : peerSide }
    var connected = false
    /// A read returned end of file (the FIN came), per direction.
    var readClosed = [false, false]
    /// The FIN went on (shutdown of the writing side), per direction.
    var finForwarded = [false, false]
    /// The agent is stopping and this flow has been told its streams end.
    var draining = false
    /// On the sockmap fast path (relay thread only), and whether the kernel refused it.
    var splice: SplicedFlow?
    var fastPathRefused = false
    /// epoll interest of each socket as last set.
    var interest: [Int32: UInt32] = [:]

    private struct Output {
        var chunks = Deque<[UInt8]>()
        /// Bytes of chunks[0] already written.
        var offset = 0
        var bytes = 0
        /// Every byte before the FIN has been delivered into the output.
        var fin = false
    }
    private struct State {
        var output = [Output(), Output()]
        var aborted = false
    }
    private let state = Mutex(State())
    private let onDelivery: @Sendable (RelayedFlow) -> Void
    let counters: RelayCounters

    init(cookie: UInt64, netns: UInt64, processSide: Int32, source: SocketAddress, destination: SocketAddress,
         record: FlowRecord, counters: RelayCounters, onDelivery: @escaping @Sendable (RelayedFlow) -> Void) {
        self.cookie = cookie; self.netns = netns; self.processSide = processSide
        self.source = source; self.destination = destination; self.record = record
        self.counters = counters; self.onDelivery = onDelivery
    }

    static func index(_ d: StreamDirection) -> Int { d == .send ? 0 : 1 }

    /// The socket a direction is read from and the one it is written to.
    func reader(_ d: StreamDirection) -> Int32 { d == .send ? processSide : peerSide }
    func writer(_ d: StreamDirection) -> Int32 { d == .send ? peerSide : processSide }

    var isAborted: Bool { state.withLock { $0.aborted } }
    func pendingBytes(_ d: StreamDirection) -> Int { state.withLock { $0.output[Self.index(d)].bytes } }
    func finPending(_ d: StreamDirection) -> Bool {
        state.withLock { $0.output[Self.index(d)].fin && $0.output[Self.index(d)].bytes == 0 }
    }

    /// Bytes that came in, given to the callouts (or straight to the output without any).
    func received(_ bytes: [UInt8], _ d: StreamDirection) {
        if let session, !session.passesThrough(d) { session.indicate(bytes, direction: d) } else { deliver(bytes, direction: d) }
    }

    /// The FIN of a direction came in: indicated after every byte before it.
    func receivedFIN(_ d: StreamDirection) {
        // Always through the session: the callouts that allowed the connection are not
        // told, the others are (and the FIN follows their last bytes).
        if let session { session.indicate([], direction: d, flags: .disconnect) } else { disconnect(direction: d) }
    }

    // MARK: StreamSink

    func deliver(_ bytes: [UInt8], direction: StreamDirection) {
        guard !bytes.isEmpty else { return }
        let ok = state.withLock { s -> Bool in
            guard !s.aborted else { return false }
            let i = Self.index(direction)
            s.output[i].chunks.append(bytes)
            s.output[i].bytes += bytes.count
            return true
        }
        if ok { onDelivery(self) } else { counters.bytesUndeliverable.add(UInt64(bytes.count), ordering: .relaxed) }
    }

    func disconnect(direction: StreamDirection) {
        state.withLock { $0.output[Self.index(direction)].fin = true }
        onDelivery(self)
    }

    /// A callout dropped the connection, or either side reset it: both sides are reset.
    func abort() {
        let dropped = state.withLock { s -> Int in
            guard !s.aborted else { return 0 }
            s.aborted = true
            let n = s.output[0].bytes + s.output[1].bytes
            s.output = [Output(), Output()]
            return n
        }
        counters.bytesUndeliverable.add(UInt64(dropped), ordering: .relaxed)
        onDelivery(self)
    }

    /// Writes what waits for one direction without blocking (until the socket takes no
    /// more). Returns the bytes written; throws the errno of a write that failed for good.
    func flush(_ d: StreamDirection) throws(RelayError) -> Int {
        let fd = writer(d)
        guard fd >= 0 else { return 0 }
        return try state.withLock { s throws(RelayError) -> Int in
            let i = Self.index(d)
            var written = 0
            while let first = s.output[i].chunks.first {
                let offset = s.output[i].offset
                let n = first.withUnsafeBytes { send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL)) }
                if n < 0 {
                    if errno == EAGAIN || errno == EINTR || errno == ENOBUFS || errno == ENOMEM { return written }
                    throw RelayError.io(errno)
                }
                written += n
                s.output[i].bytes -= n
                s.output[i].offset += n
                if d == .send { counters.bytesToPeer.add(UInt64(n), ordering: .relaxed) } else { counters.bytesToProcess.add(UInt64(n), ordering: .relaxed) }
                if s.output[i].offset == first.count {
                    s.output[i].chunks.removeFirst()
                    s.output[i].offset = 0
                } else {
                    return written
                }
            }
            return written
        }
    }
}

/// Why a relayed connection ended abnormally.
enum RelayError: Error {
    case io(Int32)
}
