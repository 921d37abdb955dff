import Foundation

/// Direction of a stream indication (`FWPS_STREAM_FLAG_SEND` / `_RECEIVE`).
public enum StreamDirection: String, Sendable, Hashable, CaseIterable {
    case send, receive
}

/// Flags of a stream indication or injection (`FWPS_STREAM_FLAG_*`).
public struct StreamFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let send = StreamFlags(rawValue: 1 << 0)
    public static let receive = StreamFlags(rawValue: 1 << 1)
    public static let expedited = StreamFlags(rawValue: 1 << 2)
    /// PSH on receive, TCP_NODELAY-like on send.
    public static let push = StreamFlags(rawValue: 1 << 3)
    /// FIN: a zero-length indication, always with `noMoreData`.
    public static let disconnect = StreamFlags(rawValue: 1 << 4)
    public static let noMoreData = StreamFlags(rawValue: 1 << 5)
    /// RST.
    public static let abort = StreamFlags(rawValue: 1 << 6)
    /// The callout asked for more data past the buffer limit: it must take what it has.
    public static let bufferLimitReached = StreamFlags(rawValue: 1 << 7)

    public static func direction(_ d: StreamDirection) -> StreamFlags { d == .send ? .send : .receive }
}

/// What a stream callout sees: the bytes waiting at its position, from its current offset.
public struct StreamIndication: Sendable {
    public var flow: FlowHandle
    public var direction: StreamDirection
    public var flags: StreamFlags
    public var data: [UInt8]
    /// Bytes of the flow this callout did not see (always 0 in flowtag: nothing is skipped).
    public var missedBytes: Int
    /// The owning process, in every indication (WFP has none at the stream layer).
    public var metadata: Metadata
}

/// The stream action of a decision (`FWPS_STREAM_ACTION_TYPE`).
public enum StreamAction: Sendable, Hashable {
    case none
    /// Deliver nothing; indicate the same bytes again, with more appended, once at least
    /// `n` bytes are waiting. Not allowed with `noMoreData`.
    case needMoreData(Int)
    /// No more indications for this flow (the callout's flowDelete still fires).
    case allowConnection
    /// Reset the flow: honoured for terminating callouts, ignored for inspection ones.
    case dropConnection
    /// Receive side: hold everything until `StreamSession.continueIndications(from:direction:)`.
    case `defer`
}

/// A stream callout's answer.
public struct StreamDecision: Sendable, Hashable {
    public var action: Action
    public var streamAction: StreamAction
    /// Apply `action` to the first k bytes; the rest is indicated again at once. nil: all.
    public var countBytesEnforced: Int?

    public init(_ action: Action = .permit, _ streamAction: StreamAction = .none, countBytesEnforced: Int? = nil) {
        self.action = action; self.streamAction = streamAction; self.countBytesEnforced = countBytesEnforced
    }
    public static let permit = StreamDecision(.permit)
    public static let block = StreamDecision(.block)
    public static func permit(_ k: Int) -> StreamDecision { StreamDecision(.permit, countBytesEnforced: k) }
    public static func block(_ k: Int) -> StreamDecision { StreamDecision(.block, countBytesEnforced: k) }
    public static func needMoreData(_ n: Int) -> StreamDecision { StreamDecision(.permit, .needMoreData(n)) }
}

/// A stream callout in one sublayer (`FWPS_LAYER_STREAM`).
public struct StreamCallout: Sendable {
    public var name: String
    /// Sublayer weight: higher runs first; a byte reaches a callout only if every higher one permitted it.
    public var weight: UInt16
    /// The filter's type: terminating callouts may drop the connection, inspection ones may not.
    public var isTerminating: Bool
    /// When set, the callout is indicated only for flows it holds (conditional on flow).
    public var appliesTo: (@Sendable (FlowHandle) -> Bool)?
    public var classify: @Sendable (StreamIndication, StreamInjector) -> StreamDecision

    public init(name: String, weight: UInt16, isTerminating: Bool = true,
                appliesTo: (@Sendable (FlowHandle) -> Bool)? = nil,
                classify: @escaping @Sendable (StreamIndication, StreamInjector) -> StreamDecision) {
        self.name = name; self.weight = weight; self.isTerminating = isTerminating
        self.appliesTo = appliesTo; self.classify = classify
    }
}

/// Where a session's surviving bytes go: the relayed connection, or a test buffer.
public protocol StreamSink: AnyObject, Sendable {
    func deliver(_ bytes: [UInt8], direction: StreamDirection)
    func disconnect(direction: StreamDirection)
    func abort()
}

/// Injects bytes below one callout (`FwpsStreamInjectAsync`), from inside its classify or
/// later from anywhere else (out-of-band editing).
public struct StreamInjector: Sendable {
    let session: StreamSession
    let stage: Int

    /// - Bytes land where the callout removed blocked bytes, in call order; the injecting
    ///   callout never sees them, lower-weight callouts do.
    /// - `disconnect` without `send`/`receive` → `invalidParameter`; bytes without a
    ///   completion → `nullPointer`; empty bytes only with `disconnect` (no completion then).
    /// - One completion per injected buffer; none when the call fails; none after abort.
    @discardableResult
    public func inject(flags: StreamFlags, data: [UInt8], completion: (@Sendable (Status) -> Void)?) -> Status {
        session.inject(stage: stage, flags: flags, data: data, completion: completion)
    }
}

/// One flow's stream: both directions through the callouts' waterfall into a sink.
///
/// Feed it with `indicate(_:direction:flags:)` (the byte source) as data arrives; it
/// indicates to each callout in weight order and delivers what survives.
public final class StreamSession: @unchecked Sendable {
    public let flow: FlowHandle
    /// The owner given with every indication. It may change once (an accepted flow
    /// starts with the listener's owner and becomes the accepting process's).
    public var metadata: Metadata {
        get { lock.lock(); defer { lock.unlock() }; return currentMetadata }
        set { lock.lock(); currentMetadata = newValue; lock.unlock() }
    }
    private var currentMetadata: Metadata
    public let bufferLimit: Int
    private let callouts: [StreamCallout]
    private let sink: StreamSink
    private let lock = NSRecursiveLock()
    private var pipes: [StreamDirection: [Stage]] = [:]
    private var classifying = 0
    private var aborted = false

    private struct Segment {
        var bytes: [UInt8]
        var completion: (@Sendable (Status) -> Void)?
    }

    private enum Mode: Equatable { case active, needMore(Int), deferred, allowed }

    private struct Stage {
        var queue: [Segment] = []
        var queued = 0
        var finPending = false
        var finDone = false
        var mode: Mode = .active
        /// push/expedited given with data, passed on with the next indication.
        var carried: StreamFlags = []
    }

    /// WFP's stream buffer limit for needMoreData is 8 MB.
    public init(flow: FlowHandle, metadata: Metadata, callouts: [StreamCallout], sink: StreamSink, bufferLimit: Int = 8 << 20) {
        self.flow = flow
        self.currentMetadata = metadata
        self.callouts = callouts.sorted { $0.weight > $1.weight }
        self.sink = sink
        self.bufferLimit = bufferLimit
        for d in StreamDirection.allCases { pipes[d] = Array(repeating: Stage(), count: self.callouts.count + 1) }
    }

    /// New bytes from the flow (and/or its FIN, with `.disconnect`).
    public func indicate(_ data: [UInt8], direction: StreamDirection, flags: StreamFlags = []) {
        lock.lock(); defer { lock.unlock() }
        guard !aborted else { return }
        if !data.isEmpty { enqueue(direction, 0, Segment(bytes: data, completion: nil)) }
        if flags.contains(.disconnect) { pipes[direction]![0].finPending = true }
        pipes[direction]![0].carried.formUnion(flags.intersection([.push, .expedited]))
        pump(direction, from: 0)
    }

    /// The flow was reset: every callout is told (`abort`), nothing more is delivered.
    public func abort() {
        lock.lock(); defer { lock.unlock() }
        guard !aborted else { return }
        aborted = true
        for d in StreamDirection.allCases {
            for i in callouts.indices where pipes[d]![i].mode != .allowed && applies(i) {
                let ind = StreamIndication(flow: flow, direction: d, flags: StreamFlags.direction(d).union(.abort),
                                           data: [], missedBytes: 0, metadata: currentMetadata)
                classifying += 1
                _ = callouts[i].classify(ind, StreamInjector(session: self, stage: i))
                classifying -= 1
            }
            for i in pipes[d]!.indices { dropQueue(d, i, status: .unsuccessful) }
        }
        sink.abort()
    }

    /// Resumes a callout that deferred the receive side. From inside a classify → `invalidParameter`.
    @discardableResult
    public func continueIndications(from calloutName: String, direction: StreamDirection = .receive) -> Status {
        lock.lock(); defer { lock.unlock() }
        guard classifying == 0 else { return .invalidParameter }
        guard let i = callouts.firstIndex(where: { $0.name == calloutName }) else { return .calloutNotFound }
        guard pipes[direction]![i].mode == .deferred else { return .unsuccessful }
        pipes[direction]![i].mode = .active
        pump(direction, from: i)
        return .success
    }

    /// The injector of a callout by name, for out-of-band injection from elsewhere.
    public func injector(for calloutName: String) -> StreamInjector? {
        callouts.firstIndex { $0.name == calloutName }.map { StreamInjector(session: self, stage: $0) }
    }

    /// Whether every callout has allowed the connection (or does not apply) in this
    /// direction and nothing waits in it: the byte source may then deliver straight to
    /// the sink (WFP: no more indications after allow-connection).
    public func passesThrough(_ d: StreamDirection) -> Bool {
        lock.lock(); defer { lock.unlock() }
        guard !aborted, let stages = pipes[d] else { return false }
        for i in stages.indices {
            if stages[i].queued > 0 || stages[i].finPending { return false }
            if i < callouts.count && stages[i].mode != .allowed && applies(i) { return false }
        }
        return true
    }

    /// Bytes waiting anywhere in the session (held by needMoreData or defer).
    public var heldBytes: Int {
        lock.lock(); defer { lock.unlock() }
        return pipes.values.reduce(0) { $0 + $1.reduce(0) { $0 + $1.queued } }
    }

    // MARK: - Internals (lock held)

    func inject(stage: Int, flags: StreamFlags, data: [UInt8], completion: (@Sendable (Status) -> Void)?) -> Status {
        let hasDirection = flags.contains(.send) || flags.contains(.receive)
        if flags.contains(.disconnect) && !hasDirection { return .invalidParameter }
        guard hasDirection, !(flags.contains(.send) && flags.contains(.receive)) else { return .invalidParameter }
        if data.isEmpty {
            guard flags.contains(.disconnect) else { return .invalidParameter }
        } else if completion == nil {
            return .nullPointer
        }
        lock.lock(); defer { lock.unlock() }
        if aborted { return .unsuccessful }
        let d: StreamDirection = flags.contains(.send) ? .send : .receive
        let next = stage + 1
        if !data.isEmpty { enqueue(d, next, Segment(bytes: data, completion: completion)) }
        if flags.contains(.disconnect) { pipes[d]![next].finPending = true }
        // Inside a classify the running pump carries the bytes on; from outside, pump now.
        if classifying == 0 { pump(d, from: next) }
        return .success
    }

    private func applies(_ i: Int) -> Bool { callouts[i].appliesTo?(flow) ?? true }

    private func enqueue(_ d: StreamDirection, _ i: Int, _ s: Segment) {
        pipes[d]![i].queue.append(s)
        pipes[d]![i].queued += s.bytes.count
    }

    /// Removes the first k bytes of a stage's queue, returning them; segments fully
    /// consumed complete (their bytes were delivered or blocked downstream of the injector).
    private func take(_ d: StreamDirection, _ i: Int, _ k: Int) -> [UInt8] {
        // The common case, a whole first segment: its bytes move on without a copy.
        if k > 0, let first = pipes[d]![i].queue.first, first.bytes.count == k {
            pipes[d]![i].queue.removeFirst()
            pipes[d]![i].queued -= k
            first.completion?(.success)
            return first.bytes
        }
        var out: [UInt8] = []
        out.reserveCapacity(k)
        var left = k
        while left > 0, !pipes[d]![i].queue.isEmpty {
            var seg = pipes[d]![i].queue.removeFirst()
            if seg.bytes.count <= left {
                out += seg.bytes
                left -= seg.bytes.count
                seg.completion?(.success)
            } else {
                out += seg.bytes[0..<left]
                seg.bytes.removeFirst(left)
                left = 0
                pipes[d]![i].queue.insert(seg, at: 0)
            }
        }
        pipes[d]![i].queued -= out.count
        return out
    }

    private func dropQueue(_ d: StreamDirection, _ i: Int, status: Status) {
        for s in pipes[d]![i].queue { s.completion?(status) }
        pipes[d]![i].queue.removeAll()
        pipes[d]![i].queued = 0
    }

    private func forward(_ d: StreamDirection, _ i: Int, _ bytes: [UInt8], flags: StreamFlags = []) {
        guard !bytes.isEmpty else { return }
        pipes[d]![i + 1].carried.formUnion(flags)
        enqueue(d, i + 1, Segment(bytes: bytes, completion: nil))
    }

    private func pump(_ d: StreamDirection, from start: Int) {
        var i = start
        while i <= callouts.count && !aborted {
            if i == callouts.count {
                deliverToSink(d)
            } else {
                runStage(d, i)
            }
            i += 1
        }
    }

    private func deliverToSink(_ d: StreamDirection) {
        let last = callouts.count
        let bytes = take(d, last, pipes[d]![last].queued)
        if !bytes.isEmpty { sink.deliver(bytes, direction: d) }
        if pipes[d]![last].finPending && !pipes[d]![last].finDone {
            pipes[d]![last].finDone = true
            sink.disconnect(direction: d)
        }
    }

    private func runStage(_ d: StreamDirection, _ i: Int) {
        let callout = callouts[i]
        while !aborted {
            let stage = pipes[d]![i]
            if stage.finDone { return }
            let hasData = stage.queued > 0
            if !hasData && !stage.finPending { return }

            if stage.mode == .allowed || !applies(i) {
                forward(d, i, take(d, i, stage.queued))
                if stage.finPending { pipes[d]![i].finDone = true; pipes[d]![i + 1].finPending = true }
                return
            }
            if stage.mode == .deferred { return }
            if case .needMore(let n) = stage.mode, stage.queued < n, !stage.finPending, stage.queued < bufferLimit { return }

            var flags = StreamFlags.direction(d).union(stage.carried)
            pipes[d]![i].carried = []
            let data: [UInt8] = !hasData ? [] : stage.queue.count == 1 ? stage.queue[0].bytes : stage.queue.flatMap(\.bytes)
            if stage.finPending { flags.insert(.noMoreData) }
            if !hasData { flags.insert(.disconnect) }
            let limitReached = hasData && data.count >= bufferLimit
            if limitReached { flags.insert(.bufferLimitReached) }
            let ind = StreamIndication(flow: flow, direction: d, flags: flags, data: data, missedBytes: 0, metadata: currentMetadata)
            classifying += 1
            let decision = callout.classify(ind, StreamInjector(session: self, stage: i))
            classifying -= 1
            if aborted { return }
            pipes[d]![i].mode = .active

            if !hasData {
                // The FIN indication: whatever the answer, the FIN moves on (a drop resets).
                if decision.streamAction == .dropConnection && callout.isTerminating { abortFromCallout(); return }
                pipes[d]![i].finDone = true
                pipes[d]![i + 1].finPending = true
                return
            }

            switch decision.streamAction {
            case .needMoreData(let n) where !flags.contains(.noMoreData) && !limitReached:
                pipes[d]![i].mode = .needMore(max(n, data.count + 1))
                return
            case .defer where d == .receive:
                pipes[d]![i].mode = .deferred
                return
            case .allowConnection:
                if decision.action == .block {
                    _ = take(d, i, min(decision.countBytesEnforced ?? data.count, data.count))
                }
                pipes[d]![i].mode = .allowed
                continue
            case .dropConnection where callout.isTerminating:
                abortFromCallout()
                return
            default:
                break // .none, and actions that do not apply here
            }
            var k = decision.countBytesEnforced ?? data.count
            if k <= 0 || k > data.count { k = data.count }
            let bytes = take(d, i, k)
            if decision.action != .block { forward(d, i, bytes, flags: flags.intersection([.push, .expedited])) }
        }
    }

    private func abortFromCallout() {
        aborted = true
        for d in StreamDirection.allCases { for i in pipes[d]!.indices { dropQueue(d, i, status: .unsuccessful) } }
        sink.abort()
    }
}
