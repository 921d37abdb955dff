/* Every map of the flowtag object, and the per-CPU counters. */
#ifndef FT_LIB_MAPS_BPF_H
#define FT_LIB_MAPS_BPF_H

#include "shared_maps.bpf.h"

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


static __always_inline void count(__u32 idx)
{
    __u64 *v = bpf_map_lookup_elem(&ft_counters, &idx);
    if (v)
        *v += 1; /* per-CPU: no atomic needed */
}

#endif
