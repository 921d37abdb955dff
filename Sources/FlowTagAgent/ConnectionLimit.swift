import FlowTagWire
import NIOCore
import Synchronization

/// The API's open connections, shared by every child channel.
final class ConnectionCounter: Sendable {
    let max: Int
    let open = Atomic<Int>(0)
    init(max: Int) { self.max = max }
}

/// Bounds the API's open connections: past the counter's `max`, a new connection gets a
/// 503 and is closed, and what it sends is never parsed, so a connection flood costs
/// bounded memory. First in each channel's pipeline.
final class ConnectionLimit: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = NIOAny
    private let counter: ConnectionCounter
    private var counted = false
    private var rejected = false

    init(_ counter: ConnectionCounter) { self.counter = counter }

    func channelActive(context: ChannelHandlerContext) {
        counted = true
        guard counter.open.add(1, ordering: .relaxed).newValue <= counter.max else {
            rejected = true
            let body = "{\"error\":\"too many connections to the agent (\(counter.max))\"}\n"
            let text = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n" + body
            // Written from here, below the HTTP handlers: raw bytes, then close.
            context.writeAndFlush(NIOAny(context.channel.allocator.buffer(string: text))).whenComplete { _ in context.close(promise: nil) }
            return
        }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if !rejected { context.fireChannelRead(data) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if counted { counter.open.subtract(1, ordering: .relaxed) }
        counted = false
        context.fireChannelInactive()
    }
}
