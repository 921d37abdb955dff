#if canImport(Glibc)
import Glibc
#endif
import CFlowTagBPF
import CLinuxCalls

/// Why the kernel side could not start or stop. Every case names the problem and what
/// to do about it; `exitCode` is what executables return.
public enum KernelError: Error, CustomStringConvertible, Equatable {
    case notPrivileged(String)
    case missingBTF(String)
    case noCgroup2
    case cgroupNotFound(String)
    case notACgroup2(String)
    case bpffsMissing(String)
    case unsupported(String)
    case load(String)
    case attach(String)
    case pin(String)
    case system(String, Int32)
    case invalidArgument(String)

    public var description: String {
        switch self {
        case .notPrivileged(let what):
            return "insufficient privileges: \(what) (run as root, or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN; CAP_SYS_PTRACE to name processes of other users that predate the agent)"
        case .missingBTF(let path):
            return "kernel BTF not found at \(path): the kernel needs CONFIG_DEBUG_INFO_BTF=y"
        case .noCgroup2:
            return "no cgroup v2 hierarchy is mounted (see /proc/mounts); mount one with: mount -t cgroup2 none /sys/fs/cgroup/unified"
        case .cgroupNotFound(let path):
            return "cgroup path does not exist: \(path)"
        case .notACgroup2(let path):
            return "not a cgroup v2 directory: \(path)"
        case .bpffsMissing(let path):
            return "no BPF filesystem at \(path): mount one with: mount -t bpf bpf \(path)"
        case .unsupported(let what):
            return "this kernel cannot run flowtag: missing \(what)"
        case .load(let why):
            return "loading the BPF programs failed: \(why)"
        case .attach(let why):
            return "attaching the BPF programs failed: \(why)"
        case .pin(let why):
            return "pinning failed: \(why)"
        case .system(let what, let err):
            return "\(what): \(String(cString: strerror(err)))"
        case .invalidArgument(let what):
            return what
        }
    }
}

func errnoText(_ err: Int32) -> String { String(cString: strerror(err)) }

/// The cgroup v2 hierarchy: where it is mounted and how to reach a directory in it.
public enum Cgroup2 {
    static let magic: Int = 0x6367_7270 // CGROUP2_SUPER_MAGIC

    /// Mount point of the cgroup2 filesystem, from /proc/mounts (never assumed).
    public static func mountPoint(mounts: String? = nil) -> String? {
        let text = mounts ?? (try? readFile("/proc/mounts")) ?? ""
        for line in text.split(separator: "\n") {
            let f = line.split(separator: " ")
            if f.count >= 3 && f[2] == "cgroup2" { return unescapeMount(String(f[1])) }
        }
        return nil
    }

    /// /proc/mounts escapes space, tab, newline and backslash as octal.
    static func unescapeMount(_ s: String) -> String {
        var out = [UInt8]()
        let b = Array(s.utf8)
        var i = 0
        while i < b.count {
            if b[i] == 92, i + 3 < b.count, let v = UInt8(String(decoding: b[i + 1...i + 3], as: UTF8.self), radix: 8) {
                out.append(v); i += 4
            } else {
                out.append(b[i]); i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    public static func isCgroup2(_ path: String) -> Bool {
        var type: Int64 = 0
        return lc_statfs_type(path, &type) == 0 && Int(type) == magic
    }

    /// Opens a cgroup v2 directory for attaching; the caller closes the fd.
    public static func open(_ path: String) throws -> Int32 {
        var st = stat()
        guard stat(path, &st) == 0 else {
            if errno == EACCES { throw KernelError.notPrivileged("cannot read \(path)") }
            throw KernelError.cgroupNotFound(path)
        }
        guard (st.st_mode & S_IFMT) == S_IFDIR, isCgroup2(path) else { throw KernelError.notACgroup2(path) }
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw KernelError.system("open \(path)", errno) }
        return fd
    }

    /// The cgroup v2 id of a directory (its inode number), as bpf_get_current_cgroup_id() reports it.
    public static func id(of path: String) -> UInt64? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return UInt64(st.st_ino)
    }

    /// Path of the cgroup (relative to the cgroup2 mount) a process belongs to.
    public static func path(ofProcess pid: Int32) -> String? {
        guard let text = try? readFile("/proc/\(pid)/cgroup") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("0::") {
            return String(line.dropFirst(3))
        }
        return nil
    }
}

/// The BPF filesystem that holds flowtag's pins.
public enum BPFFS {
    static let magic: Int = 0xcafe_4a11

    public static func isMounted(at path: String) -> Bool {
        var type: Int64 = 0
        return lc_statfs_type(path, &type) == 0 && Int(type) == magic
    }

    /// Finds the bpffs a pin directory would live on: the directory itself or its parent.
    public static func check(pinDirectory dir: String) throws {
        let parent = dir.split(separator: "/").dropLast().joined(separator: "/")
        let base = "/" + parent
        if isMounted(at: dir) || isMounted(at: base) { return }
        throw KernelError.bpffsMissing(base == "/" ? dir : base)
    }
}

/// Reads a whole small file (procfs, sysfs) as text.
public func readFile(_ path: String) throws -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw KernelError.system("open \(path)", errno) }
    defer { close(fd) }
    var out = [UInt8]()
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(fd, &buf, buf.count)
        if n < 0 {
            if errno == EINTR { continue }
            throw KernelError.system("read \(path)", errno)
        }
        if n == 0 { break }
        out.append(contentsOf: buf[0..<n])
    }
    return String(decoding: out, as: UTF8.self)
}

/// readlink(2) as a String, nil on error.
public func readLink(_ path: String) -> String? {
    var buf = [CChar](repeating: 0, count: 4097)
    let n = readlink(path, &buf, 4096)
    guard n >= 0 else { return nil }
    return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// The text in a NUL-terminated C buffer.
func cText(_ buf: [CChar]) -> String {
    String(decoding: buf.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// An executable as the kernel names it at exec: the device of its superblock (kernel
/// `dev_t`, `major << 20 | minor`) and its inode. Stream rules select flows by it, so a
/// rule follows the file, not a spelling of its path.
public struct ExecutableIdentity: Sendable, Hashable {
    public var device: UInt32
    public var inode: UInt64

    public init(device: UInt32, inode: UInt64) { self.device = device; self.inode = inode }

    /// stat(2) of the path (symlinks followed); nil when it does not exist.
    public init?(path: String) {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        // glibc's dev_t encoding → the kernel's internal one (MKDEV).
        let dev = UInt64(st.st_dev)
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff))
        let minor = (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff))
        self.device = UInt32(truncatingIfNeeded: (major << 20) | minor)
        self.inode = UInt64(st.st_ino)
    }
}
