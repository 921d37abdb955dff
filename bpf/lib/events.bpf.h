/* Events to the agent (the ring buffer), and the tuple fill shared by sock_ops and sk_skb. */
#ifndef FT_LIB_EVENTS_BPF_H
#define FT_LIB_EVENTS_BPF_H

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


/* A TCP 4-tuple from a context carrying the socket's addresses (bpf_sock_ops, __sk_buff:
 * the same field names): addresses as they are (network order), ports in host order. */
#define FT_FILL_TCP_TUPLE(ctx, t)                                                   \
    do {                                                                            \
        __builtin_memset((t), 0, sizeof(*(t)));                                     \
        (t)->family = (ctx)->family;                                                \
        (t)->protocol = IPPROTO_TCP;                                                \
        (t)->local_port = (ctx)->local_port;                                        \
        (t)->remote_port = bpf_ntohl((ctx)->remote_port);                           \
        if ((ctx)->family == AF_INET) {                                             \
            __u32 l4 = (ctx)->local_ip4, r4 = (ctx)->remote_ip4;                    \
            __builtin_memcpy((t)->local, &l4, 4);                                   \
            __builtin_memcpy((t)->remote, &r4, 4);                                  \
        } else {                                                                    \
            __u32 l6[4], r6[4];                                                     \
            l6[0] = (ctx)->local_ip6[0]; l6[1] = (ctx)->local_ip6[1];               \
            l6[2] = (ctx)->local_ip6[2]; l6[3] = (ctx)->local_ip6[3];               \
            r6[0] = (ctx)->remote_ip6[0]; r6[1] = (ctx)->remote_ip6[1];             \
            r6[2] = (ctx)->remote_ip6[2]; r6[3] = (ctx)->remote_ip6[3];             \
            __builtin_memcpy((t)->local, l6, 16);                                   \
            __builtin_memcpy((t)->remote, r6, 16);                                  \
        }                                                                           \
    } while (0)

#endif
