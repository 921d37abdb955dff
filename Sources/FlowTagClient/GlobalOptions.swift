#if canImport(Glibc)
import Glibc
#endif

/// Options every command takes, also before the command (`flowtag --socket S flows`, as
/// docker and kubectl accept them), and the socket's default from FLOWTAG_SOCKET.
public enum GlobalOptions {
    /// FLOWTAG_SOCKET when set and not empty, else the agent's default socket.
    public static var defaultSocket: String {
        if let v = getenv("FLOWTAG_SOCKET"), v.pointee != 0 { return String(cString: v) }
        return "/run/flowtag/flowtag.sock"
    }

    /// `arguments` (without the program name) with the global options that come before
    /// the command moved after it; anything else is left as it is.
    public static func commandFirst(_ arguments: [String]) -> [String] {
        var leading: [String] = []
        var i = 0
        while i < arguments.count {
            let a = arguments[i]
            let name = a.split(separator: "=", maxSplits: 1).first.map(String.init) ?? a
            switch name {
            case "--no-headers":
                leading.append(a)
                i += 1
            case "--socket", "--output", "-o":
                leading.append(a)
                i += 1
                if !a.contains("="), i < arguments.count {
                    leading.append(arguments[i])
                    i += 1
                }
            default:
                guard !leading.isEmpty, i < arguments.count, !a.hasPrefix("-") else { return arguments }
                return [a] + leading + Array(arguments[(i + 1)...])
            }
        }
        return arguments
    }
}
