import FlowTagKernel
import FlowTagWire

/// A request the API refuses: its status (400, 404, …) and what to tell the client.
struct APIRefusal: Error {
    let status: Int
    let message: String
    static func bad(_ message: String) -> APIRefusal { APIRefusal(status: 400, message: message) }
}

/// `/v1/lookup`'s parameters.
struct LookupQuery {
    var proto = FlowProtocol.tcp
    var local: Endpoint
    var remote: Endpoint
    var netns: UInt64?

    init(_ items: [(String, String)]) throws(APIRefusal) {
        var local: Endpoint?, remote: Endpoint?
        for (k, v) in items {
            switch k {
            case "proto":
                guard let p = FlowProtocol(rawValue: v) else { throw .bad("bad proto: \(v.clipped) is not tcp or udp") }
                proto = p
            case "local":
                guard let e = parseEndpoint(v) else { throw .bad("bad local: \(v.clipped) is not IP:PORT") }
                local = e
            case "remote":
                guard let e = parseEndpoint(v) else { throw .bad("bad remote: \(v.clipped) is not IP:PORT") }
                remote = e
            case "netns":
                guard let n = UInt64(v) else { throw .bad("bad netns: \(v.clipped) is not a number") }
                netns = n
            default:
                throw .bad("unknown parameter \(k.clipped) (known: proto, local, remote, netns)")
            }
        }
        guard let local, let remote else { throw .bad("lookup needs local=IP:PORT and remote=IP:PORT") }
        self.local = local
        self.remote = remote
    }
}

/// `/v1/history`'s parameters.
struct HistoryQuery {
    var since: WallTime?
    var until: WallTime?
    var limit = 10000
    var filter: FlowFilter

    init(_ items: [(String, String)], now: WallTime = .now()) throws(APIRefusal) {
        var rest: [(String, String)] = []
        for (k, v) in items {
            switch k {
            case "since", "until":
                guard let t = parseTimeBound(v, now: now) else { throw .bad("bad \(k): \(v.clipped) is not \(timeBoundHelp)") }
                if k == "since" { since = t } else { until = t }
            case "limit":
                guard let n = Int(v), (1...100_000).contains(n) else { throw .bad("bad limit: \(v.clipped) (1...100000)") }
                limit = n
            default: rest.append((k, v))
            }
        }
        do { filter = try FlowFilter(query: rest) } catch { throw .bad(error.description) }
    }
}

/// `/v1/watch`'s parameters: the filters, and `payload` (also capture callouts' bytes).
struct WatchQuery {
    var filter: FlowFilter
    var payload = false

    init(_ items: [(String, String)]) throws(APIRefusal) {
        let values = items.filter { $0.0 == "payload" }.map(\.1)
        guard values.allSatisfy({ ["1", "true", "0", "false"].contains($0) }) else {
            throw .bad("filter 'payload': must be 1, true, 0 or false")
        }
        payload = values.last.map { $0 == "1" || $0 == "true" } ?? false
        do { filter = try FlowFilter(query: items.filter { $0.0 != "payload" }) } catch { throw .bad(error.description) }
    }
}
