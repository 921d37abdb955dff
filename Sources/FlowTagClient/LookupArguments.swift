/// `flowtag lookup` arguments, read without the full command parser: the one question
/// asked in loops and scripts ("who owns this 5-tuple?") should cost little more than
/// starting a process (B4). Only a well-formed command line is taken; anything else
/// (help, an unknown or repeated option, a bad value) returns nil, and the full parser
/// then answers with its usual help or error.
public struct LookupArguments: Equatable, Sendable {
    public var socket = "/run/flowtag/flowtag.sock"
    public var format = OutputFormat.table
    public var noHeaders = false
    public var local: String
    public var remote: String
    public var proto = FlowProtocol.tcp
    public var netns: UInt64?

    /// The API path of the request.
    public var path: String {
        var q = [("proto", proto.rawValue), ("local", local), ("remote", remote)]
        if let netns { q.append(("netns", "\(netns)")) }
        return "/v1/lookup?" + queryString(q)
    }

    /// `arguments` without the program name, e.g. `["lookup", "10.0.0.1:80", "10.0.0.2:5555", "-o", "json"]`.
    public init?(fastPath arguments: [String]) {
        guard arguments.first == "lookup" else { return nil }
        var positional: [String] = []
        var seen: Set<String> = []
        var i = 1
        var socket: String?, output: String?, proto: String?, netns: String?, noHeaders = false
        while i < arguments.count {
            let a = arguments[i]
            i += 1
            if !a.hasPrefix("-") { positional.append(a); continue }
            var name = a, value: String?
            if a.hasPrefix("--"), let eq = a.firstIndex(of: "=") {
                name = String(a[..<eq])
                value = String(a[a.index(after: eq)...])
            }
            guard seen.insert(name == "-o" ? "--output" : name).inserted else { return nil }
            if name == "--no-headers" {
                guard value == nil else { return nil }
                noHeaders = true
                continue
            }
            guard ["--socket", "--output", "-o", "--proto", "--netns"].contains(name) else { return nil }
            if value == nil {
                guard i < arguments.count else { return nil }
                value = arguments[i]
                i += 1
            }
            switch name {
            case "--socket": socket = value
            case "--output", "-o": output = value
            case "--proto": proto = value
            default: netns = value
            }
        }
        guard positional.count == 2, parseEndpoint(positional[0]) != nil, parseEndpoint(positional[1]) != nil else { return nil }
        local = positional[0]
        remote = positional[1]
        if let socket { guard !socket.isEmpty else { return nil }; self.socket = socket }
        if let output { guard let f = OutputFormat(rawValue: output) else { return nil }; format = f }
        if let proto { guard let p = FlowProtocol(rawValue: proto) else { return nil }; self.proto = p }
        if let netns { guard let n = UInt64(netns) else { return nil }; self.netns = n }
        self.noHeaders = noHeaders
    }

    public init(socket: String, format: OutputFormat, noHeaders: Bool, local: String, remote: String, proto: FlowProtocol, netns: UInt64?) {
        self.socket = socket; self.format = format; self.noHeaders = noHeaders
        self.local = local; self.remote = remote; self.proto = proto; self.netns = netns
    }
}
