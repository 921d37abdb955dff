import FlowTagWire
import FlowTagKernel
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

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
        do throws(APIRefusal) {
            switch path {
            case "/v1/version":
                respond(context, .ok, "{\"version\":\"\(flowtagVersion)\"}\n", keepAlive: keepAlive)
            case "/v1/stats":
                // Machine-wide counters tell of every user's flows: for those who see them all.
                guard uidFilter == nil else { throw APIRefusal(status: 403, message: "stats are machine-wide: root or members of the socket's group only") }
                let data = (try? JSONEncoder().encode(table.stats())) ?? Data("{}".utf8)
                respond(context, .ok, String(decoding: data, as: UTF8.self) + "\n", keepAlive: keepAlive)
            case "/v1/flows":
                let filter: FlowFilter
                do { filter = try FlowFilter(query: items) } catch { throw .bad(error.description) }
                respond(context, .ok, Self.flowsJSON(table.flows(filter, uid: uidFilter)), keepAlive: keepAlive)
            case "/v1/lookup":
                try lookup(context, LookupQuery(items), uid: uidFilter, keepAlive: keepAlive)
            case "/v1/history":
                try history(context, HistoryQuery(items), uid: uidFilter, keepAlive: keepAlive)
            case "/v1/watch":
                let q = try WatchQuery(items)
                startWatch(context, filter: q.filter, uid: uidFilter, payload: q.payload)
            default:
                throw APIRefusal(status: 404, message: "no such endpoint: \(path.clipped) (see /v1/flows, /v1/lookup, /v1/watch, /v1/history, /v1/stats, /v1/version)")
            }
        } catch {
            self.error(context, HTTPResponseStatus(statusCode: error.status), error.message)
        }
    }

    private func lookup(_ context: ChannelHandlerContext, _ q: LookupQuery, uid: UInt32?, keepAlive: Bool) throws(APIRefusal) {
        var found = table.lookup(proto: q.proto, local: q.local, remote: q.remote, netns: q.netns)
        if let uid { found = found.filter { $0.process.uid == uid } }
        guard !found.isEmpty else { throw APIRefusal(status: 404, message: "no live \(q.proto.rawValue) flow \(q.local) -> \(q.remote)") }
        respond(context, .ok, Self.flowsJSON(found.map { FlowEntry(record: $0, state: .open) }), keepAlive: keepAlive)
    }

    /// Journal queries run off the event loop (one long query never stalls the others),
    /// at most `ResponseBudget.maxQueries` at once.
    private func history(_ context: ChannelHandlerContext, _ q: HistoryQuery, uid: UInt32?, keepAlive: Bool) throws(APIRefusal) {
        guard let journal = table.journal else { throw APIRefusal(status: 503, message: "the journal is off (flowtagd --journal PATH)") }
        guard budget.startQuery() else { throw APIRefusal(status: 429, message: "the agent is busy with other journal queries: retry later") }
        let budget = self.budget
        let answer = budget.queryPool.runIfActive(eventLoop: context.eventLoop) { () -> String in
            defer { budget.endQuery() }
            let rows = try journal.history(q.filter, since: q.since, until: q.until, uid: uid, limit: q.limit)
            return Self.flowsJSON(rows.map { FlowEntry(record: $0, state: .closed) })
        }
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        answer.whenComplete { result in
            let (handler, context) = bound.value
            switch result {
            case .success(let body): handler.respond(context, .ok, body, keepAlive: keepAlive)
            case .failure(let e as Journal.QueryTimedOut): handler.error(context, .serviceUnavailable, e.description)
            case .failure(let e): handler.error(context, .internalServerError, "journal: \(String(describing: e).prefix(300))")
            }
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
