import FlowTagWire
import FlowTagKernel
import Foundation

/// Fault injection for the tests of start-up's undo: `FLOWTAG_FAIL_AT=<point>` makes the
/// start fail at that point as a real error would (points: `after-attach`,
/// `before-publish`). Unset in production, where it does nothing.
enum FaultPoint {
    static func check(_ point: String) throws {
        guard ProcessInfo.processInfo.environment["FLOWTAG_FAIL_AT"] == point else { return }
        throw KernelError.invalidArgument("start-up failed at \(point) (FLOWTAG_FAIL_AT, fault injection)")
    }
}
