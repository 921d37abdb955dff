import FlowTagKernel
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Who is asking: from SO_PEERCRED on the connection.
public struct PeerCredentials: Sendable, Equatable {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32

    /// root and members of `group` see every flow; others only their own.
    public func seesEverything(group: gid_t?) -> Bool {
        if uid == 0 { return true }
        guard let group else { return false }
        if gid == group { return true }
        // Supplementary groups of the peer process.
        guard let status = try? readFile("/proc/\(pid)/status") else { return false }
        for line in status.split(separator: "\n") where line.hasPrefix("Groups:") {
            return line.dropFirst(7).split(whereSeparator: { $0 == " " || $0 == "\t" }).contains { gid_t($0) == group }
        }
        return false
    }
}

/// The query API: HTTP/1.1 with JSON bodies on a unix socket (`curl --unix-socket` works).
///
/// | request | answer |
/// |---|---|
/// | `GET /v1/flows?FILTERS` | `{"flows":[…]}` |
/// | `GET /v1/lookup?proto=tcp&local=IP:PORT&remote=IP:PORT[&netns=N]` | `{"flows":[…]}`, 404 when none |
/// | `GET /v1/watch?FILTERS[&payload=1]` | chunked JSON lines, one per event, until the client goes; `payload=1` adds capture callouts' bytes |
/// | `GET /v1/history?since=…&until=…&FILTERS` | closed flows from the journal |
/// | `GET /v1/stats` | counters |
/// | `GET /v1/version` | `{"version":…}` |
public final class APIServer: @unchecked Sendable {
    public let socketPath: String
    let table: FlowTable
    let lost: @Sendable () -> UInt64
    let group: gid_t?
    private let elg = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let budget = ResponseBudget()
    private var channel: Channel?

    /// `group`: the socket's group (see `GroupLookup`), nil for root alone.
    public init(table: FlowTable, socketPath: String, group: gid_t?, lostEvents: @escaping @Sendable () -> UInt64) {
        self.table = table
        self.socketPath = socketPath
        self.lost = lostEvents
        self.group = group
    }

    private var staging: String?

    /// Binds the socket under a temporary name beside its path, owned by root and the
    /// socket group, mode 0660: nobody can reach it before its permissions are final, and
    /// nothing answers at the path until `publish()`.
    public func bind() throws {
        try APISocketPath.check(socketPath)
        let dir = (socketPath as NSString).deletingLastPathComponent
        if !dir.isEmpty { try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
        let table = self.table, lost = self.lost, group = self.group, budget = self.budget
        let connections = ConnectionCounter(max: Self.maxConnections)
        let bootstrap = ServerBootstrap(group: elg)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .childChannelOption(ChannelOptions.writeBufferWaterMark, value: .init(low: 32 << 10, high: 64 << 10))
            .childChannelInitializer { channel in
                channel.pipeline.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(ConnectionLimit(connections))
                    // Parse errors are answered by APIHandler, after the answers before them.
                    try sync.configureHTTPServerPipeline(withErrorHandling: false)
                    try sync.addHandler(IdleStateHandler(readTimeout: .seconds(10)))
                    try sync.addHandler(APIHandler(table: table, lost: lost, group: group, budget: budget))
                }
            }
        let staging = socketPath + ".\(getpid()).new"
        unlink(staging)
        let oldMask = umask(0o117)
        defer { umask(oldMask) }
        channel = try bootstrap.bind(unixDomainSocketPath: staging).wait()
        self.staging = staging
        chmod(staging, 0o660)
        if let group { chown(staging, 0, group) }
    }

    /// The published socket's inode: `stop` removes the path only while it is still ours.
    private var publishedInode: ino_t?

    /// Puts the bound socket at its path (replacing a stale socket checked by `bind`).
    public func publish() throws {
        guard let staging else { return }
        try APISocketPath.check(socketPath)
        guard rename(staging, socketPath) == 0 else {
            throw KernelError.system("publish the API socket at \(socketPath)", errno)
        }
        self.staging = nil
        publishedInode = APISocketPath.socketInode(socketPath)
    }

    /// Connections served at once; more are answered 503 and closed.
    public static let maxConnections = 1024

    public func stop() {
        try? channel?.close().wait()
        if let staging { unlink(staging) }
        if let ours = publishedInode, APISocketPath.socketInode(socketPath) == ours { unlink(socketPath) }
        try? elg.syncShutdownGracefully()
        budget.shutdown()
    }
}

/// `struct ucred` (Glibc exposes it only with _GNU_SOURCE): pid, uid, gid.
struct RawPeerCred { var pid: Int32 = 0; var uid: UInt32 = 0; var gid: UInt32 = 0 }

final class APIHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let table: FlowTable
    let lost: @Sendable () -> UInt64
    let group: gid_t?
    var head: HTTPRequestHead?
    var peer: PeerCredentials?
    var streaming = false
    var watch: WatchStream?

    let budget: ResponseBudget

    init(table: FlowTable, lost: @escaping @Sendable () -> UInt64, group: gid_t?, budget: ResponseBudget) {
        self.table = table; self.lost = lost; self.group = group; self.budget = budget
    }

    func channelActive(context: ChannelHandlerContext) {
        if let provider = context.channel as? SocketOptionProvider {
            let cred: EventLoopFuture<RawPeerCred> = provider.unsafeGetSocketOption(level: .init(rawValue: SOL_SOCKET),
                                                                              name: .init(rawValue: SO_PEERCRED))
            cred.whenSuccess { [self] c in peer = PeerCredentials(pid: c.pid, uid: c.uid, gid: c.gid) }
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        watch?.release()
        context.fireChannelInactive()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        watch?.writabilityChanged()
        context.fireChannelWritabilityChanged()
    }

    /// A request the HTTP decoder could not parse (garbage, an HTTP/2 preface, a header
    /// past the decoder's limit): the requests before it are answered in order, then this
    /// one gets a 400 and the connection is closed (never left open until the idle timeout).
    var failAfterAnswers = false

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // More bytes after an unparsable request come as dataReceivedInErrorState.
        guard error is HTTPParserError || error is ByteToMessageDecoderError else { context.close(promise: nil); return }
        if failAfterAnswers { return }
        if pendingAnswers > 0 || streaming { failAfterAnswers = true; return }
        refuseUnparsable(context)
    }

    private func refuseUnparsable(_ context: ChannelHandlerContext) {
        failAfterAnswers = false
        guard !streaming else { context.close(promise: nil); return }
        pendingAnswers += 1
        error(context, .badRequest, "not an HTTP/1.1 request this agent can parse")
    }

    /// Answers being made or written (pipelined requests wait their turn in NIO's pipeline
    /// handler, so their answers can queue up behind a large one): a connection is not
    /// idle while one is on its way, up to `answerLimit` since the last one began.
    var pendingAnswers = 0
    var answeringSince: NIODeadline?
    static let answerLimit = TimeAmount.seconds(60)

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // A client that sends nothing for 10 s is dropped; a watch stream is not, nor one
        // whose answer is still on its way (unless that takes past the limit).
        if event is IdleStateHandler.IdleStateEvent, !streaming {
            if pendingAnswers > 0, let since = answeringSince, NIODeadline.now() - since < Self.answerLimit { return }
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break // GET only: a body is ignored (and bounded by the decoder)
        case .end:
            guard let h = head else { return }
            head = nil
            pendingAnswers += 1
            answeringSince = .now()
            handle(context: context, head: h)
        }
    }

    /// Error answers are small and not counted against the budget (a refusal must always
    /// be possible).
    private func respond(_ context: ChannelHandlerContext, _ status: HTTPResponseStatus, _ body: String, keepAlive: Bool,
                         budgeted: Bool = true) {
        let length = body.utf8.count
        let size = budgeted ? length : 0
        guard budget.reserve(size) else {
            return error(context, .tooManyRequests, "the agent is busy answering other large requests: retry later")
        }
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "Content-Length", value: "\(length)")
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        let budget = self.budget
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        done.whenComplete { _ in
            budget.release(size)
            let handler = bound.value
            handler.pendingAnswers -= 1
            if handler.pendingAnswers == 0, handler.failAfterAnswers, context.channel.isActive { handler.refuseUnparsable(context) }
        }
        if !keepAlive { done.whenComplete { _ in context.close(promise: nil) } }
    }

    private func error(_ context: ChannelHandlerContext, _ status: HTTPResponseStatus, _ message: String) {
        respond(context, status, "{\"error\":\(EventLine.quoted(message))}\n", keepAlive: false, budgeted: false)
    }

    private func handle(context: ChannelHandlerContext, head: HTTPRequestHead) {
        guard head.method == .GET else { return error(context, .methodNotAllowed, "only GET is supported") }
        guard let peer else { return error(context, .forbidden, "peer credentials unavailable") }
        let uidFilter: UInt32? = peer.seesEverything(group: group) ? nil : peer.uid
        let (path, items) = parseRequestTarget(head.uri)
        let keepAlive = head.isKeepAlive
        switch path {
        case "/v1/version":
            respond(context, .ok, "{\"version\":\"\(flowtagVersion)\"}\n", keepAlive: keepAlive)
        case "/v1/stats":
            // Machine-wide counters tell of every user's flows: for those who see them all.
            guard uidFilter == nil else {
                return error(context, .forbidden, "stats are machine-wide: root or members of the socket's group only")
            }
            let data = (try? JSONEncoder().encode(table.stats())) ?? Data("{}".utf8)
            respond(context, .ok, String(decoding: data, as: UTF8.self) + "\n", keepAlive: keepAlive)
        case "/v1/flows":
            do {
                let filter = try FlowFilter(query: items)
                let entries = table.flows(filter, uid: uidFilter)
                respond(context, .ok, Self.flowsJSON(entries), keepAlive: keepAlive)
            } catch {
                self.error(context, .badRequest, error.description)
            }
        case "/v1/lookup":
            var proto = FlowProtocol.tcp, local: Endpoint?, remote: Endpoint?, netns: UInt64?
            for (k, v) in items {
                switch k {
                case "proto":
                    guard let p = FlowProtocol(rawValue: v) else { return error(context, .badRequest, "bad proto: \(v.clipped) is not tcp or udp") }
                    proto = p
                case "local":
                    guard let e = parseEndpoint(v) else { return error(context, .badRequest, "bad local: \(v.clipped) is not IP:PORT") }
                    local = e
                case "remote":
                    guard let e = parseEndpoint(v) else { return error(context, .badRequest, "bad remote: \(v.clipped) is not IP:PORT") }
                    remote = e
                case "netns":
                    guard let n = UInt64(v) else { return error(context, .badRequest, "bad netns: \(v.clipped) is not a number") }
                    netns = n
                default:
                    return error(context, .badRequest, "unknown parameter \(k.clipped) (known: proto, local, remote, netns)")
                }
            }
            guard let local, let remote else { return error(context, .badRequest, "lookup needs local=IP:PORT and remote=IP:PORT") }
            var found = table.lookup(proto: proto, local: local, remote: remote, netns: netns)
            if let uidFilter { found = found.filter { $0.process.uid == uidFilter } }
            if found.isEmpty { return error(context, .notFound, "no live \(proto.rawValue) flow \(local) -> \(remote)") }
            respond(context, .ok, Self.flowsJSON(found.map { FlowEntry(record: $0, state: .open) }), keepAlive: keepAlive)
        case "/v1/history":
            guard let journal = table.journal else { return error(context, .serviceUnavailable, "the journal is off (flowtagd --journal PATH)") }
            var since: WallTime?, until: WallTime?, rest: [(String, String)] = [], limit = 10000
            for (k, v) in items {
                switch k {
                case "since", "until":
                    guard let t = parseTimeBound(v) else { return error(context, .badRequest, "bad \(k): \(v.clipped) is not \(timeBoundHelp)") }
                    if k == "since" { since = t } else { until = t }
                case "limit":
                    guard let n = Int(v), (1...100_000).contains(n) else { return error(context, .badRequest, "bad limit: \(v.clipped) (1...100000)") }
                    limit = n
                default: rest.append((k, v))
                }
            }
            let filter: FlowFilter
            do { filter = try FlowFilter(query: rest) } catch { return self.error(context, .badRequest, error.description) }
            guard budget.startQuery() else {
                return self.error(context, .tooManyRequests, "the agent is busy with other journal queries: retry later")
            }
            let budget = self.budget
            let answer = budget.queryPool.runIfActive(eventLoop: context.eventLoop) { () -> String in
                defer { budget.endQuery() }
                let rows = try journal.history(filter, since: since, until: until, uid: uidFilter, limit: limit)
                return Self.flowsJSON(rows.map { FlowEntry(record: $0, state: .closed) })
            }
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            answer.whenComplete { result in
                let (handler, context) = bound.value
                switch result {
                case .success(let body): handler.respond(context, .ok, body, keepAlive: keepAlive)
                case .failure(let e): handler.error(context, .internalServerError, "journal: \(String(describing: e).prefix(300))")
                }
            }
        case "/v1/watch":
            // payload=1: also the bytes capture callouts take from relayed flows.
            let payloadValues = items.filter { $0.0 == "payload" }.map(\.1)
            guard payloadValues.allSatisfy({ ["1", "true", "0", "false"].contains($0) }) else {
                self.error(context, .badRequest, "filter 'payload': must be 1, true, 0 or false")
                return
            }
            do {
                let filter = try FlowFilter(query: items.filter { $0.0 != "payload" })
                startWatch(context, filter: filter, uid: uidFilter, payload: payloadValues.last.map { $0 == "1" || $0 == "true" } ?? false)
            } catch {
                self.error(context, .badRequest, error.description)
            }
        default:
            error(context, .notFound, "no such endpoint: \(path) (see /v1/flows, /v1/lookup, /v1/watch, /v1/history, /v1/stats, /v1/version)")
        }
    }

    static func flowsJSON(_ entries: [FlowEntry]) -> String {
        "{\"flows\":[" + entries.map { EventLine.recordJSON($0.record, prefix: "\"state\":\"\($0.state.rawValue)\",") }.joined(separator: ",") + "]}\n"
    }

    private func startWatch(_ context: ChannelHandlerContext, filter: FlowFilter, uid: UInt32?, payload: Bool) {
        streaming = true
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "application/x-ndjson")
        headers.add(name: "Transfer-Encoding", value: "chunked")
        context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))), promise: nil)
        let table = self.table
        let stream = WatchStream(channel: context.channel, onDrop: { table.countDroppedWatcher() })
        stream.cancel = table.watch(filter, uid: uid, payload: payload, sink: stream)
        watch = stream
    }
}
