/* Maps of the flowtag object that the relay object uses too (the agent hands their fds
 * to the relay object before it loads): the process table, for rules by executable, and
 * the relay's per-socket records, which the flowtag object's sockops and getpeername
 * programs read. Both objects compile these same definitions. */
#ifndef FT_LIB_SHARED_MAPS_BPF_H
#define FT_LIB_SHARED_MAPS_BPF_H

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 32768);
    __type(key, __u32); /* tgid */
    __type(value, struct ft_proc);
} ft_procs SEC(".maps");

/* A redirected socket's original destination and owner (written by the relay's connect
 * hook). Not cloned: only connecting sockets carry it. */
struct {
    __uint(type, BPF_MAP_TYPE_SK_STORAGE);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, int);
    __type(value, struct ft_relay_orig);
} ft_relay_origs SEC(".maps");

/* The agent's relay sockets (written by the agent with the socket's fd as key). Cloned,
 * so every connection its listeners accept is marked before sockops sees it. */
struct {
    __uint(type, BPF_MAP_TYPE_SK_STORAGE);
    __uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
    __type(key, int);
    __type(value, struct ft_relay_mark);
} ft_relay_marks SEC(".maps");

/* Hand-over entries, written at establishment and deleted by the agent at accept. LRU:
 * connects the agent never accepts (it stopped) cannot fill it. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, FT_RELAY_PENDING_MAX);
    __type(key, struct ft_relay_pending_key);
    __type(value, struct ft_relay_orig);
} ft_relay_pending SEC(".maps");

/* Inbound relayed connections by the agent's server-facing endpoint (ft_relay_inbound):
 * written by the agent before it connects, completed by sockops, deleted by the agent when
 * the flow ends. LRU: entries of an agent that died cannot fill it. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, FT_RELAY_INBOUND_MAX);
    __type(key, struct ft_relay_endpoint);
    __type(value, struct ft_relay_inbound);
} ft_relay_inbound SEC(".maps");

#endif
