/* Relayed sockets as the tagging programs see them (the relay object's connect hook
 * redirected them; docs/stream-relay.md): the hand-over entry for the agent, the
 * original destination in the flow and in getpeername, and the agent's own sockets
 * left out of the flows. */
#ifndef FT_TAGGING_RELAYED_BPF_H
#define FT_TAGGING_RELAYED_BPF_H

static __always_inline int relay_is_agent_socket(struct bpf_sock *sk)
{
    return bpf_sk_storage_get(&ft_relay_marks, sk, 0, 0) != 0;
}

static __always_inline int is_v4_mapped(const __u8 *a)
{
    __u64 head;
    __u32 mid;
    __builtin_memcpy(&head, a, 8);
    __builtin_memcpy(&mid, a + 8, 4);
    return head == 0 && mid == bpf_htonl(0xffff);
}

/* At establishment of a redirected process socket: publish what the agent needs at
 * accept (before the listener can queue the connection: it queues it on the ACK this
 * socket has not sent yet), and name the original destination in the flow. */
static __always_inline void relay_hand_over(struct bpf_sock *sk, struct ft_flow *f)
{
    struct ft_relay_orig *o = bpf_sk_storage_get(&ft_relay_origs, sk, 0, 0);
    if (!o || o->cookie != f->cookie)
        return;
    struct ft_relay_pending_key key = {};
    key.netns_cookie = f->netns_cookie;
    key.peer_port = f->tuple.local_port;
    key.local_port = f->tuple.remote_port;
    if (f->tuple.family == AF_INET6 && is_v4_mapped(f->tuple.remote)) {
        /* The IPv4 listener sees plain IPv4. */
        key.family = AF_INET;
        __builtin_memcpy(key.peer, f->tuple.local + 12, 4);
        __builtin_memcpy(key.local, f->tuple.remote + 12, 4);
    } else {
        key.family = f->tuple.family;
        __builtin_memcpy(key.peer, f->tuple.local, 16);
        __builtin_memcpy(key.local, f->tuple.remote, 16);
    }
    if (bpf_map_update_elem(&ft_relay_pending, &key, o, BPF_ANY))
        count(FT_CNT_RELAY_PENDING_FULL);
    __builtin_memset(f->tuple.remote, 0, 16);
    if (o->mapped) {
        f->tuple.remote[10] = 0xff;
        f->tuple.remote[11] = 0xff;
        __builtin_memcpy(f->tuple.remote + 12, o->dst, 4);
    } else if (o->family == AF_INET) {
        __builtin_memcpy(f->tuple.remote, o->dst, 4);
    } else {
        __builtin_memcpy(f->tuple.remote, o->dst, 16);
    }
    f->tuple.remote_port = o->dst_port;
    f->flags |= FT_FLOW_RELAYED;
}

/* getpeername on a redirected socket names the original destination. */
static __always_inline void relay_show_original(struct bpf_sock_addr *ctx, struct bpf_sock *sk, const int v6)
{
    struct ft_relay_orig *o = bpf_sk_storage_get(&ft_relay_origs, sk, 0, 0);
    if (!o)
        return;
    ctx->user_port = bpf_htons(o->dst_port);
    if (!v6) {
        __u32 a;
        __builtin_memcpy(&a, o->dst, 4);
        ctx->user_ip4 = a;
        return;
    }
    __u32 a[4] = {};
    if (o->mapped) {
        a[2] = bpf_htonl(0xffff);
        __builtin_memcpy(&a[3], o->dst, 4);
    } else {
        __builtin_memcpy(a, o->dst, 16);
    }
    ctx->user_ip6[0] = a[0];
    ctx->user_ip6[1] = a[1];
    ctx->user_ip6[2] = a[2];
    ctx->user_ip6[3] = a[3];
}

/* The inbound entry of the agent's connection whose endpoint is (addr, port) as a socket
 * names it (IPv4 in the first 4 bytes, or 16 bytes of IPv6, possibly v4-mapped). */
static __always_inline struct ft_relay_inbound *relay_inbound_of(const __u8 *addr, __u16 port, __u8 family,
                                                                 __u64 netns)
{
    struct ft_relay_endpoint k = {};
    k.port = port;
    k.netns_cookie = netns;
    if (family == AF_INET6 && is_v4_mapped(addr)) {
        k.family = AF_INET;
        __builtin_memcpy(k.addr, addr + 12, 4);
    } else if (family == AF_INET) {
        k.family = AF_INET;
        __builtin_memcpy(k.addr, addr, 4);
    } else {
        k.family = AF_INET6;
        __builtin_memcpy(k.addr, addr, 16);
    }
    return bpf_map_lookup_elem(&ft_relay_inbound, &k);
}

/* Writes the client into an address of `family` (v4-mapped in an IPv6 one). */
static __always_inline void relay_put_client(__u8 *out, __u8 family, const struct ft_relay_endpoint *c)
{
    __builtin_memset(out, 0, 16);
    if (c->family == AF_INET && family == AF_INET6) {
        out[10] = 0xff;
        out[11] = 0xff;
        __builtin_memcpy(out + 12, c->addr, 4);
    } else if (c->family == AF_INET) {
        __builtin_memcpy(out, c->addr, 4);
    } else {
        __builtin_memcpy(out, c->addr, 16);
    }
}

/* At establishment of a server's socket whose peer is the agent's inbound relay: tell the
 * agent the server's cookie and owner (the listener's), and name the real client in the
 * flow. */
static __always_inline void relay_inbound_server(struct ft_flow *f)
{
    struct ft_relay_inbound *e = relay_inbound_of(f->tuple.remote, f->tuple.remote_port, f->tuple.family,
                                                  f->netns_cookie);
    if (!e || e->server_cookie)
        return; /* not the agent's, or taken: an entry names one server socket */
    __builtin_memcpy(&e->owner, &f->owner, sizeof(e->owner));
    e->server_cookie = f->cookie;
    relay_put_client(f->tuple.remote, f->tuple.family, &e->client);
    f->tuple.remote_port = e->client.port;
    f->flags |= FT_FLOW_RELAYED;
}

/* getpeername on a server's socket whose peer is the agent's inbound relay names the
 * real client. */
static __always_inline void relay_show_client(struct bpf_sock_addr *ctx, const int v6)
{
    __u8 a[16] = {};
    __u8 family = AF_INET;
    if (!v6) {
        __u32 v = ctx->user_ip4;
        __builtin_memcpy(a, &v, 4);
    } else {
        __u32 w[4];
        w[0] = ctx->user_ip6[0];
        w[1] = ctx->user_ip6[1];
        w[2] = ctx->user_ip6[2];
        w[3] = ctx->user_ip6[3];
        __builtin_memcpy(a, w, 16);
        family = AF_INET6;
    }
    struct ft_relay_inbound *e = relay_inbound_of(a, bpf_ntohs((__u16)ctx->user_port), family,
                                                  bpf_get_netns_cookie(ctx));
    if (!e || e->server_cookie != bpf_get_socket_cookie(ctx))
        return;
    relay_put_client(a, family, &e->client);
    ctx->user_port = bpf_htons(e->client.port);
    if (!v6) {
        __u32 v;
        __builtin_memcpy(&v, a, 4);
        ctx->user_ip4 = v;
        return;
    }
    __u32 w[4];
    __builtin_memcpy(w, a, 16);
    ctx->user_ip6[0] = w[0];
    ctx->user_ip6[1] = w[1];
    ctx->user_ip6[2] = w[2];
    ctx->user_ip6[3] = w[3];
}

#endif
