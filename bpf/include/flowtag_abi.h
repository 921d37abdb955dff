/* flowtag kernel/user ABI: the structs the BPF programs write and the agent reads.
 *
 * Plain C, fixed-width fields, explicit padding, every struct a multiple of 8 bytes.
 * Included by bpf/flowtag.bpf.c (after vmlinux.h) and by the Swift side through the
 * CFlowTagBPF module. Layout is checked by _Static_assert here and from Swift tests.
 */
#ifndef FLOWTAG_ABI_H
#define FLOWTAG_ABI_H

#ifndef __VMLINUX_H__
#include <stdint.h>
typedef uint8_t ft_u8;
typedef uint16_t ft_u16;
typedef uint32_t ft_u32;
typedef uint64_t ft_u64;
#else
typedef __u8 ft_u8;
typedef __u16 ft_u16;
typedef __u32 ft_u32;
typedef __u64 ft_u64;
#endif

#define FT_COMM_LEN 16
#define FT_PATH_MAX 512

/* ft_stamp.attribution */
enum ft_attribution {
    FT_ATTR_UNKNOWN = 0,   /* socket predates the programs: no stamp */
    FT_ATTR_KERNEL = 1,    /* stamped in process context by the acting process */
    FT_ATTR_INHERITED = 2, /* cloned from the listener, not yet refined by accept */
};

/* ft_stamp.hook: which hook wrote the stamp last */
enum ft_hook {
    FT_HOOK_NONE = 0,
    FT_HOOK_SOCK_CREATE = 1,
    FT_HOOK_CONNECT = 2,
    FT_HOOK_SENDMSG = 3,
    FT_HOOK_RECVMSG = 4,
    FT_HOOK_ACCEPT = 5,
    FT_HOOK_SEND = 6, /* sock_send_length: the process that actually sent */
    FT_HOOK_IO = 7,   /* first I/O on an inherited (accepted) socket */
};

/* Owner of a socket, kept in socket-local storage and copied into flows. 64 bytes. */
struct ft_stamp {
    ft_u32 tgid;
    ft_u32 tid;
    ft_u32 uid;
    ft_u32 gid;
    ft_u64 cgroup_id;
    ft_u64 proc_start_ns; /* boottime start of the process: (tgid, start) names a proc-table entry */
    ft_u64 stamped_ns;    /* boottime */
    char comm[FT_COMM_LEN];
    ft_u8 attribution;
    ft_u8 hook;
    ft_u8 pad[6];
};

/* Socket-local storage value: the stamp plus per-socket bookkeeping. 96 bytes. */
struct ft_sock_state {
    struct ft_stamp owner;
    ft_u8 udp_peer[16]; /* last peer given to sendmsg/recvmsg on an unconnected UDP socket */
    ft_u16 udp_peer_port; /* host order */
    ft_u8 udp_peer_family;
    ft_u8 pad[5];
    ft_u64 pad2;
};

/* Addresses are 16 bytes; IPv4 uses the first 4 (network order). Ports host order. 40 bytes. */
struct ft_tuple {
    ft_u8 local[16];
    ft_u8 remote[16];
    ft_u16 local_port;
    ft_u16 remote_port;
    ft_u8 family;   /* AF_INET (2) or AF_INET6 (10): the socket's family */
    ft_u8 protocol; /* IPPROTO_TCP (6) or IPPROTO_UDP (17) */
    ft_u8 pad[2];
};

enum ft_direction { FT_DIR_OUTBOUND = 1, FT_DIR_INBOUND = 2 };

/* ft_flow.flags */
enum ft_flow_flags {
    FT_FLOW_PENDING_ACCEPT = 1, /* passive flow not yet accepted: open not reported */
    FT_FLOW_RELAYED = 2,        /* redirected to the agent's relay by a stream rule; the tuple
                                   names the original destination */
    FT_FLOW_CLOSED = 4,         /* TCP: the socket closed; the entry stays until the agent has
                                   journaled the close, so a crash of the agent loses none */
};

/* A live flow: value of the live-flow maps, and the body of every flow event. 144 bytes. */
struct ft_flow {
    struct ft_tuple tuple;
    struct ft_stamp owner;
    ft_u64 cookie;        /* socket cookie: the flow handle */
    ft_u64 netns_cookie;
    ft_u64 opened_ns;     /* boottime */
    ft_u64 last_ns;       /* boottime of the last activity (UDP idle expiry) */
    ft_u8 direction;
    ft_u8 flags;
    ft_u16 pad;
    ft_u32 pad2;
};

/* UDP flow key: one flow per (netns, 5-tuple). 56 bytes. */
struct ft_udp_key {
    ft_u64 netns_cookie;
    struct ft_tuple tuple;
    ft_u64 pad;
};

/* UDP flow value: the flow plus its running counters. 176 bytes. */
struct ft_udp_flow {
    struct ft_flow flow;
    ft_u64 bytes_sent;
    ft_u64 bytes_received;
    ft_u64 packets_sent;
    ft_u64 packets_received;
};

/* Counters reported when a flow closes. 40 bytes. */
struct ft_close_stats {
    ft_u64 bytes_sent;
    ft_u64 bytes_received;
    ft_u32 segs_out;
    ft_u32 segs_in;
    ft_u32 retransmits;
    ft_u32 srtt_us;
    ft_u32 last_state; /* TCP state before TCP_CLOSE */
    ft_u32 pad;
};

/* Value of the TCP flow map: the flow, and once FT_FLOW_CLOSED its close. 192 bytes. */
struct ft_tcp_entry {
    struct ft_flow flow;
    struct ft_close_stats stats;
    ft_u64 closed_ns; /* boottime */
};

enum ft_event_kind {
    FT_EV_OPEN = 1,
    FT_EV_CLOSE = 2,
    FT_EV_SOCK_RELEASE = 3, /* a UDP socket was released: its flows end */
};

/* Why the agent closed a flow it keeps in the outbox (ft_event.close_reason). */
enum ft_close_reason {
    FT_CLOSE_KERNEL = 0,       /* a kernel event: the reason follows from stats.last_state */
    FT_CLOSE_UDP_IDLE = 1,     /* UDP: idle past the agent's timeout */
    FT_CLOSE_UDP_RELEASED = 2, /* UDP: its socket was released */
    FT_CLOSE_SEEDED = 3,       /* a connection older than the agent left the socket table */
};

/* One ring-buffer record (and outbox value). 208 bytes. */
struct ft_event {
    ft_u32 kind;
    ft_u32 close_reason; /* ft_close_reason */
    ft_u64 time_ns; /* boottime */
    struct ft_flow flow;
    struct ft_close_stats stats;
    ft_u64 reserved;
};

/* Closes the agent made itself (UDP idle or release, flows older than the agent) wait
 * in the pinned outbox map, keyed by the agent's sequence number, until journaled. */
#define FT_OUTBOX_MAX 65536
/* Outbox keys with this bit are the kernel's: the unjournaled close of a socket's earlier
 * connection (reconnected after connect(AF_UNSPEC)), keyed by its cookie. The agent's own
 * keys are sequence numbers below it. */
#define FT_OUTBOX_MOVED (1ULL << 63)

/* Identity of the programs pinned in a directory: a restarted agent adopts them only
 * when they are its own build, attached to the cgroup it was asked for. 24 bytes. */
struct ft_build_info {
    ft_u64 object_hash; /* FNV-1a of the BPF object */
    ft_u64 cgroup_id;   /* inode of the attach cgroup */
    ft_u32 abi_version;
    ft_u32 pad;
};
#define FT_ABI_VERSION 4

/* Process table entry, keyed by tgid. Entries outlive the process (LRU). 576 bytes. */
enum ft_proc_flags {
    FT_PROC_SEEDED = 1, /* filled from /proc by the agent, not observed at exec */
    FT_PROC_EXITED = 2,
    FT_PROC_PATH_TRUNCATED = 4,
};
struct ft_proc {
    ft_u32 tgid;
    ft_u32 ppid;
    ft_u32 uid;
    ft_u32 gid;
    ft_u64 start_ns; /* boottime */
    ft_u64 exit_ns;
    ft_u32 flags;
    ft_u32 exe_dev; /* kernel dev_t (MKDEV: major << 20 | minor) of the executable */
    char comm[FT_COMM_LEN];
    char exe[FT_PATH_MAX];
    ft_u64 exe_ino; /* inode of the executable: stream rules match (dev, ino) */
};

/* Indexes of the per-CPU counter array. */
enum ft_counter {
    FT_CNT_EVENTS_LOST = 0, /* ring buffer full: an event the kernel could not deliver */
    FT_CNT_FLOWS_DROPPED = 1, /* live-flow map full */
    FT_CNT_STAMPS = 2,
    FT_CNT_EXECS = 3,
    FT_CNT_RELAY_PENDING_FULL = 4, /* a redirected connect's hand-over entry was not stored */
    FT_CNT_MAX = 8,
};

/* ---------------------------------------------------------------- stream relay
 *
 * WFP's connect-redirect: the relay object's cgroup/connect4|6 hook records a selected
 * socket's original destination and owner (ft_relay_origs) and points the connect at the
 * agent's listener in the socket's netns (ft_relay_listeners). When the process's socket
 * is established, sockops publishes the hand-over entry ft_relay_pending[the tuple the
 * listener sees]; the agent looks it up after accept(), connects to the original
 * destination itself and runs the callouts between its two sockets. The process's socket
 * stays an ordinary TCP socket; getpeername shows the original destination. */
#define FT_STREAM_RULES_MAX 16
#define FT_RELAY_LISTENERS_MAX 1024
#define FT_RELAY_PENDING_MAX 65536
#define FT_RELAY_HINTS_MAX 16384
#define FT_RELAY_INBOUND_MAX 65536

enum ft_rule_match {
    FT_MATCH_EXE = 1,
    FT_MATCH_UID = 2,
    FT_MATCH_CGROUP = 4,
    FT_MATCH_LOCAL_PORT = 8,
    FT_MATCH_REMOTE_PORT = 16,
    FT_MATCH_REMOTE_ADDR = 32,
    FT_MATCH_DIRECTION = 64,
    FT_MATCH_ANY = 128, /* a rule with no condition: every TCP flow */
};

/* A stream-relay selection rule: every condition in `match` must hold. 64 bytes. */
struct ft_stream_rule {
    ft_u32 match; /* 0: unused slot */
    ft_u32 uid;
    ft_u64 cgroup_id;
    ft_u64 exe_ino;
    ft_u32 exe_dev;
    ft_u16 local_port;
    ft_u16 remote_port;
    ft_u8 remote[16];    /* network order; IPv4 in the first 4 bytes */
    ft_u8 remote_prefix; /* bits */
    ft_u8 remote_family; /* AF_INET or AF_INET6 */
    ft_u8 direction;     /* ft_direction */
    ft_u8 pad[5];
    ft_u64 pad2;
};

/* A redirected socket's original destination and owner (socket storage on the
 * process's socket, and the value of the hand-over entry). 112 bytes. */
struct ft_relay_orig {
    ft_u8 dst[16];    /* network order; IPv4 (also v4-mapped) in the first 4 bytes */
    ft_u16 dst_port;  /* host order */
    ft_u8 family;     /* AF_INET or AF_INET6: the family of dst (v4-mapped is AF_INET) */
    ft_u8 mapped;     /* 1: an AF_INET6 socket connecting to a v4-mapped address */
    ft_u32 pad;
    struct ft_stamp owner;
    ft_u64 cookie;    /* the process socket's cookie: the flow handle */
    ft_u64 netns_cookie;
    ft_u64 connect_ns; /* boottime */
};

/* Hand-over key: the connection as the agent's listener sees it. 48 bytes. */
struct ft_relay_pending_key {
    ft_u64 netns_cookie;
    ft_u8 peer[16];   /* the process socket's address (IPv4 in the first 4 bytes) */
    ft_u8 local[16];  /* the listener's address */
    ft_u16 peer_port; /* host order */
    ft_u16 local_port;
    ft_u8 family;     /* AF_INET or AF_INET6 as the listener sees it */
    ft_u8 pad[3];
};

/* The agent's listeners in one netns (keyed by netns cookie). 32 bytes. */
struct ft_relay_listener {
    ft_u8 ip6[16];   /* where IPv6 connects go (network order), normally ::1 */
    ft_u32 ip4;      /* where IPv4 connects go (network order), normally 127.0.0.1 */
    ft_u16 port4;    /* host order; 0: no IPv4 listener */
    ft_u16 port6;    /* host order; 0: no IPv6 listener */
    ft_u32 flags;
    ft_u32 pad;
};

/* Socket storage on the agent's own relay sockets (and, cloned, on every socket its
 * listeners accept): never selected, never a flow. 8 bytes. */
struct ft_relay_mark {
    ft_u32 agent;
    ft_u32 pad;
};

/* Natural source addresses: LPM key {prefix bits = 64 + address bits, netns, address}.
 * A redirected connect goes to the listener at the source the destination would have
 * given the socket, so the process's getsockname is what it would be without the relay. */
struct ft_relay_hint_key {
    ft_u32 prefixlen;
    ft_u32 family;   /* part of the key, always matched (prefixlen counts it) */
    ft_u64 netns_cookie;
    ft_u8 addr[16];
};
struct ft_relay_hint {
    ft_u8 source[16];
};

/* A connect the relay could not take because its netns has no listener yet: the agent
 * creates one (ring buffer record). 16 bytes. */
struct ft_relay_request {
    ft_u64 netns_cookie;
    ft_u32 tgid;
    ft_u32 ns_inum; /* inode of the netns (/proc/PID/ns/net): found again if tgid has exited */
};

/* Inbound relaying (WFP's inbound stream on a redirected accept): the relay object's
 * sk_lookup program gives a SYN that an inbound rule selects to the agent's inbound
 * listener; the agent connects to the original destination (the server) from an address
 * and port it publishes here first, keyed by that endpoint: sk_lookup lets its SYN pass,
 * and the flowtag object names the real client in the server's flow and getpeername. */
struct ft_relay_endpoint {
    ft_u8 addr[16];   /* network order; IPv4 (also v4-mapped) in the first 4 bytes */
    ft_u16 port;      /* host order */
    ft_u8 family;     /* AF_INET or AF_INET6 (v4-mapped is AF_INET) */
    ft_u8 pad[5];
    ft_u64 netns_cookie;
};
/* 104 bytes. The agent writes client; sockops writes the server socket's cookie and its
 * owner (the listener's, as WFP names an inbound flow's process) at establishment, once:
 * only that socket's getpeername is rewritten. */
struct ft_relay_inbound {
    struct ft_relay_endpoint client;
    struct ft_stamp owner;
    ft_u64 server_cookie; /* 0 until the server's side is established */
};

/* The sockmap fast path (stream.fast_path: sockmap): a relayed flow's two sockets, both
 * the agent's, sit in a sockhash keyed by socket cookie, and an sk_skb verdict moves what
 * arrives on one to the other's egress without a copy to user space. Per socket: */
#define FT_RELAY_SPLICE_MAX 16384

/* Written by the agent only. 24 bytes. The verdict redirects only while `hold` is 0 and
 * every byte it ever passed to the agent has been written on (passed == consumed): bytes
 * the agent owes are never overtaken. */
struct ft_relay_splice_ctl {
    ft_u64 peer_cookie; /* the other socket of the flow (sockhash key) */
    ft_u64 consumed;    /* passed bytes the agent has read and written on */
    ft_u32 hold;        /* 1: pass to the agent (flow control, callouts still active) */
    ft_u32 pad;
};

/* Written by the verdict only. 56 bytes. */
struct ft_relay_splice_stat {
    ft_u64 redirected;      /* bytes redirected to the peer socket's egress */
    ft_u64 passed;          /* bytes left in this socket for the agent to read */
    ft_u64 empty;           /* zero-length (FIN-only) skbs dropped */
    ft_u64 trimmed;         /* bytes of already-seen retransmitted heads cut */
    ft_u64 redirect_failed; /* peer not in the sockhash: passed instead */
    ft_u32 next_seq;        /* TCP sequence number after the last byte seen */
    ft_u32 seq_valid;
    ft_u64 trim_failed;     /* skbs whose seen head could not be cut (the agent resets) */
};

/* Indexes of the relay object's per-CPU counters. */
enum ft_relay_counter {
    FT_RCNT_REDIRECTED = 0,  /* connects sent to the agent's listener */
    FT_RCNT_NO_LISTENER = 1, /* selected connects passed direct: no listener in their netns */
    FT_RCNT_STORAGE_FAILED = 2, /* selected connects passed direct: no socket storage */
    FT_RCNT_INBOUND_REDIRECTED = 3, /* incoming connections given to the inbound listener */
    FT_RCNT_INBOUND_NO_LISTENER = 4, /* selected incoming connections passed: no listener */
    FT_RCNT_INBOUND_ASSIGN_FAILED = 5, /* selected incoming connections passed: assign failed */
    FT_RCNT_MAX = 8,
};

#define FT_ASSERT_SIZE(type, size) _Static_assert(sizeof(type) == (size), #type " size")
FT_ASSERT_SIZE(struct ft_stamp, 64);
FT_ASSERT_SIZE(struct ft_sock_state, 96);
FT_ASSERT_SIZE(struct ft_tuple, 40);
FT_ASSERT_SIZE(struct ft_flow, 144);
FT_ASSERT_SIZE(struct ft_udp_key, 56);
FT_ASSERT_SIZE(struct ft_udp_flow, 176);
FT_ASSERT_SIZE(struct ft_close_stats, 40);
FT_ASSERT_SIZE(struct ft_event, 208);
FT_ASSERT_SIZE(struct ft_tcp_entry, 192);
FT_ASSERT_SIZE(struct ft_build_info, 24);
FT_ASSERT_SIZE(struct ft_proc, 576);
FT_ASSERT_SIZE(struct ft_stream_rule, 64);
FT_ASSERT_SIZE(struct ft_relay_orig, 112);
FT_ASSERT_SIZE(struct ft_relay_pending_key, 48);
FT_ASSERT_SIZE(struct ft_relay_listener, 32);
FT_ASSERT_SIZE(struct ft_relay_mark, 8);
FT_ASSERT_SIZE(struct ft_relay_hint_key, 32);
FT_ASSERT_SIZE(struct ft_relay_hint, 16);
FT_ASSERT_SIZE(struct ft_relay_request, 16);
FT_ASSERT_SIZE(struct ft_relay_endpoint, 32);
FT_ASSERT_SIZE(struct ft_relay_inbound, 104);
FT_ASSERT_SIZE(struct ft_relay_splice_ctl, 24);
FT_ASSERT_SIZE(struct ft_relay_splice_stat, 56);

#endif
