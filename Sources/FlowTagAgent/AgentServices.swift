import FlowTagKernel
import FlowTagRelay
import FlowTagWire
import ServiceLifecycle
#if canImport(Glibc)
import Glibc
#endif

/// The agent's running parts as swift-service-lifecycle services. A ServiceGroup runs them
/// and, on SIGTERM/SIGINT, shuts them down in the reverse of their order here, which is
/// WFP's orderly unload: relayed flows closed, the API and its watchers ended, event
/// ingest stopped and every flow context removed (each flowDelete), the journal written.
enum AgentServices {
    /// Mirrors every kernel event into the flow table (and stdout) until shutdown; then
    /// removes every flow context.
    struct Ingest: Service {
        let monitor: FlowMonitor
        let table: FlowTable
        let heap: HeapTrimmer
        let format: EventFormat?

        func run() async throws {
            try await withGracefulShutdownHandler {
                // Lines are batched into one write per burst of events (a write per event
                // would cost more than the event), flushed when no more are waiting.
                var buffer = [UInt8]()
                var iterator = monitor.events.makeAsyncIterator()
                while let event = await iterator.next() {
                    table.apply(event)
                    if event.kind == .close { heap.released() }
                    guard let format else { continue }
                    if format == .json {
                        EventLine.appendJSON(event, to: &buffer)
                    } else {
                        buffer.append(contentsOf: EventLine.render(event, as: format).utf8)
                    }
                    buffer.append(10)
                    if buffer.count >= 1 << 16 || monitor.pendingEvents == 0 {
                        writeAll(1, buffer)
                        buffer.removeAll(keepingCapacity: true)
                    }
                }
                writeAll(1, buffer)
            } onGracefulShutdown: {
                monitor.stop() // ends `events`: the loop above drains what is left and returns
            }
            await table.shutdown()
        }
    }

    /// Runs until shutdown, then `stop` (a part that needs no task of its own).
    struct Stoppable: Service, CustomStringConvertible {
        let description: String
        let stop: @Sendable () -> Void

        func run() async throws {
            try? await gracefulShutdown()
            stop()
        }
    }

    /// Trims the heap once a second after bursts of flows ended (see HeapTrimmer).
    struct Housekeeping: Service {
        let heap: HeapTrimmer

        func run() async throws {
            while !Task.isShuttingDownGracefully {
                try? await Task.sleep(for: .seconds(1))
                heap.tick()
            }
        }
    }
}

/// One configuration for every service: when any ends, the whole group shuts down.
extension ServiceGroupConfiguration.ServiceConfiguration {
    static func agentPart(_ service: any Service) -> Self {
        Self(service: service, successTerminationBehavior: .gracefullyShutdownGroup,
             failureTerminationBehavior: .gracefullyShutdownGroup)
    }
}
