// B7: the flow-context store against a plain Dictionary under one lock, same operations,
// same run, interleaved rounds. Prints a table and writes .bench/B7.json.
import FlowContext
import Foundation
import Synchronization

struct Key: Hashable { var flow: FlowHandle; var layer: Layer; var callout: CalloutID }

/// The baseline: one Dictionary behind one lock.
final class LockedDictionary: Sendable {
    let map = Mutex<[Key: String]>([:])
    func associate(_ k: Key, _ v: String) -> Bool {
        map.withLock { m in
            if m[k] != nil { return false }
            m[k] = v
            return true
        }
    }
    func lookup(_ k: Key) -> String? { map.withLock { $0[k] } }
    func remove(_ k: Key) -> String? { map.withLock { $0.removeValue(forKey: k) } }
}

func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

/// Runs `body(thread, range)` on `threads` threads over 0..<n; returns seconds.
func timed(_ threads: Int, _ n: Int, _ body: @escaping @Sendable (Int, Range<Int>) -> Void) -> Double {
    let start = now()
    let group = DispatchGroup()
    for t in 0..<threads {
        let lo = n * t / threads, hi = n * (t + 1) / threads
        group.enter()
        Thread { body(t, lo..<hi); group.leave() }.start()
    }
    group.wait()
    return Double(now() - start) / 1e9
}

struct Result: Codable { var impl: String; var threads: Int; var op: String; var opsPerSecond: Double }

let n = Int(CommandLine.arguments.dropFirst().first ?? "") ?? 1_000_000
let rounds = 3
let layer = Layer.stream(.v4)
let context = "ctx"
var results: [String: [Double]] = [:]

for round in 0..<rounds {
    for threads in [1, 2] {
        // flowtag's store
        let engine = FilterEngine()
        let id = try! engine.register(Callout<String>(key: UUID(), classify: { _, _ in .continue }, flowDelete: { _ in })).get()
        let a = timed(threads, n) { _, r in for i in r { engine.associate(flow: FlowHandle(cookie: UInt64(i)), layer: layer, callout: id, context: context) } }
        let l = timed(threads, n) { _, r in for i in r { _ = engine.context(flow: FlowHandle(cookie: UInt64(i)), layer: layer, callout: id, as: String.self) } }
        let d = timed(threads, n) { _, r in for i in r { engine.remove(flow: FlowHandle(cookie: UInt64(i)), layer: layer, callout: id) } }
        precondition(engine.totalAssociations == 0)
        // baseline
        let base = LockedDictionary()
        let ba = timed(threads, n) { _, r in for i in r { _ = base.associate(Key(flow: FlowHandle(cookie: UInt64(i)), layer: layer, callout: id), context) } }
        let bl = timed(threads, n) { _, r in for i in r { _ = base.lookup(Key(flow: FlowHandle(cookie: UInt64(i)), layer: layer, callout: id)) } }
        let bd = timed(threads, n) { _, r in for i in r { _ = base.remove(Key(flow: FlowHandle(cookie: UInt64(i)), layer: layer, callout: id)) } }
        for (name, secs) in [("store/\(threads)/associate", a), ("store/\(threads)/lookup", l), ("store/\(threads)/remove", d),
                             ("dict/\(threads)/associate", ba), ("dict/\(threads)/lookup", bl), ("dict/\(threads)/remove", bd)] {
            results[name, default: []].append(Double(n) / secs)
        }
    }
    FileHandle.standardError.write(Data("round \(round + 1)/\(rounds) done\n".utf8))
}

func median(_ v: [Double]) -> Double { let s = v.sorted(); return s[s.count / 2] }
print("B7 flow-context store vs Dictionary under one lock, \(n) flows, \(rounds) interleaved rounds, medians (Mops/s)")
print("threads  op          store     dict   ratio")
var json: [[String: Any]] = []
for threads in [1, 2] {
    for op in ["associate", "lookup", "remove"] {
        let s = median(results["store/\(threads)/\(op)"]!), b = median(results["dict/\(threads)/\(op)"]!)
        print("\(threads)".leftPad(7) + "  " + op.padding(toLength: 10, withPad: " ", startingAt: 0)
              + String(format: " %7.2f  %7.2f   %.2f", s / 1e6, b / 1e6, s / b))
        json.append(["threads": threads, "op": op, "store_ops_per_s": s, "dict_ops_per_s": b, "ratio": s / b])
    }
}
let out: [String: Any] = ["flows": n, "rounds": rounds, "results": json, "cpus": ProcessInfo.processInfo.activeProcessorCount,
                          "date": ISO8601DateFormatter().string(from: Date())]
try? FileManager.default.createDirectory(atPath: ".bench", withIntermediateDirectories: true)
try! JSONSerialization.data(withJSONObject: out, options: [.prettyPrinted, .sortedKeys]).write(to: URL(fileURLWithPath: ".bench/B7.json"))

extension String {
    func leftPad(_ n: Int) -> String { String(repeating: " ", count: max(0, n - count)) + self }
}
