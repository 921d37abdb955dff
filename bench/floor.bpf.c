// SPDX-License-Identifier: GPL-2.0
/* B1's floor on this machine: what the cheapest ways to keep one stamp per socket cost,
 * measured alone (bench.py b1floor attaches one program at a time to a private cgroup and
 * reads the kernel's run_time_ns / run_cnt). Not part of the agent. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct stamp8 { __u64 tgid; };
struct stamp32 { __u64 tgid; __u64 uid_gid; __u64 cgroup; __u64 time; };
struct stamp96 { __u64 w[12]; };

struct {
    __uint(type, BPF_MAP_TYPE_SK_STORAGE);
    __uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
    __type(key, int);
    __type(value, struct stamp8);
} floor_sk8 SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_SK_STORAGE);
    __uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
    __type(key, int);
    __type(value, struct stamp96);
} floor_sk96 SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 262144);
    __type(key, __u64);
    __type(value, struct stamp32);
} floor_lru SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 262144);
    __type(key, __u64);
    __type(value, struct stamp32);
} floor_hash SEC(".maps");

/* Nothing: what running any cgroup program costs. */
SEC("cgroup/sock_create")
int floor_empty(struct bpf_sock *sk) { return 1; }

/* The allocation alone, smallest value. */
SEC("cgroup/sock_create")
int floor_sk_storage_8(struct bpf_sock *sk)
{
    struct stamp8 *s = bpf_sk_storage_get(&floor_sk8, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (s)
        s->tgid = bpf_get_current_pid_tgid() >> 32;
    return 1;
}

/* The agent's value size (struct ft_sock_state). */
SEC("cgroup/sock_create")
int floor_sk_storage_96(struct bpf_sock *sk)
{
    struct stamp96 *s = bpf_sk_storage_get(&floor_sk96, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (s)
        s->w[0] = bpf_get_current_pid_tgid() >> 32;
    return 1;
}

/* A 32-byte stamp keyed by socket cookie in a hash map: the two variants below differ
 * only in the map. */
static __always_inline int insert_stamp(struct bpf_sock_addr *ctx, void *map)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct stamp32 s = { bpf_get_current_pid_tgid() >> 32, bpf_get_current_uid_gid(), bpf_get_current_cgroup_id(), 0 };
    bpf_map_update_elem(map, &cookie, &s, BPF_ANY);
    return 1;
}

/* The shared notes' reference: an LRU hash. */
SEC("cgroup/connect4")
int floor_lru_insert(struct bpf_sock_addr *ctx) { return insert_stamp(ctx, &floor_lru); }

/* A preallocated hash (entries are never deleted here: a sock_release program would, at
 * a cost of its own). */
SEC("cgroup/connect4")
int floor_hash_insert(struct bpf_sock_addr *ctx) { return insert_stamp(ctx, &floor_hash); }

/* Nothing, as a sock_ops program: the kernel calls it for each of a connection's
 * callbacks (the flow lifecycle the agent needs comes from these). */
SEC("sockops")
int floor_sockops_empty(struct bpf_sock_ops *skops) { return 1; }
