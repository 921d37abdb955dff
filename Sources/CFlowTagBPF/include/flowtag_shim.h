/* C shim around the generated flowtag skeleton.
 *
 * A handful of non-inline functions, module-prefixed (ftbpf_), returning 0 or a
 * negative errno. No libbpf types, macros, unions or va_list appear here, so Swift
 * imports it cleanly; the ABI structs come from flowtag_abi.h.
 */
#ifndef FLOWTAG_SHIM_H
#define FLOWTAG_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include "flowtag_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ftbpf;

/* The maps the agent reads or writes, written once: the enum constant's suffix and the
 * map's name in the object (and under the pin directory's maps/). */
#define FTBPF_MAPS(X)                                   \
    X(TCP_FLOWS, ft_tcp_flows)                          \
    X(UDP_FLOWS, ft_udp_flows)                          \
    X(PROCS, ft_procs)                                  \
    X(COUNTERS, ft_counters)                            \
    X(EVENTS, ft_events)                                \
    X(SK_STATE, ft_sk_state)                            \
    X(OUTBOX, ft_outbox)                                \
    X(BUILD, ft_build)                                  \
    X(RELAY_ORIGS, ft_relay_origs)                      \
    X(RELAY_MARKS, ft_relay_marks)                      \
    X(RELAY_PENDING, ft_relay_pending)                  \
    X(RELAY_INBOUND, ft_relay_inbound)

enum ftbpf_map {
#define FTBPF_MAP_ENUM(id, name) FTBPF_MAP_##id,
    FTBPF_MAPS(FTBPF_MAP_ENUM)
#undef FTBPF_MAP_ENUM
    FTBPF_MAP_COUNT
};

struct ftbpf_config {
    uint32_t tcp_flows_max;  /* 0: default of the object */
    uint32_t udp_flows_max;
    uint32_t procs_max;
    uint32_t ringbuf_bytes;  /* power of two, multiple of the page size */
};

/* Open and load the programs. On failure *err receives libbpf's last words. */
int ftbpf_open_load(const struct ftbpf_config *config, struct ftbpf **out, char *err, size_t err_len);

/* Adopt programs another agent pinned under dir (after a crash): open the pinned maps;
 * the pinned links keep the programs attached, nothing is loaded or attached again. */
int ftbpf_open_pinned(const char *dir, struct ftbpf **out, char *err, size_t err_len);

/* Attach every program: the cgroup ones to cgroup_fd (multi-attach links), the rest
 * to their tracepoints. On failure nothing stays attached and *err names the program. */
int ftbpf_attach(struct ftbpf *obj, int cgroup_fd, char *err, size_t err_len);

/* Pin maps under dir/maps and links under dir/links (dir must be on a bpffs). */
int ftbpf_pin(struct ftbpf *obj, const char *dir);
/* Remove the pins made by ftbpf_pin (the objects stay alive while we hold them). */
int ftbpf_unpin(struct ftbpf *obj, const char *dir);

/* Detach every link, close every fd and free the object. NULL is fine. */
void ftbpf_destroy(struct ftbpf *obj);

int ftbpf_map_fd(struct ftbpf *obj, enum ftbpf_map map);
/* Kernel ids of the loaded programs, for tests that check nothing is left behind. */
int ftbpf_prog_ids(struct ftbpf *obj, uint32_t *ids, size_t cap);

/* 1 when a program with this kernel id is loaded, 0 when not, or -errno. */
int ftbpf_prog_exists(uint32_t id);

/* Ring buffer. The callback returns 0 to go on, nonzero to stop the current poll. */
typedef int (*ftbpf_event_fn)(void *ctx, const void *data, size_t len);
int ftbpf_events_open(struct ftbpf *obj, ftbpf_event_fn fn, void *ctx);
/* Wait up to timeout_ms and consume what arrived: count of records or -errno. */
int ftbpf_events_poll(struct ftbpf *obj, int timeout_ms);
/* Consume what is there without waiting. */
int ftbpf_events_consume(struct ftbpf *obj);

/* Thin map access by fd (also for maps opened from pins). */
/* An fd for a pinned map or program (bpf_obj_get), or -errno. */
int ftbpf_obj_get(const char *path);
int ftbpf_map_lookup(int fd, const void *key, void *value);
int ftbpf_map_next_key(int fd, const void *key, void *next_key);
int ftbpf_map_update(int fd, const void *key, const void *value, uint64_t flags);
int ftbpf_map_delete(int fd, const void *key);
/* Deletes `count` keys (BPF_MAP_DELETE_BATCH); returns how many were deleted, or -errno.
 * Keys that are gone already are skipped. */
int ftbpf_map_delete_many(int fd, const void *keys, uint32_t key_size, uint32_t count);
/* Reads up to `cap` entries from `*cursor` on (BPF_MAP_LOOKUP_BATCH; *cursor 0 starts,
 * keys and values packed). Returns the count, 0 at the end, or -errno. */
int ftbpf_map_read_many(int fd, uint64_t *cursor, void *keys, void *values, uint32_t cap);

/* How many links a complete set of this build's pins holds, or -errno. */
int ftbpf_expected_links(void);

/* FNV-1a of the BPF object this shim was built with: names the program build. */
uint64_t ftbpf_object_hash(void);
/* Sum of one slot of a per-CPU u64 array. */
int ftbpf_percpu_sum(int fd, uint32_t index, uint64_t *sum);

/* Feature probe: 0 when this kernel can run the programs; otherwise -errno and
 * *missing names the first missing program or map type. */
int ftbpf_probe(char *missing, size_t missing_len);

/* Number of possible CPUs (per-CPU map value counts). */
int ftbpf_num_cpus(void);

/* BPF run-time statistics of one loaded program (kernel.bpf_stats_enabled=1). */
int ftbpf_prog_stats(struct ftbpf *obj, size_t index, char *name, size_t name_len,
                     uint64_t *run_time_ns, uint64_t *run_cnt);
size_t ftbpf_prog_count(struct ftbpf *obj);

/* ---------------------------------------------------------------- relay object
 * The stream relay's connect-redirect programs (bpf/relay/relay.bpf.c): loaded at every
 * agent start and attached with links only the agent holds, so they detach when it
 * exits, however it exits. It shares the process table and the relay's socket records
 * with the flowtag object (their fds are given to ftrelay_open_load). */
struct ftrelay;

#define FTRELAY_MAPS(X)                                 \
    X(STREAM_RULES, ft_stream_rules)                    \
    X(STREAM_RULE_COUNT, ft_stream_rule_count)          \
    X(LISTENERS, ft_relay_listeners)                    \
    X(HINTS, ft_relay_hints)                            \
    X(COUNTERS, ft_relay_counters)                      \
    X(INBOUND_LISTENER, ft_relay_inbound_listener)      \
    X(HOME, ft_relay_home)                              \
    X(SPLICE, ft_relay_splice)                          \
    X(SPLICE_CTL, ft_relay_splice_ctl)                  \
    X(SPLICE_STAT, ft_relay_splice_stat)

enum ftrelay_map {
#define FTRELAY_MAP_ENUM(id, name) FTRELAY_MAP_##id,
    FTRELAY_MAPS(FTRELAY_MAP_ENUM)
#undef FTRELAY_MAP_ENUM
    FTRELAY_MAP_COUNT
};

/* Open and load, reusing the flowtag object's ft_procs, ft_relay_origs, ft_relay_marks
 * and ft_relay_inbound. The fast path's verdict is loaded only when fast_path is set
 * (it needs kfuncs a kernel may lack; the copy path does not). */
int ftrelay_open_load(int procs_fd, int origs_fd, int marks_fd, int inbound_fd, int fast_path, struct ftrelay **out,
                      char *err, size_t err_len);
/* Attach the connect hooks to cgroup_fd. On failure nothing stays attached. */
int ftrelay_attach(struct ftrelay *r, int cgroup_fd, char *err, size_t err_len);
/* Attach the inbound sk_lookup program to the netns of netns_fd (held until destroy). */
int ftrelay_attach_inbound(struct ftrelay *r, int netns_fd, char *err, size_t err_len);
/* Attach the fast path's verdict to its sockhash (released with the map when the agent
 * exits, however it exits). */
int ftrelay_attach_splice(struct ftrelay *r, char *err, size_t err_len);
/* Inbound relaying in another network namespace: a second instance of the relay object
 * sharing every map of `main` but its own ft_relay_home (set to netns_cookie) and
 * ft_relay_inbound_listener (v4_fd, and v6_fd when >= 0: listeners made in that
 * namespace), with only its sk_lookup program loaded and attached to netns_fd. Free
 * with ftrelay_destroy (it detaches). */
int ftrelay_open_inbound(struct ftrelay *main, int netns_fd, uint64_t netns_cookie, int v4_fd, int v6_fd,
                         struct ftrelay **out, char *err, size_t err_len);
/* Detach, close and free. NULL is fine. */
void ftrelay_destroy(struct ftrelay *r);
int ftrelay_map_fd(struct ftrelay *r, enum ftrelay_map map);
/* Requests for listeners (struct ft_relay_request): the fd to wait on (epoll), and a
 * consume that calls fn for each record. */
int ftrelay_requests_open(struct ftrelay *r, ftbpf_event_fn fn, void *ctx);
int ftrelay_requests_fd(struct ftrelay *r);
int ftrelay_requests_consume(struct ftrelay *r);

#ifdef __cplusplus
}
#endif
#endif
