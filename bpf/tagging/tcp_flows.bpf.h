/* TCP flows: open and close from sock_ops, the accepting process from getpeername. */
#ifndef FT_TAGGING_TCP_FLOWS_BPF_H
#define FT_TAGGING_TCP_FLOWS_BPF_H

/* ---------------------------------------------------------------- TCP */

static __always_inline void flow_from_sockops(struct bpf_sock_ops *skops, struct ft_flow *f, __u8 dir)
{
    __builtin_memset(f, 0, sizeof(*f));
    FT_FILL_TCP_TUPLE(skops, &f->tuple);
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
    if (sk && relay_is_agent_socket(sk))
        return; /* the relay's own sockets: the relayed flow is the process's socket */
    __builtin_memset(&entry->stats, 0, sizeof(entry->stats));
    entry->closed_ns = 0;
    flow_from_sockops(skops, fp, dir);
    if (sk && dir == FT_DIR_OUTBOUND)
        relay_hand_over(sk, fp);
    if (dir == FT_DIR_INBOUND) {
        relay_inbound_server(fp);
        /* Until accept the owner is the listener's (cloned): report at accept. The
         * socket's own stamp is marked inherited too, so the process hooks know to
         * claim it (see claim_accepted). A listener older than the programs has no
         * stamp to clone: the socket gets an empty one (the flow stays unknown until
         * a process claims it). */
        if (fp->owner.attribution == FT_ATTR_KERNEL)
            fp->owner.attribution = FT_ATTR_INHERITED;
        fp->flags |= FT_FLOW_PENDING_ACCEPT;
        struct ft_sock_state *st = sk ? bpf_sk_storage_get(&ft_sk_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE) : 0;
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
    if (new_state != TCP_CLOSE)
        return;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct ft_tcp_entry *e = bpf_map_lookup_elem(&ft_tcp_flows, &cookie);

    if (!e || (e->flow.flags & FT_FLOW_CLOSED))
        return;

    /* The entry is not deleted: it is marked closed and keeps its close, and the agent
     * deletes it once the close is journaled (a crash in between loses nothing). */
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

static __always_inline int on_getpeername(struct bpf_sock_addr *ctx, const int v6)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->protocol != IPPROTO_TCP)
        return 1;
    struct ft_sock_state *st = bpf_sk_storage_get(&ft_sk_state, sk, 0, 0);
    if (st && st->owner.attribution == FT_ATTR_INHERITED)
        claim_accepted(st, bpf_get_socket_cookie(ctx), FT_HOOK_ACCEPT);
    relay_show_original(ctx, sk, v6);
    relay_show_client(ctx, v6);
    return 1;
}

SEC("cgroup/getpeername4")
int ft_getpeername4(struct bpf_sock_addr *ctx) { return on_getpeername(ctx, 0); }

SEC("cgroup/getpeername6")
int ft_getpeername6(struct bpf_sock_addr *ctx) { return on_getpeername(ctx, 1); }

#endif
