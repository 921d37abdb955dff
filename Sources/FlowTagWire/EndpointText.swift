import FlowTagCore

/// `ip:port` or `[ipv6]:port`.
public func parseEndpoint(_ text: String) -> Endpoint? {
    var host = Substring(text), port: Substring
    if host.hasPrefix("[") {
        guard let close = host.firstIndex(of: "]"), host[host.index(after: close)...].hasPrefix(":") else { return nil }
        port = host[host.index(close, offsetBy: 2)...]
        host = host[host.index(after: host.startIndex)..<close]
    } else {
        guard let colon = host.lastIndex(of: ":") else { return nil }
        port = host[host.index(after: colon)...]
        host = host[..<colon]
    }
    guard let a = IPAddress(String(host)), let p = UInt16(port) else { return nil }
    return Endpoint(address: a, port: p)
}
