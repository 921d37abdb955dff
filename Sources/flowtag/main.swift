import ArgumentParser

struct FlowtagCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flowtag",
        abstract: "Query the flowtag agent: which process owns which flow.",
        subcommands: [Version.self])

    struct Version: ParsableCommand {
        func run() { print("flowtag 0.1.0") }
    }
}

FlowtagCommand.main()
