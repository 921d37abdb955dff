// A user-written stream callout, run by the flowtag agent.
//
//   flowtag-example-uppercase CONFIG.yaml
//
// CONFIG.yaml is an ordinary flowtagd config whose `stream.rules` select the flows; this
// program adds one callout that upper-cases every byte the selected processes receive and
// prints who received them. Stop it with Ctrl-C like flowtagd.
import FlowContext
import FlowTagAgent
import Foundation

let args = CommandLine.arguments
guard args.count == 2 else {
    FileHandle.standardError.write(Data("usage: flowtag-example-uppercase CONFIG.yaml\n".utf8))
    exit(64)
}
let config: AgentConfig
do { config = try AgentConfig.load(path: args[1]) } catch {
    FileHandle.standardError.write(Data("flowtag-example-uppercase: \(error)\n".utf8))
    exit(78)
}

let uppercase = StreamCallout(name: "uppercase", weight: 50) { indication, injector in
    // Every indication names the process that owns the flow, FIN and reset included.
    let who = indication.metadata
    if indication.flags.contains(.disconnect) || indication.flags.contains(.abort) {
        let what = indication.flags.contains(.abort) ? "reset" : "FIN"
        FileHandle.standardError.write(Data("uppercase: \(what) (\(indication.direction.rawValue)) for pid \(who.processID)\n".utf8))
        return .permit
    }
    guard indication.direction == .receive, !indication.data.isEmpty else { return .permit }
    FileHandle.standardError.write(Data("uppercase: \(indication.data.count) bytes for pid \(who.processID) (\(who.processPath))\n".utf8))
    let upper = indication.data.map { (0x61...0x7a).contains($0) ? $0 - 0x20 : $0 }
    // Block the original bytes and inject the edited ones in their place.
    _ = injector.inject(flags: .receive, data: upper, completion: { _ in })
    return .block
}

exit(await AgentRunner.run(config, streamCallouts: [uppercase]))
