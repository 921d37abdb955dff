import FlowTagCore
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#endif

/// Why a request to the agent failed.
public enum ClientError: Error, CustomStringConvertible, Equatable {
    case agentNotRunning(String)
    case permissionDenied(String)
    case protocolError(String)

    public var description: String {
        switch self {
        case .agentNotRunning(let p): return "the flowtag agent is not running (no answer on \(p)); start it with: flowtagd"
        case .permissionDenied(let p): return "permission denied on \(p): run as root or as a member of group flowtag"
        case .protocolError(let why): return "unexpected answer from the agent: \(why)"
        }
    }
}

public struct APIResponse: Sendable {
    public var status: Int
    public var body: [UInt8]
    public var text: String { String(decoding: body, as: UTF8.self) }
    public init(status: Int, body: [UInt8]) { self.status = status; self.body = body }
}

/// A small blocking HTTP/1.1 client over the agent's unix socket (the CLI's transport).
public struct APIClient: Sendable {
    public let socketPath: String

    public init(socketPath: String) { self.socketPath = socketPath }

    private func connectSocket() throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ClientError.protocolError("socket: \(String(cString: strerror(errno)))") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let path = Array(socketPath.utf8)
        guard path.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            close(fd)
            throw ClientError.protocolError("socket path too long: \(socketPath)")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.enumerated() { raw[i] = b }
            raw[path.count] = 0
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc != 0 {
            let err = errno
            close(fd)
            if err == EACCES || err == EPERM { throw ClientError.permissionDenied(socketPath) }
            throw ClientError.agentNotRunning(socketPath)
        }
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }

    private func send(_ fd: Int32, path: String) throws {
        let req = Array("GET \(path) HTTP/1.1\r\nHost: flowtag\r\nConnection: close\r\n\r\n".utf8)
        var off = 0
        while off < req.count {
            let n = req[off...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if n <= 0 { if errno == EINTR { continue }; throw ClientError.protocolError("write failed") }
            off += n
        }
    }

    /// One request, the whole answer.
    public func get(_ path: String, timeoutSeconds: Int = 30) throws -> APIResponse {
        let fd = try connectSocket()
        defer { close(fd) }
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        try send(fd, path: path)
        var data = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buf, buf.count)
            if n < 0 { if errno == EINTR { continue }; throw ClientError.protocolError("read timed out or failed") }
            if n == 0 { break }
            data.append(contentsOf: buf[0..<n])
            // The agent closes after the answer; with its length known, no need to wait for that.
            if Self.isComplete(data) { break }
        }
        return try Self.parse(data)
    }

    /// Whether `data` holds a whole response with a Content-Length body.
    static func isComplete(_ data: [UInt8]) -> Bool {
        guard let end = find(data, [13, 10, 13, 10]), let value = headerValue(data, headEnd: end, name: "content-length") else { return false }
        guard let length = Int(String(decoding: value, as: UTF8.self).trimmed) else { return false }
        return data.count >= end + 4 + length
    }

    /// The value of header `name` (lowercase) in the head `data[0..<headEnd]`, matched
    /// without building strings: the CLI reads every answer through here (B4).
    static func headerValue(_ data: [UInt8], headEnd: Int, name: StaticString) -> ArraySlice<UInt8>? {
        let n = name.utf8CodeUnitCount
        var line = 0
        while line < headEnd {
            var next = line
            while next < headEnd && data[next] != 10 { next += 1 }
            if next - line > n && data[line + n] == UInt8(ascii: ":") {
                var same = true
                for k in 0..<n where data[line + k] | 0x20 != name.utf8Start[k] { same = false; break }
                if same {
                    var stop = next
                    if stop > line && data[stop - 1] == 13 { stop -= 1 }
                    return data[(line + n + 1)..<stop]
                }
            }
            line = next + 1
        }
        return nil
    }

    static func isChunked(_ data: [UInt8], headEnd: Int) -> Bool {
        guard let te = headerValue(data, headEnd: headEnd, name: "transfer-encoding") else { return false }
        return String(decoding: te, as: UTF8.self).lowercased().contains("chunked")
    }

    static func parse(_ data: [UInt8]) throws -> APIResponse {
        guard let end = find(data, [13, 10, 13, 10]) else { throw ClientError.protocolError("no HTTP header") }
        // "HTTP/1.1 200 ...": the status is the three digits after the first space.
        var status = 0, i = 0
        while i < end && data[i] != UInt8(ascii: " ") { i += 1 }
        i += 1
        var digits = 0
        while i < end, data[i] >= UInt8(ascii: "0"), data[i] <= UInt8(ascii: "9") {
            status = status * 10 + Int(data[i] - UInt8(ascii: "0")); i += 1; digits += 1
        }
        guard digits == 3 else {
            let firstLine = data[0..<end].firstIndex(of: 13) ?? end
            throw ClientError.protocolError(String(decoding: data[0..<firstLine], as: UTF8.self))
        }
        var body = Array(data[(end + 4)...])
        if isChunked(data, headEnd: end) { body = dechunk(body).0 }
        return APIResponse(status: status, body: body)
    }

    static func find(_ hay: [UInt8], _ needle: [UInt8], from: Int = 0) -> Int? {
        guard hay.count >= needle.count else { return nil }
        var i = from
        while i + needle.count <= hay.count {
            if hay[i] == needle[0] && hay[i..<i + needle.count].elementsEqual(needle) { return i }
            i += 1
        }
        return nil
    }

    /// Decodes complete chunks; returns the data and how many input bytes were consumed.
    static func dechunk(_ b: [UInt8]) -> ([UInt8], Int) {
        var out = [UInt8](), i = 0
        while let lineEnd = find(b, [13, 10], from: i) {
            let sizeText = String(decoding: b[i..<lineEnd], as: UTF8.self).split(separator: ";").first ?? ""
            guard let size = Int(sizeText.trimmed, radix: 16) else { break }
            let start = lineEnd + 2
            if size == 0 { return (out, b.count) }
            guard start + size + 2 <= b.count else { break }
            out += b[start..<start + size]
            i = start + size + 2
        }
        return (out, i)
    }

    /// A streaming request (watch): `onLine` gets each JSON line; returns the HTTP status
    /// (and the error body for non-200 answers) when the stream ends.
    public func stream(_ path: String, onLine: (String) -> Void) throws -> APIResponse {
        let fd = try connectSocket()
        defer { close(fd) }
        try send(fd, path: path)
        var pending = [UInt8](), body = [UInt8](), status = 0, headerDone = false, chunked = false
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buf, buf.count)
            if n < 0 { if errno == EINTR { continue }; break }
            if n == 0 { break }
            pending += buf[0..<n]
            if !headerDone {
                guard let end = Self.find(pending, [13, 10, 13, 10]) else { continue }
                let r = try Self.parse(Array(pending[0..<(end + 4)]))
                status = r.status
                chunked = Self.isChunked(pending, headEnd: end)
                pending.removeFirst(end + 4)
                headerDone = true
            }
            if chunked {
                let (data, used) = Self.dechunk(pending)
                pending.removeFirst(min(used, pending.count))
                body += data
            } else {
                body += pending
                pending.removeAll()
            }
            if status == 200 {
                while let nl = body.firstIndex(of: 10) {
                    onLine(String(decoding: body[0..<nl], as: UTF8.self))
                    body.removeFirst(nl + 1)
                }
            }
        }
        return APIResponse(status: status, body: body)
    }
}
