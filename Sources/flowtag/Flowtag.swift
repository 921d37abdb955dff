import ArgumentParser
import FlowTagClient
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// Options every command shares.
struct Common: ParsableArguments {
    @Option(name: .long, help: "The agent's unix socket (default: FLOWTAG_SOCKET, else /run/flowtag/flowtag.sock).")
    var socket: String = GlobalOptions.defaultSocket

    @Option(name: .shortAndLong, help: "Output: table, wide or json.")
    var output: String = "table"

    @Flag(name: .long, help: "Omit the table header.")
    var noHeaders = false

    var format: OutputFormat { OutputFormat(rawValue: output) ?? .table }

    func validate() throws {
        guard OutputFormat(rawValue: output) != nil else { throw ValidationError("-o must be table, wide or json, not '\(output)'") }
    }
}

/// Filters as flags; they become the API's query parameters.
struct Filters: ParsableArguments {
    @Option(help: "Owner's process id.") var pid: String?
    @Option(help: "Owner's executable path.") var exe: String?
    @Option(help: "Owner's command name.") var comm: String?
    @Option(help: "Owner's user id.") var uid: String?
    @Option(help: "Owner's cgroup id.") var cgroup: String?
    @Option(help: "Either end's port.") var port: String?
    @Option(help: "Local address or CIDR prefix.") var local: String?
    @Option(help: "Remote address or CIDR prefix.") var remote: String?
    @Option(help: "tcp or udp.") var proto: String?
    @Option(help: "open or closed.") var state: String?

    var query: [(String, String)] {
        [("pid", pid), ("exe", exe), ("comm", comm), ("uid", uid), ("cgroup", cgroup), ("port", port),
         ("local", local), ("remote", remote), ("proto", proto), ("state", state)].compactMap { k, v in v.map { (k, $0) } }
    }

    /// Checked here too, so a bad filter fails before any request.
    func validate() throws {
        do { _ = try FlowFilter(query: query) } catch { throw ValidationError(error.description) }
    }
}

/// Runs a request and maps failures to exit statuses with a clear message.
func request(_ common: Common, _ path: String) throws -> APIResponse {
    try request(socket: common.socket, path)
}

func request(socket: String, _ path: String) throws -> APIResponse {
    do {
        let r = try APIClient(socketPath: socket).get(path)
        switch r.status {
        case 200: return r
        case 400: fail(.usage, errorText(r))
        case 403: fail(.permission, errorText(r))
        case 404: fail(.nothingFound, errorText(r))
        default: fail(.protocolError, "HTTP \(r.status): \(errorText(r))")
        }
    } catch let e as ClientError {
        switch e {
        case .agentNotRunning: fail(.agentDown, e.description)
        case .permissionDenied: fail(.permission, e.description)
        case .protocolError: fail(.protocolError, e.description)
        }
    }
}

func errorText(_ r: APIResponse) -> String {
    struct APIError: Decodable { var error: String }
    return (try? JSONDecoder().decode(APIError.self, from: Data(r.body)))?.error ?? r.text
}

func fail(_ status: ExitStatus, _ message: String) -> Never {
    writeAll(2, "flowtag: \(message)\n")
    exit(status.rawValue)
}

func printFlows(_ r: APIResponse, _ common: Common) throws {
    try printFlows(r, format: common.format, noHeaders: common.noHeaders)
}

func printFlows(_ r: APIResponse, format: OutputFormat, noHeaders: Bool) throws {
    if format == .json {
        writeAll(1, bytes: r.body.last == 10 ? r.body : r.body + [10])
        // The answer printed as it came; an empty list is still "nothing found" (exit 1).
        if r.body.starts(with: Array("{\"flows\":[]}".utf8)) { exit(ExitStatus.nothingFound.rawValue) }
        return
    }
    let list = try JSONDecoder().decode(APIFlowList.self, from: Data(r.body))
    if list.flows.isEmpty { fail(.nothingFound, "no flows found") }
    writeAll(1, FlowTableRenderer.render(list.flows.map { ($0.record, $0.state) }, wide: format == .wide, headers: !noHeaders))
}

func lookup(_ l: LookupArguments) throws {
    try printFlows(request(socket: l.socket, l.path), format: l.format, noHeaders: l.noHeaders)
}

@main
struct FlowtagCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flowtag",
        abstract: "Which process owns which network flow: ask the flowtag agent.",
        discussion: """
        Exit status: 0 ok, 1 nothing found, 64 bad argument or filter, 69 agent not running,
        76 unexpected answer, 77 permission denied.
        """,
        subcommands: [Flows.self, Lookup.self, Watch.self, History.self, Stats.self, Version.self])

    /// A well-formed `flowtag lookup` is answered without building the command tree
    /// (reflection over every command and option costs more than the lookup: B4).
    static func main() {
        if let l = LookupArguments(commandLine: CommandLine.argc, CommandLine.unsafeArgv) {
            do { try lookup(l) } catch { fail(.protocolError, "\(error)") }
            Glibc.exit(0)
        }
        // Global options may come before the command (`flowtag --socket S flows`).
        let arguments = GlobalOptions.commandFirst(Array(CommandLine.arguments.dropFirst()))
        if let l = LookupArguments(fastPath: arguments) {
            do { try lookup(l) } catch { fail(.protocolError, "\(error)") }
            Glibc.exit(0)
        }
        main(arguments)
    }

    struct History: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Closed flows from the agent's journal.")
        @OptionGroup var common: Common
        @OptionGroup var filters: Filters
        @Option(help: "From: RFC 3339 or a duration back from now (15m, 2h, 7d).") var since: String?
        @Option(help: "Until: RFC 3339 or a duration back from now.") var until: String?
        @Option(help: "At most this many flows.") var limit: Int = 10000

        func validate() throws {
            for (name, v) in [("--since", since), ("--until", until)] {
                if let v, parseTimeBound(v) == nil { throw ValidationError("\(name) '\(v)' is not \(timeBoundHelp)") }
            }
            guard (1...100_000).contains(limit) else { throw ValidationError("--limit must be 1...100000") }
        }

        func run() throws {
            var q = filters.query
            if let since { q.append(("since", since)) }
            if let until { q.append(("until", until)) }
            q.append(("limit", "\(limit)"))
            try printFlows(request(common, "/v1/history?" + queryString(q)), common)
        }
    }

    struct Flows: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List flows with their owners (live, and recently closed).")
        @OptionGroup var common: Common
        @OptionGroup var filters: Filters
        func run() throws { try printFlows(request(common, "/v1/flows?" + queryString(filters.query)), common) }
    }

    struct Lookup: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Find the owner of one live flow by its 5-tuple.")
        @OptionGroup var common: Common
        @Argument(help: "Local end, IP:PORT or [IPv6]:PORT.") var localEnd: String
        @Argument(help: "Remote end, IP:PORT or [IPv6]:PORT.") var remoteEnd: String
        @Option(help: "tcp or udp.") var proto: String = "tcp"
        @Option(help: "Network-namespace cookie, when the 5-tuple exists in several.") var netns: UInt64?

        func validate() throws {
            guard parseEndpoint(localEnd) != nil else { throw ValidationError("local end '\(localEnd)' is not IP:PORT") }
            guard parseEndpoint(remoteEnd) != nil else { throw ValidationError("remote end '\(remoteEnd)' is not IP:PORT") }
            guard FlowProtocol(rawValue: proto) != nil else { throw ValidationError("--proto must be tcp or udp") }
        }

        func run() throws {
            try lookup(LookupArguments(socket: common.socket, format: common.format, noHeaders: common.noHeaders,
                                       local: localEnd, remote: remoteEnd, proto: FlowProtocol(rawValue: proto) ?? .tcp, netns: netns))
        }
    }

    struct Watch: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stream flow events as they happen.")
        @OptionGroup var common: Common
        @OptionGroup var filters: Filters
        @Flag(name: .long, help: "Also show the bytes capture stream callouts take from relayed flows.")
        var payload = false

        func run() throws {
            let json = common.format == .json
            var query = filters.query
            if payload { query.append(("payload", "1")) }
            do {
                let r = try APIClient(socketPath: common.socket).stream("/v1/watch?" + queryString(query)) { line in
                    // The agent ends a stream with an error line (it dropped a watcher that
                    // read too slowly): said on stderr, exit 75.
                    if line.hasPrefix("{\"event\":\"error\"") {
                        fail(.tempFailure, errorText(APIResponse(status: 0, body: Array(line.utf8))))
                    }
                    // One write per line: a pipe reader sees each event as it happens.
                    if json { writeAll(1, line + "\n"); return }
                    guard let e = try? JSONDecoder().decode(WatchEvent.self, from: Data(line.utf8)) else { return }
                    let text = EventLine.text(FlowEvent(kind: e.event, time: e.time, record: e.record, payload: e.payload))
                    writeAll(1, text + "\n")
                }
                if r.status == 400 { fail(.usage, errorText(r)) }
                if r.status != 200 { fail(.protocolError, "HTTP \(r.status): \(errorText(r))") }
            } catch let e as ClientError {
                switch e {
                case .agentNotRunning: fail(.agentDown, e.description)
                case .permissionDenied: fail(.permission, e.description)
                case .protocolError: fail(.protocolError, e.description)
                }
            }
        }
    }

    struct Stats: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The agent's counters.")
        @OptionGroup var common: Common
        func run() throws {
            let r = try request(common, "/v1/stats")
            if common.format == .json { print(r.text, terminator: ""); return }
            print(FlowTableRenderer.stats(try JSONDecoder().decode(AgentStats.self, from: Data(r.body))), terminator: "")
        }
    }

    struct Version: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Versions of this CLI and of the agent.")
        @Option(name: .long, help: "The agent's unix socket (default: FLOWTAG_SOCKET, else /run/flowtag/flowtag.sock).")
        var socket: String = GlobalOptions.defaultSocket
        func run() {
            print("flowtag \(flowtagVersion)")
            do {
                let r = try APIClient(socketPath: socket).get("/v1/version")
                guard r.status == 200 else { fail(.protocolError, "HTTP \(r.status): \(errorText(r))") }
                print("agent: " + r.text.trimmed)
            } catch let e as ClientError {
                switch e {
                case .agentNotRunning: fail(.agentDown, "agent: not running on \(socket)")
                case .permissionDenied: fail(.permission, e.description)
                case .protocolError: fail(.protocolError, e.description)
                }
            } catch {
                fail(.protocolError, "\(error)")
            }
        }
    }
}

struct WatchEvent: Decodable {
    var event: FlowEventKind
    var time: WallTime
    var record: FlowRecord
    var payload: FlowPayload?
    enum CodingKeys: String, CodingKey { case event, time, payload }
    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        event = try c.decode(FlowEventKind.self, forKey: .event)
        time = try c.decode(WallTime.self, forKey: .time)
        payload = try c.decodeIfPresent(FlowPayload.self, forKey: .payload)
        record = try FlowRecord(from: decoder)
    }
}
