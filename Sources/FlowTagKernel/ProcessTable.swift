#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import Synchronization

/// A process-table entry as user space sees it.
public struct ProcessEntry: Sendable, Hashable {
    public var tgid: UInt32
    public var ppid: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var startNanoseconds: UInt64
    public var exe: String
    public var comm: String
    public var seeded: Bool
    public var exited: Bool

    init(_ p: ft_proc) {
        var p = p
        tgid = p.tgid; ppid = p.ppid; uid = p.uid; gid = p.gid
        startNanoseconds = p.start_ns
        exe = cString(&p.exe)
        comm = cString(&p.comm)
        seeded = p.flags & FT_PROC_SEEDED.rawValue != 0
        exited = p.flags & FT_PROC_EXITED.rawValue != 0
    }
}

/// Reads a NUL-terminated string out of an imported fixed-size C char array.
func cString<T>(_ tuple: inout T) -> String {
    withUnsafeBytes(of: &tuple) { raw in
        let bytes = raw.bindMemory(to: UInt8.self)
        let n = bytes.firstIndex(of: 0) ?? bytes.count
        return String(decoding: bytes[0..<n], as: UTF8.self)
    }
}

/// Writes a string into an imported fixed-size C char array, truncated and NUL-terminated.
func setCString<T>(_ tuple: inout T, _ value: String) {
    withUnsafeMutableBytes(of: &tuple) { raw in
        let utf8 = Array(value.utf8.prefix(raw.count - 1))
        for i in 0..<raw.count { raw[i] = i < utf8.count ? utf8[i] : 0 }
    }
}

/// The kernel's process table (tgid → executable, comm, ids), seeded from /proc for
/// processes that predate the programs, with a small user-space cache in front.
/// Thread-safe: the event thread and resynchronisation use it at once.
public final class ProcessTable: Sendable {
    private let fd: Int32
    private let cache = Mutex<[UInt32: ProcessEntry]>([:])
    private let cacheLimit = 65536
    static let ticksPerSecond: UInt64 = UInt64(sysconf(Int32(_SC_CLK_TCK)))

    public init(programs: KernelPrograms) { fd = programs.mapFD(FTBPF_MAP_PROCS) }

    /// The kernel entry for a tgid, if any.
    public func kernelEntry(_ tgid: UInt32) -> ProcessEntry? {
        var key = tgid
        var p = ft_proc()
        guard ftbpf_map_lookup(fd, &key, &p) == 0 else { return nil }
        return ProcessEntry(p)
    }

    /// Fills the kernel table from /proc for every process it does not know yet.
    /// Entries written by the exec hook in the meantime are kept (BPF_NOEXIST).
    @discardableResult
    public func seedFromProc() -> Int {
        guard let dir = opendir("/proc") else { return 0 }
        defer { closedir(dir) }
        var seeded = 0
        while let ent = readdir(dir) {
            let name = withUnsafeBytes(of: ent.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            guard let pid = UInt32(name), var p = Self.procEntry(pid: pid) else { continue }
            var key = pid
            if ftbpf_map_update(fd, &key, &p, 1 /* BPF_NOEXIST */) == 0 { seeded += 1 }
        }
        return seeded
    }

    /// Builds an entry for a live process from /proc (nil for kernel threads and races).
    static func procEntry(pid: UInt32) -> ft_proc? {
        guard let exe = readLink("/proc/\(pid)/exe"),
              let stat = try? readFile("/proc/\(pid)/stat"),
              let status = try? readFile("/proc/\(pid)/status") else { return nil }
        // comm may hold spaces and parentheses: fields start after the last ')'.
        guard let open = stat.firstIndex(of: "("), let close = stat.lastIndex(of: ")") else { return nil }
        let comm = String(stat[stat.index(after: open)..<close])
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // fields[0] is state (field 3); ppid is field 4, starttime field 22.
        guard fields.count > 19, let ppid = UInt32(fields[1]), let start = UInt64(fields[19]) else { return nil }
        var uid: UInt32 = 0, gid: UInt32 = 0
        for line in status.split(separator: "\n") {
            if line.hasPrefix("Uid:") { uid = UInt32(line.split(separator: "\t").dropFirst().first ?? "") ?? 0 }
            if line.hasPrefix("Gid:") { gid = UInt32(line.split(separator: "\t").dropFirst().first ?? "") ?? 0 }
        }
        var p = ft_proc()
        p.tgid = pid; p.ppid = ppid; p.uid = uid; p.gid = gid
        p.start_ns = start * (1_000_000_000 / ticksPerSecond)
        p.flags = FT_PROC_SEEDED.rawValue
        setCString(&p.comm, comm)
        setCString(&p.exe, exe)
        if let file = ExecutableIdentity(path: "/proc/\(pid)/exe") {
            p.exe_dev = file.device
            p.exe_ino = file.inode
        }
        return p
    }

    /// Resolves the process a stamp names: the entry whose start time matches.
    /// Seeded entries carry /proc's tick-granular start, so they match within one tick.
    public func resolve(tgid: UInt32, startNanoseconds: UInt64) -> ProcessEntry? {
        guard tgid != 0 else { return nil }
        if let e = cache.withLock({ $0[tgid] }), Self.sameProcess(e, startNanoseconds) { return e }
        if let e = kernelEntry(tgid), Self.sameProcess(e, startNanoseconds) {
            remember(e)
            return e
        }
        // Not in the table (evicted, or forked before seeding): ask /proc while it lives.
        if let p = Self.procEntry(pid: tgid) {
            let e = ProcessEntry(p)
            if Self.sameProcess(e, startNanoseconds) {
                remember(e)
                return e
            }
        }
        return nil
    }

    static func sameProcess(_ e: ProcessEntry, _ start: UInt64) -> Bool {
        if start == 0 || e.startNanoseconds == start { return true }
        guard e.seeded else { return false }
        let tick = 1_000_000_000 / ticksPerSecond
        return start >= e.startNanoseconds && start - e.startNanoseconds < tick
    }

    private func remember(_ e: ProcessEntry) {
        cache.withLock { c in
            if c.count >= cacheLimit { c.removeAll(keepingCapacity: true) }
            c[e.tgid] = e
        }
    }
}
