import CFlowTagBPF
import Testing
@testable import FlowTagKernel

/// The ABI header is shared by the BPF programs (compiled by clang for BPF) and Swift
/// (imported through the shim): these sizes and offsets must match what the kernel writes.
@Suite("ABI layout")
struct ABILayoutTests {
    @Test func sizes() {
        #expect(MemoryLayout<ft_stamp>.size == 64)
        #expect(MemoryLayout<ft_sock_state>.size == 96)
        #expect(MemoryLayout<ft_tuple>.size == 40)
        #expect(MemoryLayout<ft_flow>.size == 144)
        #expect(MemoryLayout<ft_udp_key>.size == 56)
        #expect(MemoryLayout<ft_udp_flow>.size == 176)
        #expect(MemoryLayout<ft_close_stats>.size == 40)
        #expect(MemoryLayout<ft_event>.size == 208)
        #expect(MemoryLayout<ft_proc>.size == 576)
    }

    @Test func stampOffsets() {
        #expect(MemoryLayout<ft_stamp>.offset(of: \.tgid) == 0)
        #expect(MemoryLayout<ft_stamp>.offset(of: \.tid) == 4)
        #expect(MemoryLayout<ft_stamp>.offset(of: \.uid) == 8)
        #expect(MemoryLayout<ft_stamp>.offset(of: \.gid) == 12)
        #expect(MemoryLayout<ft_stamp>.offset(of: \.cgroup_id) == 16)
        #expect(MemoryLayout<ft_stamp>.offset(of: \.proc_start_ns) == 24)
        #expect(MemoryLayout<ft_stamp>.offset(of: \.stamped_ns) == 32)
        #expect(MemoryLayout<ft_stamp>.offset(of: \.comm) == 40)
        #expect(MemoryLayout<ft_stamp>.offset(of: \.attribution) == 56)
        #expect(MemoryLayout<ft_stamp>.offset(of: \.hook) == 57)
    }

    @Test func flowAndEventOffsets() {
        #expect(MemoryLayout<ft_tuple>.offset(of: \.remote) == 16)
        #expect(MemoryLayout<ft_tuple>.offset(of: \.local_port) == 32)
        #expect(MemoryLayout<ft_tuple>.offset(of: \.remote_port) == 34)
        #expect(MemoryLayout<ft_tuple>.offset(of: \.family) == 36)
        #expect(MemoryLayout<ft_tuple>.offset(of: \.protocol) == 37)
        #expect(MemoryLayout<ft_flow>.offset(of: \.owner) == 40)
        #expect(MemoryLayout<ft_flow>.offset(of: \.cookie) == 104)
        #expect(MemoryLayout<ft_flow>.offset(of: \.netns_cookie) == 112)
        #expect(MemoryLayout<ft_flow>.offset(of: \.opened_ns) == 120)
        #expect(MemoryLayout<ft_flow>.offset(of: \.last_ns) == 128)
        #expect(MemoryLayout<ft_flow>.offset(of: \.direction) == 136)
        #expect(MemoryLayout<ft_flow>.offset(of: \.flags) == 137)
        #expect(MemoryLayout<ft_event>.offset(of: \.time_ns) == 8)
        #expect(MemoryLayout<ft_event>.offset(of: \.flow) == 16)
        #expect(MemoryLayout<ft_event>.offset(of: \.stats) == 160)
        #expect(MemoryLayout<ft_udp_key>.offset(of: \.tuple) == 8)
        #expect(MemoryLayout<ft_udp_flow>.offset(of: \.bytes_sent) == 144)
        #expect(MemoryLayout<ft_proc>.offset(of: \.start_ns) == 16)
        #expect(MemoryLayout<ft_proc>.offset(of: \.flags) == 32)
        #expect(MemoryLayout<ft_proc>.offset(of: \.comm) == 40)
        #expect(MemoryLayout<ft_proc>.offset(of: \.exe) == 56)
        #expect(MemoryLayout<ft_proc>.offset(of: \.exe_dev) == 36)
        #expect(MemoryLayout<ft_proc>.offset(of: \.exe_ino) == 568)
        // Stream relay structs.
        #expect(MemoryLayout<ft_stream_rule>.size == 64)
        #expect(MemoryLayout<ft_stream_rule>.offset(of: \.cgroup_id) == 8)
        #expect(MemoryLayout<ft_stream_rule>.offset(of: \.exe_ino) == 16)
        #expect(MemoryLayout<ft_stream_rule>.offset(of: \.exe_dev) == 24)
        #expect(MemoryLayout<ft_stream_rule>.offset(of: \.local_port) == 28)
        #expect(MemoryLayout<ft_stream_rule>.offset(of: \.remote) == 32)
        #expect(MemoryLayout<ft_stream_rule>.offset(of: \.remote_prefix) == 48)
    }

    /// The relay's hand-over structs: written by sockops (BPF), read after accept (Swift).
    @Test func relayOffsets() {
        #expect(MemoryLayout<ft_relay_orig>.size == 112)
        #expect(MemoryLayout<ft_relay_orig>.offset(of: \.dst_port) == 16)
        #expect(MemoryLayout<ft_relay_orig>.offset(of: \.family) == 18)
        #expect(MemoryLayout<ft_relay_orig>.offset(of: \.mapped) == 19)
        #expect(MemoryLayout<ft_relay_orig>.offset(of: \.owner) == 24)
        #expect(MemoryLayout<ft_relay_orig>.offset(of: \.cookie) == 88)
        #expect(MemoryLayout<ft_relay_orig>.offset(of: \.netns_cookie) == 96)
        #expect(MemoryLayout<ft_relay_orig>.offset(of: \.connect_ns) == 104)
        #expect(MemoryLayout<ft_relay_pending_key>.size == 48)
        #expect(MemoryLayout<ft_relay_pending_key>.offset(of: \.peer) == 8)
        #expect(MemoryLayout<ft_relay_pending_key>.offset(of: \.local) == 24)
        #expect(MemoryLayout<ft_relay_pending_key>.offset(of: \.peer_port) == 40)
        #expect(MemoryLayout<ft_relay_pending_key>.offset(of: \.local_port) == 42)
        #expect(MemoryLayout<ft_relay_pending_key>.offset(of: \.family) == 44)
        #expect(MemoryLayout<ft_relay_listener>.size == 32)
        #expect(MemoryLayout<ft_relay_listener>.offset(of: \.ip4) == 16)
        #expect(MemoryLayout<ft_relay_listener>.offset(of: \.port4) == 20)
        #expect(MemoryLayout<ft_relay_listener>.offset(of: \.port6) == 22)
        #expect(MemoryLayout<ft_relay_mark>.size == 8)
        // LPM trie key: the prefix length first, then the bits it counts.
        #expect(MemoryLayout<ft_relay_hint_key>.size == 32)
        #expect(MemoryLayout<ft_relay_hint_key>.offset(of: \.family) == 4)
        #expect(MemoryLayout<ft_relay_hint_key>.offset(of: \.netns_cookie) == 8)
        #expect(MemoryLayout<ft_relay_hint_key>.offset(of: \.addr) == 16)
        #expect(MemoryLayout<ft_relay_request>.size == 16)
        // Inbound: the endpoint key and the entry sockops completes.
        #expect(MemoryLayout<ft_relay_endpoint>.size == 32)
        #expect(MemoryLayout<ft_relay_endpoint>.offset(of: \.port) == 16)
        #expect(MemoryLayout<ft_relay_endpoint>.offset(of: \.family) == 18)
        #expect(MemoryLayout<ft_relay_endpoint>.offset(of: \.netns_cookie) == 24)
        #expect(MemoryLayout<ft_relay_inbound>.size == 104)
        #expect(MemoryLayout<ft_relay_inbound>.offset(of: \.owner) == 32)
        #expect(MemoryLayout<ft_relay_inbound>.offset(of: \.server_cookie) == 96)
        #expect(MemoryLayout<ft_relay_splice_ctl>.size == 24)
        #expect(MemoryLayout<ft_relay_splice_ctl>.offset(of: \.consumed) == 8)
        #expect(MemoryLayout<ft_relay_splice_ctl>.offset(of: \.hold) == 16)
        #expect(MemoryLayout<ft_relay_splice_stat>.size == 56)
        #expect(MemoryLayout<ft_relay_splice_stat>.offset(of: \.passed) == 8)
        #expect(MemoryLayout<ft_relay_splice_stat>.offset(of: \.next_seq) == 40)
    }

    @Test func everyStructIsEightByteAligned() {
        for size in [MemoryLayout<ft_stamp>.size, MemoryLayout<ft_sock_state>.size, MemoryLayout<ft_tuple>.size,
                     MemoryLayout<ft_flow>.size, MemoryLayout<ft_udp_key>.size, MemoryLayout<ft_udp_flow>.size,
                     MemoryLayout<ft_close_stats>.size, MemoryLayout<ft_event>.size, MemoryLayout<ft_proc>.size,
                     MemoryLayout<ft_relay_orig>.size, MemoryLayout<ft_relay_pending_key>.size, MemoryLayout<ft_relay_listener>.size,
                     MemoryLayout<ft_relay_hint_key>.size, MemoryLayout<ft_relay_request>.size,
                     MemoryLayout<ft_relay_endpoint>.size, MemoryLayout<ft_relay_inbound>.size,
                     MemoryLayout<ft_relay_splice_ctl>.size, MemoryLayout<ft_relay_splice_stat>.size] {
            #expect(size % 8 == 0)
        }
    }
}

@Suite("Addresses and time")
struct AddressTests {
    @Test func ipv4MappedBecomesIPv4() {
        var bytes = [UInt8](repeating: 0, count: 16)
        bytes[10] = 0xff; bytes[11] = 0xff
        bytes[12] = 127; bytes[15] = 1
        #expect(IPAddress(bytes: bytes, family: 10) == IPAddress("127.0.0.1"))
        #expect(IPAddress(bytes: bytes, family: 10).description == "127.0.0.1")
    }

    @Test func rawAndArrayAgree() {
        for text in ["10.1.2.3", "::1", "fd00::1:2", "::ffff:127.0.0.1"] {
            let a = IPAddress(text)!
            let v6 = a.isIPv4 && !text.contains(":") ? Int32(2) : Int32(10)
            var bytes = a.bytes
            if v6 == 10 && a.isIPv4 { bytes = Array(repeating: 0, count: 10) + [0xff, 0xff] + Array(a.bytes[0..<4]) }
            let raw = bytes.withUnsafeBytes { IPAddress(raw: $0, family: v6) }
            #expect(raw == IPAddress(bytes: bytes, family: v6) && raw == a, "\(text)")
        }
    }

    @Test func parsesAndPrints() {
        #expect(IPAddress("::1")?.description == "::1")
        #expect(IPAddress("fd00::1:2")?.description == "fd00::1:2")
        #expect(IPAddress("10.1.2.3")?.description == "10.1.2.3")
        #expect(IPAddress("10.1.2") == nil)
        #expect(IPAddress("not an address") == nil)
    }

    @Test func prefixes() throws {
        let p = try #require(IPPrefix("10.0.0.0/8"))
        #expect(p.contains(IPAddress("10.200.1.1")!))
        #expect(!p.contains(IPAddress("11.0.0.1")!))
        let v6 = try #require(IPPrefix("fd00::/8"))
        #expect(v6.contains(IPAddress("fd12::1")!))
        #expect(!v6.contains(IPAddress("fe80::1")!))
        #expect(IPPrefix("10.0.0.0/33") == nil)
        #expect(IPPrefix("0.0.0.0/0")!.contains(IPAddress("1.2.3.4")!))
        #expect(IPPrefix("::/0")!.contains(IPAddress("::1")!))
        #expect(IPPrefix("1.2.3.4")!.length == 32)
    }

    @Test func wallTimeRoundTrips() throws {
        let t = WallTime(nanoseconds: 1_795_000_000_123_456_789)
        let text = t.description
        #expect(text.hasSuffix(".123456789Z"))
        #expect(WallTime(rfc3339: text) == t)
        #expect(WallTime(rfc3339: "2026-11-22T01:00:00+01:00") == WallTime(rfc3339: "2026-11-22T00:00:00Z"))
        #expect(WallTime(rfc3339: "2026-13-01T00:00:00Z") == nil)
        #expect(WallTime(rfc3339: "yesterday") == nil)
    }

    @Test func cgroupMountFromProcMounts() {
        let mounts = """
        tmpfs /sys/fs/cgroup tmpfs rw 0 0
        cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0
        cgroup2 /sys/fs/cgroup/uni\\040fied cgroup2 rw 0 0
        """
        #expect(Cgroup2.mountPoint(mounts: mounts) == "/sys/fs/cgroup/uni fied")
        #expect(Cgroup2.mountPoint(mounts: "proc /proc proc rw 0 0") == nil)
    }
}
