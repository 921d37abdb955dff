// SPDX-License-Identifier: GPL-2.0
/* flowtag's stream relay: WFP's connect-redirect (docs/stream-relay.md).
 *
 * cgroup/connect4|6 decide, in the connecting process's context, whether a TCP connect
 * is selected by a stream rule; a selected socket gets its original destination and
 * owner in socket storage (ft_relay_origs) and its connect goes to the agent's listener
 * in the socket's own netns, at the source address the destination would have given it.
 * The flowtag object's sockops hands the connection over to the agent at establishment.
 *
 * This object is loaded by every agent start and attached with links the agent holds
 * (never pinned): when the agent dies, new connects go direct at once.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "flowtag_abi.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define SOCK_STREAM 1

#include "lib/shared_maps.bpf.h"
#include "lib/stamp.bpf.h"

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, FT_STREAM_RULES_MAX);
    __type(key, __u32);
    __type(value, struct ft_stream_rule);
} ft_stream_rules SEC(".maps");

/* Entry 0: how many rules are in use, so connects pay one lookup while there are none. */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32);
} ft_stream_rule_count SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, FT_RELAY_LISTENERS_MAX);
    __type(key, __u64); /* netns cookie */
    __type(value, struct ft_relay_listener);
} ft_relay_listeners SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, FT_RELAY_HINTS_MAX);
    __type(key, struct ft_relay_hint_key);
    __type(value, struct ft_relay_hint);
} ft_relay_hints SEC(".maps");

/* Netns without a listener whose connects were selected: the agent makes one. */
struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 64 * 1024);
} ft_relay_requests SEC(".maps");

/* When each netns last asked, so a burst of connects asks once a second. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 4096);
    __type(key, __u64);
    __type(value, __u64);
} ft_relay_asked SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, FT_RCNT_MAX);
    __type(key, __u32);
    __type(value, __u64);
} ft_relay_counters SEC(".maps");

static __always_inline void rcount(__u32 idx)
{
    __u64 *v = bpf_map_lookup_elem(&ft_relay_counters, &idx);
    if (v)
        *v += 1;
}

/* The agent's inbound listeners in its own netns (0: IPv4 on 127.0.0.1, 1: IPv6 on ::1;
 * a socket bound to one IPv6 address is IPv6-only): sk_lookup gives them the incoming
 * connections an inbound rule selects. */
/* Entry 0: the cookie of the netns the sk_lookup program is attached to (that program
 * type cannot ask for it). */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} ft_relay_home SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_SOCKMAP);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, __u64);
} ft_relay_inbound_listener SEC(".maps");

/* What a rule can test: at connect time (outbound), or on an incoming SYN (inbound:
 * remote is the client, local_port the server's port; no process is known yet). */
struct connect_view {
    __u8 remote[16]; /* IPv4 (also v4-mapped) in the first 4 bytes */
    __u16 remote_port;
    __u16 local_port;
    __u8 family;     /* of remote: AF_INET or AF_INET6 */
    __u8 direction;  /* ft_direction */
    __u32 uid;
    __u32 tgid;
    __u64 cgroup_id;
};

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

static __always_inline int rule_matches(const struct ft_stream_rule *r, const struct connect_view *v)
{
    __u32 m = r->match;
    if (!m)
        return 0;
    /* A rule without a direction is outbound; inbound rules name no process. */
    __u8 dir = (m & FT_MATCH_DIRECTION) ? r->direction : FT_DIR_OUTBOUND;
    if (dir != v->direction)
        return 0;
    if (v->direction == FT_DIR_INBOUND && (m & (FT_MATCH_UID | FT_MATCH_CGROUP | FT_MATCH_EXE)))
        return 0;
    if ((m & FT_MATCH_UID) && v->uid != r->uid)
        return 0;
    if ((m & FT_MATCH_CGROUP) && v->cgroup_id != r->cgroup_id)
        return 0;
    if ((m & FT_MATCH_LOCAL_PORT) && v->local_port != r->local_port)
        return 0;
    if ((m & FT_MATCH_REMOTE_PORT) && v->remote_port != r->remote_port)
        return 0;
    if ((m & FT_MATCH_REMOTE_ADDR) && (r->remote_family != v->family || !prefix_matches(v->remote, r->remote, r->remote_prefix)))
        return 0;
    if (m & FT_MATCH_EXE) {
        __u32 tgid = v->tgid;
        struct ft_proc *p = bpf_map_lookup_elem(&ft_procs, &tgid);
        if (!p || p->exe_ino != r->exe_ino || p->exe_dev != r->exe_dev)
            return 0;
    }
    return 1;
}

static __always_inline int selected(const struct connect_view *v)
{
    for (__u32 i = 0; i < FT_STREAM_RULES_MAX; i++) {
        /* The key is a copy: the counter stays in a register, where the verifier keeps
         * its bounds. */
        __u32 key = i;
        struct ft_stream_rule *r = bpf_map_lookup_elem(&ft_stream_rules, &key);
        if (r && rule_matches(r, v))
            return 1;
    }
    return 0;
}

static __always_inline void ask_for_listener(__u64 netns)
{
    __u64 now = bpf_ktime_get_boot_ns();
    __u64 *last = bpf_map_lookup_elem(&ft_relay_asked, &netns);
    if (last && now - *last < 1000000000ULL)
        return;
    bpf_map_update_elem(&ft_relay_asked, &netns, &now, BPF_ANY);
    struct ft_relay_request *r = bpf_ringbuf_reserve(&ft_relay_requests, sizeof(*r), 0);
    if (!r)
        return;
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    r->netns_cookie = netns;
    r->tgid = bpf_get_current_pid_tgid() >> 32;
    r->ns_inum = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
    bpf_ringbuf_submit(r, 0);
}

/* The source this netns would give a connect to `addr` (ft_relay_hints), else 0. */
static __always_inline struct ft_relay_hint *natural_source(__u64 netns, __u8 family, const __u8 *addr)
{
    struct ft_relay_hint_key k = {};
    k.prefixlen = 32 + 64 + (family == AF_INET ? 32 : 128);
    k.family = family;
    k.netns_cookie = netns;
    __builtin_memcpy(k.addr, addr, 16);
    return bpf_map_lookup_elem(&ft_relay_hints, &k);
}

/* Common part: 1 when the connect is taken (origs written), with the listener found. */
static __always_inline int take(struct bpf_sock_addr *ctx, struct connect_view *v, __u8 mapped,
                                struct ft_relay_listener **out)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk || ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
        return 0;
    __u32 zero = 0;
    __u32 *rules = bpf_map_lookup_elem(&ft_stream_rule_count, &zero);
    if (!rules || *rules == 0)
        return 0;
    if (bpf_sk_storage_get(&ft_relay_marks, sk, 0, 0))
        return 0; /* the agent's own connect to the original destination */
    __u64 uid_gid = bpf_get_current_uid_gid();
    v->uid = (__u32)uid_gid;
    v->tgid = bpf_get_current_pid_tgid() >> 32;
    v->cgroup_id = bpf_get_current_cgroup_id();
    v->local_port = sk->src_port;
    if (!selected(v))
        return 0;
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct ft_relay_listener *l = bpf_map_lookup_elem(&ft_relay_listeners, &netns);
    if (!l || (v->family == AF_INET ? l->port4 : l->port6) == 0) {
        rcount(FT_RCNT_NO_LISTENER);
        ask_for_listener(netns);
        return 0;
    }
    struct ft_relay_orig *o = bpf_sk_storage_get(&ft_relay_origs, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!o) {
        rcount(FT_RCNT_STORAGE_FAILED);
        return 0;
    }
    __builtin_memcpy(o->dst, v->remote, 16);
    o->dst_port = v->remote_port;
    o->family = v->family;
    o->mapped = mapped;
    o->pad = 0;
    stamp_current(&o->owner, FT_HOOK_CONNECT);
    o->cookie = bpf_get_socket_cookie(ctx);
    o->netns_cookie = netns;
    o->connect_ns = bpf_ktime_get_boot_ns();
    rcount(FT_RCNT_REDIRECTED);
    *out = l;
    return 1;
}

SEC("cgroup/connect4")
int ft_relay_connect4(struct bpf_sock_addr *ctx)
{
    struct connect_view v = {};
    v.direction = FT_DIR_OUTBOUND;
    __u32 dst = ctx->user_ip4;
    __builtin_memcpy(v.remote, &dst, 4);
    v.remote_port = bpf_ntohs((__u16)ctx->user_port);
    v.family = AF_INET;
    struct ft_relay_listener *l = 0;
    if (!take(ctx, &v, 0, &l) || !l)
        return 1;
    struct ft_relay_hint *h = natural_source(bpf_get_netns_cookie(ctx), AF_INET, v.remote);
    __u32 to = l->ip4;
    if (h)
        __builtin_memcpy(&to, h->source, 4);
    ctx->user_ip4 = to;
    ctx->user_port = bpf_htons(l->port4);
    return 1;
}

SEC("cgroup/connect6")
int ft_relay_connect6(struct bpf_sock_addr *ctx)
{
    struct connect_view v = {};
    v.direction = FT_DIR_OUTBOUND;
    __u32 a[4];
    a[0] = ctx->user_ip6[0];
    a[1] = ctx->user_ip6[1];
    a[2] = ctx->user_ip6[2];
    a[3] = ctx->user_ip6[3];
    __u8 mapped = a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
    if (mapped) {
        __builtin_memcpy(v.remote, &a[3], 4);
        v.family = AF_INET;
    } else {
        __builtin_memcpy(v.remote, a, 16);
        v.family = AF_INET6;
    }
    v.remote_port = bpf_ntohs((__u16)ctx->user_port);
    struct ft_relay_listener *l = 0;
    if (!take(ctx, &v, mapped, &l) || !l)
        return 1;
    struct ft_relay_hint *h = natural_source(bpf_get_netns_cookie(ctx), v.family, v.remote);
    if (mapped) {
        __u32 to = l->ip4;
        if (h)
            __builtin_memcpy(&to, h->source, 4);
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = bpf_htonl(0xffff);
        ctx->user_ip6[3] = to;
        ctx->user_port = bpf_htons(l->port4);
        return 1;
    }
    __u32 to[4];
    __builtin_memcpy(to, h ? h->source : l->ip6, 16);
    ctx->user_ip6[0] = to[0];
    ctx->user_ip6[1] = to[1];
    ctx->user_ip6[2] = to[2];
    ctx->user_ip6[3] = to[3];
    ctx->user_port = bpf_htons(l->port6);
    return 1;
}

/* Inbound: an incoming TCP SYN that an inbound rule selects goes to the agent's inbound
 * listener, which connects to the original destination itself. Its own connects (their
 * source endpoints are in ft_relay_inbound) pass to the server. */
SEC("sk_lookup")
int ft_relay_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    __u32 zero = 0;
    __u32 *rules = bpf_map_lookup_elem(&ft_stream_rule_count, &zero);
    if (!rules || *rules == 0)
        return SK_PASS;
    struct connect_view v = {};
    v.direction = FT_DIR_INBOUND;
    v.remote_port = bpf_ntohs(ctx->remote_port);
    v.local_port = (__u16)ctx->local_port;
    if (ctx->family == AF_INET) {
        __u32 a = ctx->remote_ip4;
        __builtin_memcpy(v.remote, &a, 4);
        v.family = AF_INET;
    } else {
        __u32 a[4];
        a[0] = ctx->remote_ip6[0];
        a[1] = ctx->remote_ip6[1];
        a[2] = ctx->remote_ip6[2];
        a[3] = ctx->remote_ip6[3];
        if (a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff)) {
            __builtin_memcpy(v.remote, &a[3], 4);
            v.family = AF_INET;
        } else {
            __builtin_memcpy(v.remote, a, 16);
            v.family = AF_INET6;
        }
    }
    __u64 *home = bpf_map_lookup_elem(&ft_relay_home, &zero);
    if (!home || *home == 0)
        return SK_PASS;
    struct ft_relay_endpoint self = {};
    self.netns_cookie = *home;
    __builtin_memcpy(self.addr, v.remote, 16);
    self.port = v.remote_port;
    self.family = v.family;
    if (bpf_map_lookup_elem(&ft_relay_inbound, &self))
        return SK_PASS; /* the agent connecting to the server */
    if (!selected(&v))
        return SK_PASS;
    __u32 which = ctx->family == AF_INET ? 0 : 1;
    struct bpf_sock *sk = bpf_map_lookup_elem(&ft_relay_inbound_listener, &which);
    if (!sk) {
        rcount(FT_RCNT_INBOUND_NO_LISTENER);
        return SK_PASS;
    }
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    rcount(err ? FT_RCNT_INBOUND_ASSIGN_FAILED : FT_RCNT_INBOUND_REDIRECTED);
    return SK_PASS;
}

/* ---------------------------------------------------------------- fast path
 * stream.fast_path: sockmap. Both sockets of a relayed flow are the agent's; once the
 * callouts of a direction have allowed the connection, what arrives on its reading socket
 * is redirected to the writing socket's egress here, without a copy to user space. The
 * agent keeps the FIN after the data (it shuts the writing socket only once every
 * redirected byte is in its send queue) and bounds the kernel's queue (hold). */
struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, FT_RELAY_SPLICE_MAX);
    __type(key, __u64); /* socket cookie */
    __type(value, __u64);
} ft_relay_splice SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, FT_RELAY_SPLICE_MAX);
    __type(key, __u64);
    __type(value, struct ft_relay_splice_ctl);
} ft_relay_splice_ctl SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, FT_RELAY_SPLICE_MAX);
    __type(key, __u64);
    __type(value, struct ft_relay_splice_stat);
} ft_relay_splice_stat SEC(".maps");

/* Weak: resolved only where they exist, so the object (copy path, other namespaces'
 * instances) loads on a kernel without them; only the verdict needs them. */
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;

/* Cuts the head of an skb whose start was seen already: the verdict gets whole skbs, also
 * the first one after the socket went in, part of which the agent may have read with
 * recv() (its copied_seq says where the unread bytes begin), and retransmitted ones
 * that overlap what came before. Returns the bytes left. */
static __always_inline __u32 trim_seen(struct __sk_buff *skb, struct ft_relay_splice_stat *s)
{
    struct sk_buff *k = bpf_cast_to_kern_ctx(skb);
    struct tcp_skb_cb *cb = (struct tcp_skb_cb *)k->cb;
    __u32 seq = cb->seq;
    __u32 len = skb->len;
    if (!s->seq_valid) {
        struct sock *sk = k->sk;
        struct tcp_sock *tp = sk ? bpf_rdonly_cast(sk, bpf_core_type_id_kernel(struct tcp_sock)) : NULL;
        if (tp) {
            s->next_seq = tp->copied_seq;
            s->seq_valid = 1;
        }
    }
    if (s->seq_valid) {
        __s32 old = (__s32)(s->next_seq - seq);
        if (old >= (__s32)len) {
            s->trimmed += len;
            return 0;
        }
        for (int i = 0; i < 64 && old > 0; i++) {
            __s32 n = old > 4095 ? 4095 : old;
            if (bpf_skb_adjust_room(skb, -n, 0, 0))
                break;
            old -= n;
            s->trimmed += n;
        }
        if (old > 0)
            s->trim_failed++;
    }
    s->next_seq = seq + len;
    s->seq_valid = 1;
    return skb->len;
}

/* Bytes go to the peer socket's egress unless this direction is held or the agent still
 * owes bytes it was passed (then SK_PASS: they stay in this socket, charged to its
 * receive buffer, so its TCP window closes, and the agent relays them itself). */
SEC("sk_skb/stream_verdict")
int ft_relay_verdict(struct __sk_buff *skb)
{
    __u64 cookie = bpf_get_socket_cookie(skb);
    struct ft_relay_splice_ctl *c = bpf_map_lookup_elem(&ft_relay_splice_ctl, &cookie);
    struct ft_relay_splice_stat *s = bpf_map_lookup_elem(&ft_relay_splice_stat, &cookie);
    if (!c || !s)
        return SK_PASS;
    if (skb->len == 0) {
        /* A FIN-only skb: the FIN is TCP state; an empty redirect would break the
         * target's psock (EPIPE). */
        s->empty++;
        return SK_DROP;
    }
    __u32 len = trim_seen(skb, s);
    if (len == 0)
        return SK_DROP;
    if (c->hold || s->passed != c->consumed) {
        s->passed += len;
        return SK_PASS;
    }
    if (bpf_sk_redirect_hash(skb, &ft_relay_splice, &c->peer_cookie, 0) != SK_PASS) {
        s->redirect_failed++;
        s->passed += len;
        return SK_PASS;
    }
    s->redirected += len;
    return SK_PASS;
}
