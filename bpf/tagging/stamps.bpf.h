/* Stamps: the owner of a socket, written in process context (create, connect, send/receive). */
#ifndef FT_TAGGING_STAMPS_BPF_H
#define FT_TAGGING_STAMPS_BPF_H

/* ---------------------------------------------------------------- stamps */

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

#endif
