// SPDX-License-Identifier: GPL-2.0
/* flowtag kernel programs: stamp every socket with its owner in process context and
 * report each flow's open and close.
 *
 * Hooks used (no kprobes, no fentry/fexit, no BPF LSM on the kernels we target):
 *   process table  tp_btf/sched_process_exec|fork|exit
 *   stamps         cgroup/sock_create, cgroup/connect4|6, cgroup/sendmsg4|6,
 *                  cgroup/recvmsg4|6, tp_btf/sock_send_length|sock_recv_length
 *   accept         cgroup/getpeername4|6 (accept/accept4 asking for the peer's address),
 *                  else the accepted socket's first send or receive
 *   TCP lifecycle  sockops (active/passive established, state -> TCP_CLOSE)
 *   UDP lifecycle  sock_send_length/sock_recv_length (open, counters),
 *                  cgroup/sock_release (close); idle expiry is done by the agent.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "flowtag_abi.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define TCP_CLOSE 7

/* Map sizes are defaults; the agent may resize before load. */
struct {
    __uint(type, BPF_MAP_TYPE_SK_STORAGE);
    __uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
    __type(key, int);
    __type(value, struct ft_sock_state);
} ft_sk_state SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 131072);
    __type(key, __u64); /* socket cookie */
    __type(value, struct ft_tcp_entry);
} ft_tcp_flows SEC(".maps");

/* Closes made by the agent, kept until journaled (written and read by the agent only). */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, FT_OUTBOX_MAX);
    __type(key, __u64);
    __type(value, struct ft_event);
} ft_outbox SEC(".maps");

/* An event or a flow entry being built where the stack has no room for it. */
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct ft_event);
} ft_event_scratch SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct ft_tcp_entry);
} ft_entry_scratch SEC(".maps");

/* Which build pinned these programs, for which cgroup (written by the agent). */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct ft_build_info);
} ft_build SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, 65536);
    __type(key, struct ft_udp_key);
    __type(value, struct ft_udp_flow);
} ft_udp_flows SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 32768);
    __type(key, __u32); /* tgid */
    __type(value, struct ft_proc);
} ft_procs SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 8 << 20);
} ft_events SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, FT_CNT_MAX);
    __type(key, __u32);
    __type(value, __u64);
} ft_counters SEC(".maps");

#define FT_SCRATCH_LEN (FT_PATH_MAX * 2)
struct ft_scratch {
    char buf[FT_SCRATCH_LEN];
};
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct ft_scratch);
} ft_scratch_map SEC(".maps");

/* ---------------------------------------------------------------- relay maps */

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, FT_STREAM_RULES_MAX);
    __type(key, __u32);
    __type(value, struct ft_stream_rule);
} ft_stream_rules SEC(".maps");

/* Entry 0: how many rules are in use, so flows pay nothing while there are none. */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32);
} ft_stream_rule_count SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_SK_STORAGE);
    __uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
    __type(key, int);
    __type(value, struct ft_relay_route);
} ft_relay_routes SEC(".maps");

/* The agent's writer sockets for the send direction: only sk_msg runs on them, and it
 * sends what the agent writes out of the app socket (tcp_bpf_push, not the app socket's
 * own sendmsg, which would loop back into the relay). */
struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 2 * FT_RELAY_SLOTS_MAX);
    __type(key, __u64);
    __type(value, __u64);
} ft_relay_writers SEC(".maps");

/* sk_skb programs may not use socket storage: arriving data finds its relay by the
 * socket's 4-tuple. A tuple already relayed (the same tuple in another netns) keeps the
 * second flow direct, so a tuple names one relayed socket. */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 3 * FT_RELAY_SLOTS_MAX);
    __type(key, struct ft_tuple);
    __type(value, struct ft_relay_route);
} ft_relay_tuples SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, FT_RELAY_SLOTS_MAX);
    __type(key, __u32);
    __type(value, struct ft_relay_slot);
} ft_relay_slots SEC(".maps");

/* Free slots, pushed by the agent once both relay sockets are in ft_relay_socks. */
struct {
    __uint(type, BPF_MAP_TYPE_QUEUE);
    __uint(max_entries, FT_RELAY_SLOTS_MAX);
    __type(value, __u32);
} ft_relay_pool SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 3 * FT_RELAY_SLOTS_MAX);
    __type(key, __u64);
    __type(value, __u64);
} ft_relay_socks SEC(".maps");

static __always_inline void count(__u32 idx)
{
    __u64 *v = bpf_map_lookup_elem(&ft_counters, &idx);
    if (v)
        *v += 1; /* per-CPU: no atomic needed */
}

/* ---------------------------------------------------------------- stamps */

static __always_inline void stamp_current(struct ft_stamp *s, __u8 hook)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u64 uid_gid = bpf_get_current_uid_gid();
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();

    s->tgid = pid_tgid >> 32;
    s->tid = (__u32)pid_tgid;
    s->uid = (__u32)uid_gid;
    s->gid = uid_gid >> 32;
    s->cgroup_id = bpf_get_current_cgroup_id();
    s->proc_start_ns = BPF_CORE_READ(task, group_leader, start_boottime);
    s->stamped_ns = bpf_ktime_get_boot_ns();
    bpf_get_current_comm(s->comm, sizeof(s->comm));
    s->attribution = FT_ATTR_KERNEL;
    s->hook = hook;
}

/* The stamp is rewritten only when another thread acts on the socket, so the common
 * path (the creator connects) costs one storage lookup and a compare. */
static __always_inline void refine(struct ft_sock_state *st, __u8 hook)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (st->owner.tid == (__u32)pid_tgid && st->owner.attribution == FT_ATTR_KERNEL)
        return;
    stamp_current(&st->owner, hook);
}

static __always_inline int is_inet_l4(__u32 family, __u32 protocol)
{
    return (family == AF_INET || family == AF_INET6) &&
           (protocol == IPPROTO_TCP || protocol == IPPROTO_UDP);
}

SEC("cgroup/sock_create")
int ft_sock_create(struct bpf_sock *sk)
{
    if (!is_inet_l4(sk->family, sk->protocol))
        return 1;
    struct ft_sock_state *st = bpf_sk_storage_get(&ft_sk_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (st) {
        stamp_current(&st->owner, FT_HOOK_SOCK_CREATE);
        count(FT_CNT_STAMPS);
    }
    return 1;
}

static __always_inline int on_connect(struct bpf_sock_addr *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct ft_sock_state *st = bpf_sk_storage_get(&ft_sk_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (st)
        refine(st, FT_HOOK_CONNECT);
    return 1;
}

SEC("cgroup/connect4")
int ft_connect4(struct bpf_sock_addr *ctx) { return on_connect(ctx); }

SEC("cgroup/connect6")
int ft_connect6(struct bpf_sock_addr *ctx) { return on_connect(ctx); }

/* Unconnected UDP: remember the peer so the send/recv tracepoint can name the flow. */
static __always_inline void remember_peer(struct bpf_sock_addr *ctx, struct ft_sock_state *st, const int v6)
{
    /* v6 is a constant per program: the v4 hooks may not read user_ip6 */
    if (!v6) {
        __builtin_memset(st->udp_peer, 0, sizeof(st->udp_peer));
        __u32 a = ctx->user_ip4;
        __builtin_memcpy(st->udp_peer, &a, 4);
    } else {
        __u32 a[4];
        a[0] = ctx->user_ip6[0];
        a[1] = ctx->user_ip6[1];
        a[2] = ctx->user_ip6[2];
        a[3] = ctx->user_ip6[3];
        __builtin_memcpy(st->udp_peer, a, 16);
    }
    st->udp_peer_port = bpf_ntohs((__u16)ctx->user_port);
    st->udp_peer_family = v6 ? AF_INET6 : AF_INET;
}

static __always_inline int on_udp_msg(struct bpf_sock_addr *ctx, __u8 hook, const int v6)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct ft_sock_state *st = bpf_sk_storage_get(&ft_sk_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!st)
        return 1;
    if (hook == FT_HOOK_SENDMSG)
        refine(st, hook);
    remember_peer(ctx, st, v6);
    return 1;
}

SEC("cgroup/sendmsg4")
int ft_sendmsg4(struct bpf_sock_addr *ctx) { return on_udp_msg(ctx, FT_HOOK_SENDMSG, 0); }

SEC("cgroup/sendmsg6")
int ft_sendmsg6(struct bpf_sock_addr *ctx) { return on_udp_msg(ctx, FT_HOOK_SENDMSG, 1); }

SEC("cgroup/recvmsg4")
int ft_recvmsg4(struct bpf_sock_addr *ctx) { return on_udp_msg(ctx, FT_HOOK_RECVMSG, 0); }

SEC("cgroup/recvmsg6")
int ft_recvmsg6(struct bpf_sock_addr *ctx) { return on_udp_msg(ctx, FT_HOOK_RECVMSG, 1); }

/* ---------------------------------------------------------------- events */

#define FT_WAKEUP_BYTES (256 * 1024)

static __always_inline void emit(__u32 kind, const struct ft_flow *flow, const struct ft_close_stats *stats)
{
    struct ft_event *ev = bpf_ringbuf_reserve(&ft_events, sizeof(*ev), 0);
    if (!ev) {
        count(FT_CNT_EVENTS_LOST);
        return;
    }
    ev->kind = kind;
    ev->close_reason = FT_CLOSE_KERNEL;
    ev->time_ns = bpf_ktime_get_boot_ns();
    __builtin_memcpy(&ev->flow, flow, sizeof(*flow));
    if (stats)
        __builtin_memcpy(&ev->stats, stats, sizeof(*stats));
    else
        __builtin_memset(&ev->stats, 0, sizeof(ev->stats));
    ev->reserved = 0;
    /* Waking the reader costs an irq_work (a self-IPI, very dear in a VM) per event: wake
     * only when a batch is waiting; the agent also polls on a short timer. */
    __u64 pending = bpf_ringbuf_query(&ft_events, BPF_RB_AVAIL_DATA);
    bpf_ringbuf_submit(ev, pending >= FT_WAKEUP_BYTES ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

/* ---------------------------------------------------------------- stream relay */

static __always_inline int prefix_matches(const __u8 *addr, const __u8 *want, __u32 bits)
{
    for (int i = 0; i < 16; i++) {
        if (bits == 0)
            return 1;
        __u8 mask = bits >= 8 ? 0xff : (__u8)(0xff << (8 - bits));
        if ((addr[i] ^ want[i]) & mask)
            return 0;
        bits = bits >= 8 ? bits - 8 : 0;
    }
    return 1;
}

static __always_inline int remote_matches(const struct ft_stream_rule *r, const struct ft_tuple *t)
{
    if (r->remote_family == t->family)
        return prefix_matches(t->remote, r->remote, r->remote_prefix);
    /* An IPv4 rule also selects an IPv6 socket talking to a v4-mapped address. */
    if (r->remote_family == AF_INET && t->family == AF_INET6) {
        const __u8 *a = t->remote;
        for (int i = 0; i < 10; i++)
            if (a[i])
                return 0;
        if (a[10] != 0xff || a[11] != 0xff)
            return 0;
        return prefix_matches(&a[12], r->remote, r->remote_prefix);
    }
    return 0;
}

static __always_inline int rule_matches(const struct ft_stream_rule *r, const struct ft_flow *f)
{
    __u32 m = r->match;
    if (!m)
        return 0;
    if ((m & FT_MATCH_UID) && f->owner.uid != r->uid)
        return 0;
    if ((m & FT_MATCH_CGROUP) && f->owner.cgroup_id != r->cgroup_id)
        return 0;
    if ((m & FT_MATCH_LOCAL_PORT) && f->tuple.local_port != r->local_port)
        return 0;
    if ((m & FT_MATCH_REMOTE_PORT) && f->tuple.remote_port != r->remote_port)
        return 0;
    if ((m & FT_MATCH_DIRECTION) && f->direction != r->direction)
        return 0;
    if ((m & FT_MATCH_REMOTE_ADDR) && !remote_matches(r, &f->tuple))
        return 0;
    if (m & FT_MATCH_EXE) {
        __u32 tgid = f->owner.tgid;
        struct ft_proc *p = bpf_map_lookup_elem(&ft_procs, &tgid);
        if (!p || p->exe_ino != r->exe_ino || p->exe_dev != r->exe_dev)
            return 0;
    }
    return 1;
}

static __always_inline int flow_selected(const struct ft_flow *f)
{
    __u32 zero = 0;
    __u32 *n = bpf_map_lookup_elem(&ft_stream_rule_count, &zero);
    if (!n || *n == 0)
        return 0;
    for (__u32 i = 0; i < FT_STREAM_RULES_MAX; i++) {
        /* The key is a copy: the counter stays in a register, where the verifier keeps
         * its bounds (through the stack it did not, and saw an infinite loop). */
        __u32 key = i;
        struct ft_stream_rule *r = bpf_map_lookup_elem(&ft_stream_rules, &key);
        if (r && rule_matches(r, f))
            return 1;
    }
    return 0;
}

/* Put a selected flow's socket into the relay before it can carry a byte: sockops runs at
 * establishment, before connect() returns or the connection can be accepted. */
static __always_inline void relay_take(struct bpf_sock_ops *skops, struct bpf_sock *sk, struct ft_flow *f)
{
    __u32 slot;
    if (bpf_map_pop_elem(&ft_relay_pool, &slot)) {
        count(FT_CNT_RELAY_POOL_EMPTY);
        return;
    }
    struct ft_relay_slot *s = bpf_map_lookup_elem(&ft_relay_slots, &slot);
    struct ft_relay_route *r = bpf_sk_storage_get(&ft_relay_routes, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!s || !r) {
        bpf_map_push_elem(&ft_relay_pool, &slot, 0);
        count(FT_CNT_RELAY_POOL_EMPTY);
        return;
    }
    r->slot = slot;
    r->role = FT_RELAY_APP;
    r->app_cookie = f->cookie;
    if (bpf_map_update_elem(&ft_relay_tuples, &f->tuple, r, BPF_NOEXIST)) {
        r->role = FT_RELAY_NONE;
        bpf_map_push_elem(&ft_relay_pool, &slot, 0);
        count(FT_CNT_RELAY_POOL_EMPTY);
        return;
    }
    s->app_cookie = f->cookie;
    s->mode = FT_RELAY_ACTIVE;
    __u64 key = f->cookie;
    if (bpf_sock_hash_update(skops, &ft_relay_socks, &key, BPF_NOEXIST)) {
        s->mode = FT_RELAY_FREE;
        r->role = FT_RELAY_NONE;
        bpf_map_delete_elem(&ft_relay_tuples, &f->tuple);
        bpf_map_push_elem(&ft_relay_pool, &slot, 0);
        count(FT_CNT_RELAY_POOL_EMPTY);
        return;
    }
    f->flags |= FT_FLOW_RELAYED;
    f->relay_slot = slot;
    count(FT_CNT_RELAY_ASSIGNED);
}

/* Where an app socket's bytes go: out of the slot's SEND (what the process writes,
 * sk_msg) or RECV (what arrived for it, sk_skb) socket, so TCP between the slot's two ends
 * carries them to the agent with flow control: a process that outruns the agent waits (or
 * gets EAGAIN) like on any full socket. The way back is the agent's own ends
 * (ft_relay_writers). App sockets fail open (a missing relay socket, e.g. after an agent
 * crash, leaves the flow direct). A slot socket only transmits what was redirected out of
 * it (pass) and never receives data (the agent's ends write through ft_relay_writers), so
 * anything arriving on one is dropped. */
static __always_inline int relay_target(const struct ft_relay_route *r, int sending, __u64 *key)
{
    if (!r || r->role == FT_RELAY_NONE)
        return SK_PASS;
    if (r->role != FT_RELAY_APP)
        return sending ? SK_PASS : SK_DROP;
    __u32 slot = r->slot;
    struct ft_relay_slot *s = bpf_map_lookup_elem(&ft_relay_slots, &slot);
    if (!s || s->mode != FT_RELAY_ACTIVE || s->app_cookie != r->app_cookie)
        return SK_PASS;
    *key = FT_RELAY_KEY(slot, sending ? FT_RELAY_SEND : FT_RELAY_RECV);
    return -1;
}

SEC("sk_msg")
int ft_relay_msg(struct sk_msg_md *msg)
{
    struct bpf_sock *sk = msg->sk;
    if (!sk)
        return SK_PASS;
    struct ft_relay_route *r = bpf_sk_storage_get(&ft_relay_routes, sk, 0, 0);
    __u64 key = 0;
    int verdict = relay_target(r, 1, &key);
    if (verdict >= 0)
        return verdict;
    bpf_msg_redirect_hash(msg, &ft_relay_socks, &key, 0);
    return SK_PASS; /* redirected, or direct when the relay socket is gone */
}

/* On the agent's send-direction writer sockets (ft_relay_writers). */
SEC("sk_msg")
int ft_relay_writer(struct sk_msg_md *msg)
{
    struct bpf_sock *sk = msg->sk;
    if (!sk)
        return SK_DROP;
    struct ft_relay_route *r = bpf_sk_storage_get(&ft_relay_routes, sk, 0, 0);
    if (!r || (r->role != FT_RELAY_WRITER && r->role != FT_RELAY_WRITER_IN))
        return SK_DROP;
    __u32 slot = r->slot;
    struct ft_relay_slot *s = bpf_map_lookup_elem(&ft_relay_slots, &slot);
    if (!s || s->mode != FT_RELAY_ACTIVE)
        return SK_DROP;
    __u64 key = s->app_cookie;
    __u64 flags = r->role == FT_RELAY_WRITER_IN ? BPF_F_INGRESS : 0;
    return bpf_msg_redirect_hash(msg, &ft_relay_socks, &key, flags) == SK_PASS ? SK_PASS : SK_DROP;
}

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

/* A retransmitted segment that overlaps what already arrived is queued whole (TCP skips
 * the old head when a process reads, by sequence number). The sockmap verdict path does
 * not: it hands on the whole skb and advances the socket's copied_seq by its full length,
 * so the old bytes would reach the relay twice, and copied_seq would run ahead of rcv_nxt
 * by them, after which the kernel holds the next bytes back (tcp_data_ready waits for
 * more than that gap) and the process's recv returns EAGAIN while its queue is full:
 * a stall. Both seen in loaded runs. Cutting the old head here, before the kernel
 * counts the skb, fixes both. bpf_skb_adjust_room removes at most 4095 bytes a call. */
static __always_inline void trim_already_received(struct __sk_buff *skb)
{
    struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
    struct sock *sk = kskb->sk;
    if (!sk)
        return;
    struct tcp_sock *tp = bpf_rdonly_cast(sk, bpf_core_type_id_kernel(struct tcp_sock));
    struct tcp_skb_cb *cb = (struct tcp_skb_cb *)kskb->cb;
    __s32 old = (__s32)(tp->copied_seq - cb->seq);
    if (old <= 0 || old >= (__s32)skb->len)
        return;
    count(FT_CNT_RELAY_RETRANSMIT_TRIMS);
    for (int i = 0; i < 64 && old > 0; i++) {
        __s32 n = old > 4095 ? 4095 : old;
        if (bpf_skb_adjust_room(skb, -n, 0, 0))
            return;
        old -= n;
    }
}

SEC("sk_skb")
int ft_relay_skb(struct __sk_buff *skb)
{
    struct ft_tuple t;
    __builtin_memset(&t, 0, sizeof(t));
    t.family = skb->family;
    t.protocol = IPPROTO_TCP;
    t.local_port = skb->local_port;
    t.remote_port = bpf_ntohl(skb->remote_port);
    if (t.family == AF_INET) {
        __u32 l = skb->local_ip4, r = skb->remote_ip4;
        __builtin_memcpy(t.local, &l, 4);
        __builtin_memcpy(t.remote, &r, 4);
    } else {
        __u32 l[4], r[4];
        l[0] = skb->local_ip6[0]; l[1] = skb->local_ip6[1];
        l[2] = skb->local_ip6[2]; l[3] = skb->local_ip6[3];
        r[0] = skb->remote_ip6[0]; r[1] = skb->remote_ip6[1];
        r[2] = skb->remote_ip6[2]; r[3] = skb->remote_ip6[3];
        __builtin_memcpy(t.local, l, 16);
        __builtin_memcpy(t.remote, r, 16);
    }
    /* App sockets (sockops) and slot sockets (the agent) are indexed by tuple. */
    struct ft_relay_route *route = bpf_map_lookup_elem(&ft_relay_tuples, &t);
    if (!route)
        return SK_DROP;
    __u64 key = 0;
    int verdict = relay_target(route, 0, &key);
    if (verdict >= 0)
        return verdict;
    /* Straight into the receive queue of the agent's end of the slot's RECV connection
     * (ingress), not out of RECV's own egress: that egress send by the psock worker
     * resent already-sent bytes after a partial send on this kernel (duplicated data)
     * and stopped the hop for good on a hard error. An ingress redirect takes a whole skb
     * or retries it later; the agent's socket's receive buffer bounds it. A FIN's empty
     * skb carries nothing (the FIN itself is TCP state, reported by sock_ops) and would
     * read as an error there: dropped. */
    if (skb->len == 0)
        return SK_DROP;
    trim_already_received(skb);
    __u64 writer = (__u64)route->slot | (1ULL << 32);
    bpf_sk_redirect_hash(skb, &ft_relay_writers, &writer, BPF_F_INGRESS);
    return SK_PASS; /* redirected, or direct when the relay socket is gone */
}

/* ---------------------------------------------------------------- TCP */

static __always_inline void tuple_from_sockops(struct bpf_sock_ops *skops, struct ft_tuple *t)
{
    __builtin_memset(t, 0, sizeof(*t));
    t->family = skops->family;
    t->protocol = IPPROTO_TCP;
    t->local_port = skops->local_port;
    t->remote_port = bpf_ntohl(skops->remote_port);
    if (skops->family == AF_INET) {
        __u32 l = skops->local_ip4, r = skops->remote_ip4;
        __builtin_memcpy(t->local, &l, 4);
        __builtin_memcpy(t->remote, &r, 4);
    } else {
        __u32 l[4], r[4];
        l[0] = skops->local_ip6[0]; l[1] = skops->local_ip6[1];
        l[2] = skops->local_ip6[2]; l[3] = skops->local_ip6[3];
        r[0] = skops->remote_ip6[0]; r[1] = skops->remote_ip6[1];
        r[2] = skops->remote_ip6[2]; r[3] = skops->remote_ip6[3];
        __builtin_memcpy(t->local, l, 16);
        __builtin_memcpy(t->remote, r, 16);
    }
}

static __always_inline void flow_from_sockops(struct bpf_sock_ops *skops, struct ft_flow *f, __u8 dir)
{
    __builtin_memset(f, 0, sizeof(*f));
    tuple_from_sockops(skops, &f->tuple);
    f->cookie = bpf_get_socket_cookie(skops);
    f->netns_cookie = bpf_get_netns_cookie(skops);
    f->opened_ns = bpf_ktime_get_boot_ns();
    f->last_ns = f->opened_ns;
    f->direction = dir;
    struct bpf_sock *sk = skops->sk;
    if (sk) {
        struct ft_sock_state *st = bpf_sk_storage_get(&ft_sk_state, sk, 0, 0);
        if (st)
            __builtin_memcpy(&f->owner, &st->owner, sizeof(f->owner));
    }
}

/* A socket connected again after connect(AF_UNSPEC) keeps its cookie: a close of its
 * previous connection that the agent has not journaled yet moves to the outbox (key
 * FT_OUTBOX_MOVED | cookie) instead of being overwritten. */
static __always_inline void keep_unjournaled_close(__u64 cookie)
{
    struct ft_tcp_entry *old = bpf_map_lookup_elem(&ft_tcp_flows, &cookie);
    if (!old || !(old->flow.flags & FT_FLOW_CLOSED))
        return;
    __u32 zero = 0;
    struct ft_event *ev = bpf_map_lookup_elem(&ft_event_scratch, &zero);
    if (!ev)
        return;
    ev->kind = FT_EV_CLOSE;
    ev->close_reason = FT_CLOSE_KERNEL;
    ev->time_ns = old->closed_ns;
    __builtin_memcpy(&ev->flow, &old->flow, sizeof(ev->flow));
    __builtin_memcpy(&ev->stats, &old->stats, sizeof(ev->stats));
    ev->reserved = 0;
    __u64 key = FT_OUTBOX_MOVED | cookie;
    if (bpf_map_update_elem(&ft_outbox, &key, ev, BPF_ANY))
        count(FT_CNT_FLOWS_DROPPED);
}

static __always_inline void tcp_established(struct bpf_sock_ops *skops, __u8 dir)
{
    __u32 zero = 0;
    struct ft_tcp_entry *entry = bpf_map_lookup_elem(&ft_entry_scratch, &zero);
    if (!entry)
        return;
    struct ft_flow *fp = &entry->flow;
    struct bpf_sock *sk = skops->sk;
    if (sk) {
        struct ft_relay_route *own = bpf_sk_storage_get(&ft_relay_routes, sk, 0, 0);
        if (own && own->role != FT_RELAY_NONE)
            return; /* the agent's own relay plumbing is not a flow */
    }
    __builtin_memset(&entry->stats, 0, sizeof(entry->stats));
    entry->closed_ns = 0;
    flow_from_sockops(skops, fp, dir);
    if (sk && flow_selected(fp))
        relay_take(skops, sk, fp);
    if (dir == FT_DIR_INBOUND) {
        /* Until accept the owner is the listener's (cloned): report at accept. The
         * socket's own stamp is marked inherited too, so the process hooks know to
         * claim it (see claim_accepted). */
        if (fp->owner.attribution == FT_ATTR_KERNEL)
            fp->owner.attribution = FT_ATTR_INHERITED;
        fp->flags |= FT_FLOW_PENDING_ACCEPT;
        struct ft_sock_state *st = sk ? bpf_sk_storage_get(&ft_sk_state, sk, 0, 0) : 0;
        if (st)
            st->owner.attribution = FT_ATTR_INHERITED;
    }
    keep_unjournaled_close(fp->cookie);
    if (bpf_map_update_elem(&ft_tcp_flows, &fp->cookie, entry, BPF_ANY)) {
        /* Not tracked (the map is full: the agent is far behind): no open without a
         * close to follow it. */
        count(FT_CNT_FLOWS_DROPPED);
        return;
    }
    if (!(fp->flags & FT_FLOW_PENDING_ACCEPT))
        emit(FT_EV_OPEN, fp, 0);
    bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void tcp_state_change(struct bpf_sock_ops *skops)
{
    __u32 new_state = skops->args[1];
    if (new_state != TCP_CLOSE) {
        /* Other states matter only to relayed flows: a FIN sent or received. */
        if (new_state != TCP_FIN_WAIT1 && new_state != TCP_CLOSE_WAIT)
            return;
        __u32 zero = 0;
        __u32 *rules = bpf_map_lookup_elem(&ft_stream_rule_count, &zero);
        if (!rules || *rules == 0)
            return;
        __u64 c = bpf_get_socket_cookie(skops);
        struct ft_flow *rf = bpf_map_lookup_elem(&ft_tcp_flows, &c);
        if (!rf || !(rf->flags & FT_FLOW_RELAYED))
            return;
        struct ft_close_stats st = {};
        st.last_state = skops->args[0];
        st.new_state = new_state;
        emit(FT_EV_FLOW_STATE, rf, &st);
        return;
    }
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct ft_tcp_entry *e = bpf_map_lookup_elem(&ft_tcp_flows, &cookie);

    if (!e || (e->flow.flags & FT_FLOW_CLOSED))
        return;

    /* The entry is not deleted: it is marked closed and keeps its close, and the agent
     * deletes it once the close is journaled (a crash in between loses nothing). */
    if (e->flow.flags & FT_FLOW_RELAYED)
        bpf_map_delete_elem(&ft_relay_tuples, &e->flow.tuple);
    if (e->flow.flags & FT_FLOW_PENDING_ACCEPT)
        emit(FT_EV_OPEN, &e->flow, 0); /* never accepted: report with the inherited owner */

    struct ft_close_stats s = {};
    s.bytes_sent = skops->bytes_acked;
    s.bytes_received = skops->bytes_received;
    /* Payload bytes: acked/received sequence space also counts SYN and FIN. The sender's
     * own count excludes header-only segments; a received FIN set SOCK_DONE. */
    struct bpf_sock *bsk = skops->sk;
    if (bsk) {
        struct tcp_sock *tp = bpf_skc_to_tcp_sock(bsk);
        if (tp) {
            s.bytes_sent = tp->bytes_sent - tp->bytes_retrans;
            unsigned long sk_flags = tp->inet_conn.icsk_inet.sk.__sk_common.skc_flags;
            if ((sk_flags & (1UL << SOCK_DONE)) && s.bytes_received)
                s.bytes_received -= 1;
        }
    }
    s.segs_out = skops->segs_out;
    s.segs_in = skops->segs_in;
    s.retransmits = skops->total_retrans;
    s.srtt_us = skops->srtt_us >> 3;
    s.last_state = skops->args[0];
    __builtin_memcpy(&e->stats, &s, sizeof(s));
    e->closed_ns = bpf_ktime_get_boot_ns();
    e->flow.flags = (e->flow.flags & ~FT_FLOW_PENDING_ACCEPT) | FT_FLOW_CLOSED;
    emit(FT_EV_CLOSE, &e->flow, &s);
}

SEC("sockops")
int ft_sockops(struct bpf_sock_ops *skops)
{
    switch (skops->op) {
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        tcp_established(skops, FT_DIR_OUTBOUND);
        break;
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        tcp_established(skops, FT_DIR_INBOUND);
        break;
    case BPF_SOCK_OPS_STATE_CB:
        tcp_state_change(skops);
        break;
    }
    return 1;
}

/* An accepted socket's owner is the first process to act on it in process context:
 * accept/accept4 itself when it asks for the peer's address (it runs the getpeername
 * hook on the new socket: nginx, Go, Python, most servers), else whoever first sends or
 * receives on it. Called only while the socket's stamp is still the listener's. */
static __always_inline void claim_accepted(struct ft_sock_state *st, __u64 cookie, __u8 hook)
{
    stamp_current(&st->owner, hook);
    struct ft_flow *f = bpf_map_lookup_elem(&ft_tcp_flows, &cookie);
    if (!f || !(f->flags & FT_FLOW_PENDING_ACCEPT))
        return;
    __builtin_memcpy(&f->owner, &st->owner, sizeof(f->owner));
    f->flags &= ~FT_FLOW_PENDING_ACCEPT;
    emit(FT_EV_OPEN, f, 0);
}

static __always_inline int on_getpeername(struct bpf_sock_addr *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->protocol != IPPROTO_TCP)
        return 1;
    struct ft_sock_state *st = bpf_sk_storage_get(&ft_sk_state, sk, 0, 0);
    if (st && st->owner.attribution == FT_ATTR_INHERITED)
        claim_accepted(st, bpf_get_socket_cookie(ctx), FT_HOOK_ACCEPT);
    return 1;
}

SEC("cgroup/getpeername4")
int ft_getpeername4(struct bpf_sock_addr *ctx) { return on_getpeername(ctx); }

SEC("cgroup/getpeername6")
int ft_getpeername6(struct bpf_sock_addr *ctx) { return on_getpeername(ctx); }

/* ---------------------------------------------------------------- send/recv */

static __always_inline __u64 sk_netns_cookie(struct sock *sk)
{
    return BPF_CORE_READ(sk, __sk_common.skc_net.net, net_cookie);
}

static __always_inline void udp_tuple(struct sock *sk, struct ft_sock_state *st, struct ft_tuple *t)
{
    __builtin_memset(t, 0, sizeof(*t));
    __u16 family = sk->__sk_common.skc_family;
    t->family = family;
    t->protocol = IPPROTO_UDP;
    t->local_port = sk->__sk_common.skc_num;
    int connected = sk->__sk_common.skc_state == TCP_ESTABLISHED;
    if (family == AF_INET) {
        __u32 l = sk->__sk_common.skc_rcv_saddr;
        __builtin_memcpy(t->local, &l, 4);
        if (connected) {
            __u32 r = sk->__sk_common.skc_daddr;
            __builtin_memcpy(t->remote, &r, 4);
        }
    } else {
        BPF_CORE_READ_INTO(t->local, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
        if (connected)
            BPF_CORE_READ_INTO(t->remote, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
    }
    if (connected) {
        t->remote_port = bpf_ntohs(sk->__sk_common.skc_dport);
    } else {
        __builtin_memcpy(t->remote, st->udp_peer, 16);
        t->remote_port = st->udp_peer_port;
    }
}

static __always_inline void udp_account(struct sock *sk, struct ft_sock_state *st, int bytes, __u8 dir)
{
    struct ft_udp_key key = {};
    key.netns_cookie = sk_netns_cookie(sk);
    udp_tuple(sk, st, &key.tuple);
    if (!key.tuple.remote_port)
        return; /* peer unknown (recv without an address on an unconnected socket) */

    struct ft_udp_flow *uf = bpf_map_lookup_elem(&ft_udp_flows, &key);
    if (!uf) {
        struct ft_udp_flow nf = {};
        __builtin_memcpy(&nf.flow.tuple, &key.tuple, sizeof(key.tuple));
        __builtin_memcpy(&nf.flow.owner, &st->owner, sizeof(st->owner));
        nf.flow.cookie = bpf_get_socket_cookie(sk);
        nf.flow.netns_cookie = key.netns_cookie;
        nf.flow.opened_ns = bpf_ktime_get_boot_ns();
        nf.flow.last_ns = nf.flow.opened_ns;
        nf.flow.direction = dir;
        if (bpf_map_update_elem(&ft_udp_flows, &key, &nf, BPF_NOEXIST) == 0)
            emit(FT_EV_OPEN, &nf.flow, 0);
        uf = bpf_map_lookup_elem(&ft_udp_flows, &key);
        if (!uf) {
            count(FT_CNT_FLOWS_DROPPED);
            return;
        }
    }
    uf->flow.last_ns = bpf_ktime_get_boot_ns();
    if (dir == FT_DIR_OUTBOUND) {
        __sync_fetch_and_add(&uf->bytes_sent, bytes);
        __sync_fetch_and_add(&uf->packets_sent, 1);
    } else {
        __sync_fetch_and_add(&uf->bytes_received, bytes);
        __sync_fetch_and_add(&uf->packets_received, 1);
    }
}

/* A TCP socket's owner follows the process that acts on it: the worker that accepted
 * (inherited stamps), or a process that received the fd and sends on it. */
static __always_inline void tcp_refine(struct sock *sk, struct ft_sock_state *st, __u8 hook)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (st->owner.tgid == (pid_tgid >> 32) && st->owner.attribution == FT_ATTR_KERNEL)
        return;
    stamp_current(&st->owner, hook);
    __u64 cookie = bpf_get_socket_cookie(sk);
    struct ft_flow *f = bpf_map_lookup_elem(&ft_tcp_flows, &cookie);
    if (f && !(f->flags & (FT_FLOW_PENDING_ACCEPT | FT_FLOW_CLOSED)))
        __builtin_memcpy(&f->owner, &st->owner, sizeof(f->owner));
}

static __always_inline int on_io(struct sock *sk, int ret, __u8 dir)
{
    if (ret <= 0)
        return 0;
    __u16 family = sk->__sk_common.skc_family;
    if (family != AF_INET && family != AF_INET6)
        return 0;
    struct ft_sock_state *st = bpf_sk_storage_get(&ft_sk_state, sk, 0, 0);
    if (!st)
        return 0; /* not a socket of the watched cgroup */
    __u16 proto = sk->sk_protocol;
    if (proto == IPPROTO_TCP) {
        if (st->owner.attribution == FT_ATTR_INHERITED)
            claim_accepted(st, bpf_get_socket_cookie(sk), dir == FT_DIR_OUTBOUND ? FT_HOOK_SEND : FT_HOOK_IO);
        else if (dir == FT_DIR_OUTBOUND)
            tcp_refine(sk, st, FT_HOOK_SEND);
    } else if (proto == IPPROTO_UDP) {
        if (dir == FT_DIR_OUTBOUND)
            refine(st, FT_HOOK_SEND);
        udp_account(sk, st, ret, dir);
    }
    return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(ft_send_len, struct sock *sk, int ret, int flags)
{
    return on_io(sk, ret, FT_DIR_OUTBOUND);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(ft_recv_len, struct sock *sk, int ret, int flags)
{
    return on_io(sk, ret, FT_DIR_INBOUND);
}

SEC("cgroup/sock_release")
int ft_sock_release(struct bpf_sock *sk)
{
    if (sk->protocol != IPPROTO_UDP || (sk->family != AF_INET && sk->family != AF_INET6))
        return 1;
    struct ft_flow f = {};
    f.cookie = bpf_get_socket_cookie(sk);
    f.netns_cookie = bpf_get_netns_cookie(sk);
    f.tuple.protocol = IPPROTO_UDP;
    f.tuple.family = sk->family;
    emit(FT_EV_SOCK_RELEASE, &f, 0);
    return 1;
}

/* ---------------------------------------------------------------- processes */

/* Resolve a file's path the way readlink(/proc/PID/exe) shows it: walk dentries up to
 * the mount root, cross to the parent mount, stop at the namespace root. The walk runs
 * under bpf_loop so the verifier checks one step, not every unrolled path. */
#define FT_MAX_COMPONENTS 64
struct path_walk {
    struct dentry *d;
    struct mount *mnt;
    struct ft_scratch *sc;
    __u32 off; /* start of the text written so far; writing goes backwards */
    __u32 truncated;
};

/* Mask an index so the verifier sees the bound (the compiler would drop a plain mask). */
static __always_inline __u32 bounded(__u32 idx)
{
    asm volatile("%[i] &= %[m]" : [i] "+r"(idx) : [m] "i"(FT_PATH_MAX - 1));
    return idx;
}

static long path_step(__u32 i, void *arg)
{
    struct path_walk *w = arg;
    struct dentry *d = w->d;
    struct mount *mnt = w->mnt;
    struct dentry *mnt_root = BPF_CORE_READ(mnt, mnt.mnt_root);
    struct dentry *parent = BPF_CORE_READ(d, d_parent);
    if (d == mnt_root || d == parent) {
        if (d != mnt_root)
            return 1;
        struct mount *up = BPF_CORE_READ(mnt, mnt_parent);
        if (up == mnt)
            return 1; /* namespace root */
        w->d = BPF_CORE_READ(mnt, mnt_mountpoint);
        w->mnt = up;
        return 0;
    }
    __u32 len = BPF_CORE_READ(d, d_name.len);
    const unsigned char *name = BPF_CORE_READ(d, d_name.name);
    __u32 off = w->off;
    if (len == 0 || len > 255)
        return 1;
    if (len + 1 > off || off > FT_PATH_MAX - 1) {
        w->truncated = 1;
        return 1;
    }
    off -= len;
    bpf_probe_read_kernel(&w->sc->buf[bounded(off)], len & 255, name);
    off -= 1;
    w->sc->buf[bounded(off)] = '/';
    w->off = off;
    w->d = parent;
    return 0;
}

static __always_inline void resolve_path(struct file *file, struct ft_proc *p)
{
    __u32 zero = 0;
    struct ft_scratch *sc = bpf_map_lookup_elem(&ft_scratch_map, &zero);
    if (!sc)
        return;
    struct path_walk w = {};
    struct vfsmount *vmnt = BPF_CORE_READ(file, f_path.mnt);
    w.d = BPF_CORE_READ(file, f_path.dentry);
    w.mnt = container_of(vmnt, struct mount, mnt);
    w.sc = sc;
    w.off = FT_PATH_MAX - 1; /* buf[FT_PATH_MAX-1] is the terminating NUL */
    sc->buf[FT_PATH_MAX - 1] = 0;
    bpf_loop(FT_MAX_COMPONENTS, path_step, &w, 0);
    if (w.truncated)
        p->flags |= FT_PROC_PATH_TRUNCATED;
    __u32 off = w.off;
    if (off >= FT_PATH_MAX - 1) {
        p->exe[0] = '/';
        p->exe[1] = 0;
        return;
    }
    __u32 n = FT_PATH_MAX - off; /* includes the NUL */
    bpf_probe_read_kernel(p->exe, bounded(n), &sc->buf[bounded(off)]);
}

static __always_inline struct ft_proc *proc_slot(__u32 tgid)
{
    struct ft_proc *p = bpf_map_lookup_elem(&ft_procs, &tgid);
    if (p)
        return p;
    __u32 zero = 0;
    struct ft_scratch *sc = bpf_map_lookup_elem(&ft_scratch_map, &zero);
    if (!sc)
        return 0;
    /* A zeroed value from scratch space: ft_proc is too large for the stack. */
    __builtin_memset(sc->buf, 0, sizeof(struct ft_proc));
    bpf_map_update_elem(&ft_procs, &tgid, sc->buf, BPF_ANY);
    return bpf_map_lookup_elem(&ft_procs, &tgid);
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(ft_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
    __u32 tgid = task->tgid;
    struct ft_proc *p = proc_slot(tgid);
    if (!p)
        return 0;
    __u64 uid_gid = bpf_get_current_uid_gid();
    p->tgid = tgid;
    p->ppid = BPF_CORE_READ(task, real_parent, tgid);
    p->uid = (__u32)uid_gid;
    p->gid = uid_gid >> 32;
    p->start_ns = BPF_CORE_READ(task, group_leader, start_boottime);
    p->exit_ns = 0;
    p->flags = 0;
    bpf_get_current_comm(p->comm, sizeof(p->comm));
    struct file *file = BPF_CORE_READ(bprm, file);
    p->exe_ino = BPF_CORE_READ(file, f_inode, i_ino);
    p->exe_dev = BPF_CORE_READ(file, f_inode, i_sb, s_dev);
    resolve_path(file, p);
    count(FT_CNT_EXECS);
    return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(ft_fork, struct task_struct *parent, struct task_struct *child)
{
    __u32 child_tgid = child->tgid;
    if (child->pid != child_tgid)
        return 0; /* a new thread, not a new process */
    __u32 parent_tgid = parent->tgid;
    struct ft_proc *pp = bpf_map_lookup_elem(&ft_procs, &parent_tgid);
    if (!pp)
        return 0; /* unknown parent: the agent resolves the child from /proc */
    if (bpf_map_update_elem(&ft_procs, &child_tgid, pp, BPF_ANY))
        return 0;
    struct ft_proc *c = bpf_map_lookup_elem(&ft_procs, &child_tgid);
    if (!c)
        return 0;
    c->tgid = child_tgid;
    c->ppid = parent_tgid;
    c->start_ns = child->start_boottime;
    c->exit_ns = 0;
    c->flags &= ~FT_PROC_EXITED;
    return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(ft_exit, struct task_struct *task)
{
    if (task->pid != task->tgid)
        return 0;
    __u32 tgid = task->tgid;
    struct ft_proc *p = bpf_map_lookup_elem(&ft_procs, &tgid);
    if (p) {
        /* Kept (LRU) so flows that outlive the process keep their owner. */
        p->flags |= FT_PROC_EXITED;
        p->exit_ns = bpf_ktime_get_boot_ns();
    }
    return 0;
}
