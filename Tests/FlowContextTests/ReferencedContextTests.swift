import Synchronization
import Testing
@testable import FlowContext

@Suite("Filter Manager reference counting")
struct ReferencedContextTests {
    @Test("get/release/delete: cleanup exactly once, when the count reaches zero")
    func lifecycle() {
        let cleaned = Mutex(0)
        let ctx = ReferencedContext(value: "ctx") { _ in cleaned.withLock { $0 += 1 } }
        #expect(ctx.get() == "ctx")
        #expect(ctx.referenceCount == 2)
        ctx.delete()
        #expect(ctx.get() == nil)          // unlinked: later gets fail
        #expect(cleaned.withLock { $0 } == 0) // a reference is still out
        ctx.release()
        #expect(cleaned.withLock { $0 } == 1)
        ctx.release(); ctx.delete()
        #expect(cleaned.withLock { $0 } == 1)
    }

    @Test("delete with no outstanding reference cleans up at once")
    func deleteAlone() {
        let cleaned = Mutex(0)
        let ctx = ReferencedContext(value: 1) { _ in cleaned.withLock { $0 += 1 } }
        ctx.delete()
        #expect(cleaned.withLock { $0 } == 1 && !ctx.isLinked)
    }

    @Test("concurrent gets and releases with a delete in the middle: cleanup once")
    func concurrent() async {
        let cleaned = Mutex(0)
        let ctx = ReferencedContext(value: 7) { _ in cleaned.withLock { $0 += 1 } }
        await withTaskGroup(of: Void.self) { g in
            for t in 0..<4 {
                g.addTask {
                    for i in 0..<5000 {
                        if ctx.get() != nil { ctx.release() }
                        if t == 0 && i == 2500 { ctx.delete() }
                    }
                }
            }
        }
        #expect(cleaned.withLock { $0 } == 1)
        #expect(ctx.referenceCount == 0)
    }
}
