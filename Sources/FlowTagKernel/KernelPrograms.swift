#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import Foundation
import Synchronization

/// Sizes of the kernel maps. Zero keeps the object's default.
public struct KernelLimits: Sendable, Equatable {
    public var tcpFlows: UInt32
    public var udpFlows: UInt32
    public var processes: UInt32
    public var ringBufferBytes: UInt32

    public init(tcpFlows: UInt32 = 0, udpFlows: UInt32 = 0, processes: UInt32 = 0, ringBufferBytes: UInt32 = 0) {
        self.tcpFlows = tcpFlows; self.udpFlows = udpFlows
        self.processes = processes; self.ringBufferBytes = ringBufferBytes
    }
}

/// Which kernel map: the shim's list (`FTBPF_MAPS` in flowtag_shim.h) is the one list.
public typealias KernelMap = ftbpf_map

/// Run-time statistics of one program (needs `kernel.bpf_stats_enabled=1`).
public struct ProgramStats: Sendable, Hashable {
    public var name: String
    public var runTimeNanoseconds: UInt64
    public var runCount: UInt64
    public var averageNanoseconds: Double { runCount == 0 ? 0 : Double(runTimeNanoseconds) / Double(runCount) }
}

/// flowtag's BPF programs: probe, load, attach to a cgroup v2, pin, and detach leaving
/// nothing behind. One instance owns one loaded copy; `close()` is idempotent and also
/// runs on deinit.
public final class KernelPrograms: @unchecked Sendable {
    private let closed = Atomic<Bool>(false)
    private let handle: OpaquePointer
    public private(set) var attachedCgroup: String?
    public private(set) var pinDirectory: String?

    /// Checks that this kernel and host can run the programs; throws naming what is missing.
    public static func probe(btfPath: String = "/sys/kernel/btf/vmlinux") throws {
        guard access(btfPath, R_OK) == 0 else {
            if errno == EACCES { throw KernelError.notPrivileged("cannot read \(btfPath)") }
            throw KernelError.missingBTF(btfPath)
        }
        if let missing = missingCapabilities() {
            throw KernelError.notPrivileged("missing \(missing)")
        }
        var missing = [CChar](repeating: 0, count: 256)
        let rc = ftbpf_probe(&missing, missing.count)
        if rc == -EPERM || rc == -EACCES {
            throw KernelError.notPrivileged("the kernel refused a test program (\(errnoText(-rc)))")
        }
        if rc != 0 { throw KernelError.unsupported(cText(missing)) }
        guard Cgroup2.mountPoint() != nil else { throw KernelError.noCgroup2 }
    }

    /// The capabilities the agent needs, by experiment (see deploy/systemd/flowtagd.service):
    /// CAP_BPF (39) to load, CAP_PERFMON (38) for tracepoints and kernel reads,
    /// CAP_NET_ADMIN (12) to attach cgroup and sock_ops programs. CAP_SYS_ADMIN (21)
    /// covers the first two. Returns the missing ones, or nil.
    static func missingCapabilities() -> String? {
        guard let status = try? readFile("/proc/self/status") else { return nil }
        for line in status.split(separator: "\n") where line.hasPrefix("CapEff:") {
            guard let caps = UInt64(line.dropFirst(7).trimmingCharacters(in: " \t"), radix: 16) else { return nil }
            let admin = caps & (1 << 21) != 0
            var missing: [String] = []
            if caps & (1 << 39) == 0 && !admin { missing.append("CAP_BPF") }
            if caps & (1 << 38) == 0 && !admin { missing.append("CAP_PERFMON") }
            if caps & (1 << 12) == 0 { missing.append("CAP_NET_ADMIN") }
            return missing.isEmpty ? nil : missing.joined(separator: ", ")
        }
        return nil
    }

    /// Loads the programs (not yet attached).
    public init(limits: KernelLimits = KernelLimits()) throws {
        var config = ftbpf_config(tcp_flows_max: limits.tcpFlows, udp_flows_max: limits.udpFlows,
                                  procs_max: limits.processes, ringbuf_bytes: limits.ringBufferBytes)
        var err = [CChar](repeating: 0, count: 2048)
        var out: OpaquePointer?
        let rc = ftbpf_open_load(&config, &out, &err, err.count)
        guard rc == 0, let out else {
            let text = cText(err)
            // EACCES here is the verifier's refusal; EPERM is missing privilege.
            if rc == -EPERM { throw KernelError.notPrivileged(text) }
            throw KernelError.load(text)
        }
        handle = out
    }

    /// Adopts programs a previous agent pinned at `directory` and left running (it was
    /// killed): opens the pinned maps; the pinned links keep the programs attached, so
    /// nothing is loaded or attached twice. `close()` then detaches them by unpinning.
    public init(adoptingPinsAt directory: String) throws {
        var err = [CChar](repeating: 0, count: 1024)
        var out: OpaquePointer?
        let rc = ftbpf_open_pinned(directory, &out, &err, err.count)
        guard rc == 0, let out else {
            if rc == -EPERM || rc == -EACCES { throw KernelError.notPrivileged(cText(err)) }
            throw KernelError.pin(cText(err))
        }
        handle = out
        pinDirectory = directory
        adopted = true
    }

    /// True when this object adopted pinned programs rather than loading them.
    public private(set) var adopted = false

    /// Whether `directory` holds a previous agent's pins (maps and links).
    public static func hasPins(at directory: String) -> Bool {
        access(directory + "/maps/ft_events", F_OK) == 0 && access(directory + "/links", F_OK) == 0
    }

    /// Whether anything at all is pinned under `directory` (maps/ or links/).
    public static func hasAnyPins(at directory: String) -> Bool {
        access(directory + "/maps", F_OK) == 0 || access(directory + "/links", F_OK) == 0
    }

    /// The build identity of this agent's programs (`ft_build_info.object_hash`).
    public static var objectHash: UInt64 { ftbpf_object_hash() }

    /// Who pinned the programs at `directory`: nil when they predate build identities
    /// (or the map cannot be read).
    public static func pinnedBuild(at directory: String) -> ft_build_info? {
        let fd = ftbpf_obj_get(directory + "/maps/ft_build")
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        var key: UInt32 = 0
        var info = ft_build_info()
        guard ftbpf_map_lookup(fd, &key, &info) == 0, info.abi_version != 0 else { return nil }
        return info
    }

    /// Why the pins at `directory` cannot be adopted for `cgroup`, or nil when they can.
    public static func adoptionRefusal(pinsAt directory: String, cgroup: String) -> AdoptionRefusal? {
        guard let info = pinnedBuild(at: directory) else { return .olderBuild }
        if info.object_hash != objectHash || info.abi_version != UInt32(FT_ABI_VERSION) {
            return .otherBuild("they were made by another flowtag build (object \(hex(info.object_hash)), this one \(hex(objectHash)))")
        }
        let id = Cgroup2.id(of: cgroup) ?? 0
        if info.cgroup_id != id {
            return .otherCgroup("they are attached to another cgroup (id \(info.cgroup_id), not \(cgroup), id \(id))")
        }
        let links = (try? FileManager.default.contentsOfDirectory(atPath: directory + "/links"))?.count ?? 0
        let expected = Int(ftbpf_expected_links())
        if links != expected {
            return .incomplete("the set is incomplete (\(links) of \(expected) links: a start that did not finish)")
        }
        return nil
    }

    /// Why pins are not adopted; the cases say what their maps can still be read for.
    public enum AdoptionRefusal: Sendable, CustomStringConvertible {
        /// No build identity: maps of another ABI, and possibly an agent of that build still running.
        case olderBuild
        /// Another ABI: nothing in them can be read.
        case otherBuild(String)
        /// This build's maps, another cgroup: their unjournaled closes can be read first.
        case otherCgroup(String)
        /// This build, pinned partly.
        case incomplete(String)

        public var description: String {
            switch self {
            case .olderBuild: return "they were made by an older flowtag build"
            case .otherBuild(let why), .otherCgroup(let why), .incomplete(let why): return why
            }
        }

        /// Whether the maps are this build's (their closes can be read before they go).
        public var sameABI: Bool {
            switch self {
            case .otherCgroup, .incomplete: return true
            case .olderBuild, .otherBuild: return false
            }
        }
    }

    /// Removes whatever is pinned under `directory` (links detach their programs as their
    /// pins go), leaving the directory itself.
    public static func removePins(at directory: String) throws {
        for sub in ["links", "maps"] {
            let path = directory + "/" + sub
            guard let dir = opendir(path) else { continue }
            while let e = readdir(dir) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
                if name == "." || name == ".." { continue }
                if unlink(path + "/" + name) != 0 && errno != ENOENT {
                    let err = errno
                    closedir(dir)
                    throw KernelError.pin("cannot remove \(path)/\(name): \(errnoText(err))")
                }
            }
            closedir(dir)
            if rmdir(path) != 0 && errno != ENOENT { throw KernelError.pin("cannot remove \(path): \(errnoText(errno))") }
        }
    }

    /// Records this build and the attach cgroup in the build map (before pinning).
    func writeBuildInfo(cgroup: String) {
        var key: UInt32 = 0
        var info = ft_build_info(object_hash: Self.objectHash, cgroup_id: Cgroup2.id(of: cgroup) ?? 0,
                                 abi_version: UInt32(FT_ABI_VERSION), pad: 0)
        _ = ftbpf_map_update(mapFD(FTBPF_MAP_BUILD), &key, &info, 0)
    }

    deinit { close() }

    /// Attaches every program: the cgroup ones to `cgroupPath` (a cgroup v2 directory).
    /// On failure nothing stays attached.
    public func attach(cgroup cgroupPath: String) throws {
        let fd = try Cgroup2.open(cgroupPath)
        defer { Glibc.close(fd) }
        var err = [CChar](repeating: 0, count: 2048)
        let rc = ftbpf_attach(handle, fd, &err, err.count)
        guard rc == 0 else {
            let text = cText(err)
            if rc == -EPERM || rc == -EACCES { throw KernelError.notPrivileged(text) }
            throw KernelError.attach(text)
        }
        attachedCgroup = cgroupPath
        writeBuildInfo(cgroup: cgroupPath)
    }

    /// Pins maps and links under `directory` (on a bpffs; created when missing, else it
    /// must hold no pins), so user space can find them and a restarted agent can resynchronise.
    public func pin(at directory: String) throws {
        try BPFFS.check(pinDirectory: directory)
        if Self.hasAnyPins(at: directory) {
            throw KernelError.pin("\(directory) already holds pins: another flowtag agent may be running (if none is, remove them with: rm -r \(directory))")
        }
        createdPinDirectory = access(directory, F_OK) != 0
        let rc = ftbpf_pin(handle, directory)
        guard rc == 0 else {
            _ = ftbpf_unpin(handle, directory)
            if createdPinDirectory { rmdir(directory) }
            throw KernelError.pin("\(directory): \(errnoText(-rc))")
        }
        pinDirectory = directory
    }

    /// Detaches, unpins and frees everything. Safe to call more than once.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if let dir = pinDirectory {
            _ = ftbpf_unpin(handle, dir)
            // A directory `pin` made goes too; one that was there (an agent's lock) stays.
            if createdPinDirectory { rmdir(dir) }
        }
        ftbpf_destroy(handle)
    }

    /// Whether `pin` created the pin directory (tests pin without an agent's lock).
    private var createdPinDirectory = false

    /// Frees this object's handles and leaves the pins (and so the adopted programs)
    /// as they were, for the next agent to adopt. Safe to call more than once.
    public func release() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        ftbpf_destroy(handle)
    }

    public var isClosed: Bool { closed.load(ordering: .acquiring) }

    /// The fd of one of the maps (owned by this object).
    public func mapFD(_ map: KernelMap) -> Int32 { ftbpf_map_fd(handle, map) }

    /// Kernel ids of the loaded programs.
    public func programIDs() -> [UInt32] {
        var ids = [UInt32](repeating: 0, count: 64)
        let n = ftbpf_prog_ids(handle, &ids, ids.count)
        return n > 0 ? Array(ids[0..<Int(n)]) : []
    }

    /// Whether a program with this kernel id is still loaded (for leak checks).
    public static func programExists(id: UInt32) -> Bool { ftbpf_prog_exists(id) == 1 }

    public func programStats() -> [ProgramStats] {
        (0..<ftbpf_prog_count(handle)).compactMap { i in
            var name = [CChar](repeating: 0, count: 64)
            var t: UInt64 = 0, c: UInt64 = 0
            guard ftbpf_prog_stats(handle, i, &name, name.count, &t, &c) == 0 else { return nil }
            return ProgramStats(name: cText(name), runTimeNanoseconds: t, runCount: c)
        }
    }

    /// Sum over CPUs of one kernel counter.
    public func counter(_ index: ft_counter) -> UInt64 {
        var sum: UInt64 = 0
        _ = ftbpf_percpu_sum(mapFD(FTBPF_MAP_COUNTERS), index.rawValue, &sum)
        return sum
    }

    /// Deletes map entries by key, in batches; returns how many were deleted.
    @discardableResult
    public func deleteEntries<Key>(_ map: KernelMap, keys: [Key]) -> Int {
        guard !keys.isEmpty else { return 0 }
        let n = keys.withUnsafeBytes { ftbpf_map_delete_many(mapFD(map), $0.baseAddress, UInt32(MemoryLayout<Key>.stride), UInt32(keys.count)) }
        return max(0, Int(n))
    }

    /// Events the kernel could not deliver because the ring buffer was full.
    public var lostEvents: UInt64 { counter(FT_CNT_EVENTS_LOST) }
    /// Flows the kernel could not track because a flow map was full.
    public var droppedFlows: UInt64 { counter(FT_CNT_FLOWS_DROPPED) }

    /// TCP flows as the kernel holds them: live ones, and closed ones the journal does
    /// not hold yet (`FT_FLOW_CLOSED`). Also after an agent restart.
    public func tcpEntries() -> [ft_tcp_entry] {
        MapIterator<UInt64, ft_tcp_entry>(fd: mapFD(FTBPF_MAP_TCP_FLOWS)).all().map(\.1)
    }

    /// Live UDP flows with their running counters.
    public func liveUDPFlows() -> [(ft_udp_key, ft_udp_flow)] {
        MapIterator<ft_udp_key, ft_udp_flow>(fd: mapFD(FTBPF_MAP_UDP_FLOWS)).all()
    }

    /// Closes the agent made that the journal does not hold yet, by outbox key.
    public func outboxEntries() -> [(UInt64, ft_event)] {
        MapIterator<UInt64, ft_event>(fd: mapFD(FTBPF_MAP_OUTBOX)).all()
    }

    // Ring buffer access for EventReader.
    func openEvents(_ fn: ftbpf_event_fn, context: UnsafeMutableRawPointer) -> Int32 {
        ftbpf_events_open(handle, fn, context)
    }
    func pollEvents(timeoutMilliseconds: Int32) -> Int32 { ftbpf_events_poll(handle, timeoutMilliseconds) }
}

/// Reads a whole BPF hash map: in batches (one system call per few thousand entries),
/// or key by key where the kernel has no batch reads for the map type.
public struct MapIterator<Key, Value> {
    let fd: Int32
    static var batch: Int { 4096 }

    public init(fd: Int32) { self.fd = fd }

    public func all() -> [(Key, Value)] {
        if let batched = allBatched() { return batched }
        return allByKey()
    }

    private func allBatched() -> [(Key, Value)]? {
        var out: [(Key, Value)] = []
        let keys = UnsafeMutableRawPointer.allocate(byteCount: MemoryLayout<Key>.stride * Self.batch, alignment: 8)
        let values = UnsafeMutableRawPointer.allocate(byteCount: MemoryLayout<Value>.stride * Self.batch, alignment: 8)
        defer { keys.deallocate(); values.deallocate() }
        var cursor: UInt64 = 0
        while true {
            let n = ftbpf_map_read_many(fd, &cursor, keys, values, UInt32(Self.batch))
            if n < 0 { return out.isEmpty ? nil : out }
            for i in 0..<Int(n) {
                out.append((keys.load(fromByteOffset: i * MemoryLayout<Key>.size, as: Key.self),
                            values.load(fromByteOffset: i * MemoryLayout<Value>.size, as: Value.self)))
            }
            if n == 0 || cursor == 0 { return out }
        }
    }

    private func allByKey() -> [(Key, Value)] {
        var out: [(Key, Value)] = []
        let keySize = MemoryLayout<Key>.size, valueSize = MemoryLayout<Value>.size
        let key = UnsafeMutableRawPointer.allocate(byteCount: keySize, alignment: 8)
        let next = UnsafeMutableRawPointer.allocate(byteCount: keySize, alignment: 8)
        let value = UnsafeMutableRawPointer.allocate(byteCount: valueSize, alignment: 8)
        defer { key.deallocate(); next.deallocate(); value.deallocate() }
        var first = true
        while ftbpf_map_next_key(fd, first ? nil : key, next) == 0 {
            first = false
            key.copyMemory(from: next, byteCount: keySize)
            if ftbpf_map_lookup(fd, key, value) == 0 {
                out.append((key.load(as: Key.self), value.load(as: Value.self)))
            }
        }
        return out
    }
}

extension Substring {
    func trimmingCharacters(in set: String) -> String {
        let chars = Set(set)
        var s = self[...]
        while let f = s.first, chars.contains(f) { s = s.dropFirst() }
        while let l = s.last, chars.contains(l) { s = s.dropLast() }
        return String(s)
    }
}

/// A 64-bit value as 16 hex digits.
func hex(_ v: UInt64) -> String {
    let digits = String(v, radix: 16)
    return String(repeating: "0", count: 16 - digits.count) + digits
}
