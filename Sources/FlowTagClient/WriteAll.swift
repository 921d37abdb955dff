#if canImport(Glibc)
import Glibc
#endif

/// Writes all of a string to a file descriptor (stdout/stderr) in as few writes as it takes.
public func writeAll(_ fd: Int32, _ text: String) {
    writeAll(fd, bytes: Array(text.utf8))
}

public func writeAll(_ fd: Int32, bytes: [UInt8]) {
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return }
        done += n
    }
}
