import FlowTagWire
import FlowTagKernel
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

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
