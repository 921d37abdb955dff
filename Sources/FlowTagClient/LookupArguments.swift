/// `flowtag lookup` arguments, read without the full command parser: the one question
/// asked in loops and scripts ("who owns this 5-tuple?") should cost little more than
/// starting a process (B4). Only a well-formed command line is taken; anything else
/// (help, an unknown or repeated option, a bad value) returns nil, and the full parser
/// then answers with its usual help or error.
public struct LookupArguments: Equatable, Sendable {
    public var socket = GlobalOptions.defaultSocket
    public var format = OutputFormat.table
    public var noHeaders = false
    public var local: String
    public var remote: String
    public var proto = FlowProtocol.tcp
    public var netns: UInt64?

    /// The API path of the request. Built by appending (no generic collection code: in a
    /// process that lives 2 ms, each generic type's first use costs a runtime lookup).
    public var path: String {
        var p = "/v1/lookup?proto=" + proto.rawValue
        p += "&local=" + percentEncoded(local)
        p += "&remote=" + percentEncoded(remote)
        if let netns { p += "&netns=" + String(netns) }
        return p
    }

    /// `arguments` without the program name, e.g. `["lookup", "10.0.0.1:80", "10.0.0.2:5555", "-o", "json"]`.
    public init?(fastPath arguments: [String]) {
        self.init(fastPathCount: arguments.count) { arguments[$0] }
    }

    /// The process's own command line (argv without the program name), read without
    /// building an array of strings (its type's first use costs a runtime lookup).
    public init?(commandLine argc: Int32, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) {
        self.init(fastPathCount: Int(argc) - 1) { String(cString: argv[$0 + 1]!) }
    }

    init?(fastPathCount count: Int, _ argument: (Int) -> String) {
        guard count > 0, argument(0) == "lookup" else { return nil }
        var first: String?, second: String?, positionals = 0
        var seen: UInt8 = 0  // one bit per option: a repeated option goes to the full parser
        var i = 1
        var socket: String?, output: String?, proto: String?, netns: String?, noHeaders = false
        while i < count {
            let a = argument(i)
            i += 1
            if !a.hasPrefix("-") {
                positionals += 1
                if positionals == 1 { first = a } else { second = a }
                continue
            }
            var name = a, value: String?
            if a.hasPrefix("--"), let eq = a.firstIndex(of: "=") {
                name = String(a[..<eq])
                value = String(a[a.index(after: eq)...])
            }
            let bit: UInt8
            switch name {
            case "--socket": bit = 1
            case "--output", "-o": bit = 2
            case "--proto": bit = 4
            case "--netns": bit = 8
            case "--no-headers": bit = 16
            default: return nil
            }
            guard seen & bit == 0 else { return nil }
            seen |= bit
            if bit == 16 {
                guard value == nil else { return nil }
                noHeaders = true
                continue
            }
            if value == nil {
                guard i < count else { return nil }
                value = argument(i)
                i += 1
            }
            switch name {
            case "--socket": socket = value
            case "--output", "-o": output = value
            case "--proto": proto = value
            default: netns = value
            }
        }
        guard positionals == 2, let first, let second, parseEndpoint(first) != nil, parseEndpoint(second) != nil else { return nil }
        local = first
        remote = second
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
