/* Send and receive: refine owners, UDP flows and their counters, UDP socket release. */
#ifndef FT_TAGGING_IO_BPF_H
#define FT_TAGGING_IO_BPF_H

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

#endif
