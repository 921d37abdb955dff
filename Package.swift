// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "flowtag",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "FlowTagKernel", targets: ["FlowTagKernel"]),
        .library(name: "FlowTagCore", targets: ["FlowTagCore"]),
        .library(name: "FlowContext", targets: ["FlowContext"]),
        .library(name: "FlowTagWire", targets: ["FlowTagWire"]),
        .library(name: "FlowTagClient", targets: ["FlowTagClient"]),
        .library(name: "FlowTagRelay", targets: ["FlowTagRelay"]),
        .library(name: "FlowTagAgent", targets: ["FlowTagAgent"]),
        .executable(name: "flowtagd", targets: ["flowtagd"]),
        .executable(name: "flowtag", targets: ["flowtag"]),
        .executable(name: "flowtag-bench", targets: ["flowtag-bench"]),
        .executable(name: "flowtag-example-uppercase", targets: ["flowtag-example-uppercase"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.1.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        .systemLibrary(name: "CLibbpf", pkgConfig: "libbpf",
                       providers: [.apt(["libbpf-dev", "libelf-dev", "zlib1g-dev"])]),
        .target(name: "CFlowTagBPF", dependencies: ["CLibbpf"],
                exclude: ["generated"]),
        // Linux system calls Swift's Glibc cannot make directly (epoll, sock_diag, …).
        .target(name: "CLinuxCalls"),
        .target(name: "FlowTagCore"),
        .target(name: "FlowTagKernel", dependencies: ["CFlowTagBPF", "CLinuxCalls", "FlowTagCore"]),
        .target(name: "FlowContext", dependencies: ["FlowTagCore"]),
        // What the agent and the CLI both speak: filters, stats, event lines, request
        // targets, time bounds (no NIO, SQLite, libbpf).
        .target(name: "FlowTagWire", dependencies: ["FlowTagCore"]),
        // What the CLI needs and nothing more (no NIO, SQLite, libbpf): a small binary
        // starts in a fraction of the time (B4).
        .target(name: "FlowTagClient", dependencies: ["FlowTagWire", "FlowTagCore"]),
        // The stream relay: stream callouts on selected TCP flows (docs/stream-relay.md).
        .target(name: "FlowTagRelay", dependencies: [
            "FlowTagKernel", "FlowContext", "CFlowTagBPF", "CLinuxCalls",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "FlowTagAgent", dependencies: [
            "FlowTagKernel", "FlowContext", "FlowTagWire", "FlowTagRelay", "CLinuxCalls",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "Yams", package: "Yams"),
            .product(name: "GRDB", package: "GRDB.swift"),
            .product(name: "GRDBSQLite", package: "GRDB.swift"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "DequeModule", package: "swift-collections"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
        .executableTarget(name: "flowtagd", dependencies: [
            "FlowTagAgent", "FlowTagKernel", "FlowTagWire",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "flowtag", dependencies: [
            "FlowTagClient",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "flowtag-bench", dependencies: ["FlowContext"]),
        // The documented example of a user-written stream callout (docs/stream-relay.md).
        .executableTarget(name: "flowtag-example-uppercase", dependencies: ["FlowContext", "FlowTagAgent", "FlowTagRelay"],
                          path: "Examples/uppercase-callout"),
        // Unit tests: no root, no kernel (make test-unit).
        .target(name: "SeededRandom", path: "Tests/SeededRandom"),
        .testTarget(name: "FlowContextTests", dependencies: ["FlowContext", "SeededRandom"]),
        .testTarget(name: "FlowTagWireTests", dependencies: ["FlowTagWire"]),
        .testTarget(name: "FlowTagClientTests", dependencies: ["FlowTagClient", "FlowTagWire"]),
        .testTarget(name: "FlowTagKernelTests", dependencies: ["FlowTagKernel"]),
        .testTarget(name: "FlowTagAgentTests", dependencies: ["FlowTagAgent", "FlowTagKernel", "FlowTagWire", "SeededRandom",
                                                              .product(name: "GRDB", package: "GRDB.swift")]),
        .testTarget(name: "FlowTagRelayTests", dependencies: ["FlowTagRelay", "FlowContext"]),
        // Real-kernel tests: root, private cgroups, real peers (make test-kernel).
        .target(name: "FlowTagTestSupport", dependencies: ["FlowTagKernel", "FlowTagAgent", "FlowTagClient", "SeededRandom"],
                path: "Tests/Support"),
        .testTarget(name: "KernelTests", dependencies: ["FlowTagKernel", "FlowTagTestSupport"]),
        .testTarget(name: "AgentTests", dependencies: ["FlowTagAgent", "FlowTagKernel", "FlowTagClient", "FlowTagTestSupport"]),
        .testTarget(name: "RelayTests", dependencies: ["FlowTagRelay", "FlowTagAgent", "FlowTagKernel", "FlowTagClient",
                                                       "FlowTagTestSupport"]),
        .testTarget(name: "DeployTests", dependencies: ["FlowTagKernel", "FlowTagClient", "FlowTagTestSupport"]),
    ]
)
