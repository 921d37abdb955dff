/// CLI output formats, kubectl-style.
public enum OutputFormat: String, Sendable, CaseIterable {
    case table, wide, json
}

/// Exit codes of the CLI (sysexits.h where one fits).
public enum ExitStatus: Int32, Sendable {
    case ok = 0
    case nothingFound = 1
    case usage = 64         // EX_USAGE: a bad argument or filter
    case agentDown = 69     // EX_UNAVAILABLE: the agent is not running
    case tempFailure = 75   // EX_TEMPFAIL: the agent ended a watch that read too slowly
    case protocolError = 76 // EX_PROTOCOL
    case permission = 77    // EX_NOPERM
}
