import Foundation
import FlowContext
import FlowTagCore
import FlowTagKernel
import Synchronization

/// A captured prefix of a relayed flow's bytes (the capture callout).
public struct PayloadCapture: Sendable, Hashable {
    public var flow: UInt64
    public var direction: StreamDirection
    /// Offset of `data` in the direction's stream.
    public var offset: Int
    public var data: [UInt8]
    public var metadata: Metadata
}

/// The stream callouts flowtagd builds from its config file. User-written callouts are
/// plain `StreamCallout`s (see docs/stream-relay.md); these are built the same way.
public enum BuiltinStreamCallouts {
    /// Allows the connection at its first indication (WFP's allow-connection): no more
    /// indications, the relay copies the rest without the callouts.
    public static func allowConnection(name: String = "allow", weight: UInt16 = 1) -> StreamCallout {
        StreamCallout(name: name, weight: weight, isTerminating: false) { _, _ in StreamDecision(.permit, .allowConnection) }
    }

    /// Permits every byte: the relay with nothing changed (for measuring it).
    public static func passThrough(name: String = "pass", weight: UInt16 = 1) -> StreamCallout {
        StreamCallout(name: name, weight: weight, isTerminating: false) { _, _ in .permit }
    }

    /// Replaces `pattern` with `replacement` in the chosen directions, also when the
    /// pattern is split across writes. Inline: permits up to a match, injects the
    /// replacement in place of the match, holds back a possible partial match.
    /// Out-of-band: blocks every byte and injects the edited copy (stmedit's OOB mode).
    public static func edit(name: String, weight: UInt16, pattern: [UInt8], replacement: [UInt8],
                            outOfBand: Bool, directions: Set<StreamDirection> = [.send, .receive]) -> StreamCallout {
        precondition(!pattern.isEmpty)
        if !outOfBand {
            return StreamCallout(name: name, weight: weight) { ind, inj in
                guard directions.contains(ind.direction) else { return .permit }
                return StreamEdits.inline(ind, inj, pattern: pattern, replacement: replacement)
            }
        }
        let held = Mutex<[Key: [UInt8]]>([:])
        return StreamCallout(name: name, weight: weight) { ind, inj in
            guard directions.contains(ind.direction) else { return .permit }
            let key = Key(flow: ind.flow.cookie, direction: ind.direction)
            if ind.flags.contains(.abort) {
                held.withLock { _ = $0.removeValue(forKey: key) }
                return .permit
            }
            let final = ind.flags.contains(.disconnect)
            let out: [UInt8] = held.withLock { h in
                var buf = h[key] ?? []
                buf.append(contentsOf: ind.data)
                let keep = final ? 0 : StreamEdits.partialSuffix(buf, pattern)
                if final { h.removeValue(forKey: key) } else { h[key] = Array(buf.suffix(keep)) }
                return StreamEdits.replaceAll(Array(buf.dropLast(keep)), pattern, replacement)
            }
            if !out.isEmpty { _ = inj.inject(flags: .direction(ind.direction), data: out, completion: { _ in }) }
            return final ? .permit : .block
        }
    }

    /// Blocks the flow and drops the connection when `pattern` appears (split or not);
    /// bytes before the match are delivered, a possible start of the pattern at the end
    /// of what arrived is held back until the next bytes decide (so no part of it leaks).
    public static func blockOnPattern(name: String, weight: UInt16, pattern: [UInt8]) -> StreamCallout {
        precondition(!pattern.isEmpty)
        return StreamCallout(name: name, weight: weight, isTerminating: true) { ind, _ in
            let data = ind.data
            if data.isEmpty || ind.flags.contains(.abort) { return .permit }
            if let at = StreamEdits.firstIndex(of: pattern, in: data) {
                // The bytes before the match go on; the rest is indicated again at once,
                // starting with the match, and then blocked with the connection.
                if at > 0 { return .permit(at) }
                return StreamDecision(.block, .dropConnection)
            }
            return StreamEdits.permitHoldingPartial(ind, pattern: pattern)
        }
    }

    /// Reports the first `bytes` bytes of each direction of each flow, then steps aside.
    public static func capture(name: String = "capture", weight: UInt16 = 0xffff, bytes: Int,
                               report: @escaping @Sendable (PayloadCapture) -> Void) -> StreamCallout {
        let seen = Mutex<[Key: Int]>([:])
        return StreamCallout(name: name, weight: weight, isTerminating: false) { ind, _ in
            let key = Key(flow: ind.flow.cookie, direction: ind.direction)
            if ind.flags.contains(.abort) || ind.flags.contains(.disconnect) {
                seen.withLock { _ = $0.removeValue(forKey: key) }
                return .permit
            }
            let offset = seen.withLock { $0[key] ?? 0 }
            let take = min(bytes - offset, ind.data.count)
            if take > 0 {
                seen.withLock { $0[key] = offset + take }
                report(PayloadCapture(flow: ind.flow.cookie, direction: ind.direction, offset: offset,
                                      data: Array(ind.data.prefix(take)), metadata: ind.metadata))
            }
            return .permit
        }
    }

    struct Key: Hashable { var flow: UInt64; var direction: StreamDirection }
}
