/* Every map of the flowtag object (also the relay's), and the per-CPU counters. */
#ifndef FT_LIB_MAPS_BPF_H
#define FT_LIB_MAPS_BPF_H

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

#endif
