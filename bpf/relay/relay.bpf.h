/* The stream relay: selection rules, slots, and the sk_msg/sk_skb programs (docs/stream-relay.md). */
#ifndef FT_RELAY_RELAY_BPF_H
#define FT_RELAY_RELAY_BPF_H

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
    FT_FILL_TCP_TUPLE(skb, &t);
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

#endif
