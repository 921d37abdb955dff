/* Map access, the ring buffer, program statistics and the feature probe. */
#include "shim_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <bpf/bpf.h>

int ftbpf_map_fd(struct ftbpf *obj, enum ftbpf_map which)
{
    if (which < 0 || which >= FTBPF_MAP_COUNT)
        return -EINVAL;
    if (!obj->bobj)
        return obj->pinned_fds[which];
    struct bpf_map *m = bpf_object__find_map_by_name(obj->bobj, ftbpf_map_names[which]);
    if (!m)
        return -ENOENT;
    return bpf_map__fd(m);
}

size_t ftbpf_prog_count(struct ftbpf *obj)
{
    if (!obj->bobj)
        return 0;
    size_t n = 0;
    struct bpf_program *prog;
    bpf_object__for_each_program(prog, obj->bobj) n++;
    return n;
}

static struct bpf_program *prog_at(struct ftbpf *obj, size_t index)
{
    size_t n = 0;
    struct bpf_program *prog;
    bpf_object__for_each_program(prog, obj->bobj) {
        if (n++ == index)
            return prog;
    }
    return NULL;
}

int ftbpf_prog_ids(struct ftbpf *obj, uint32_t *ids, size_t cap)
{
    if (!obj->bobj)
        return 0;
    size_t n = 0;
    struct bpf_program *prog;
    bpf_object__for_each_program(prog, obj->bobj) {
        if (n >= cap)
            break;
        struct bpf_prog_info info = {};
        __u32 len = sizeof(info);
        int rc = bpf_obj_get_info_by_fd(bpf_program__fd(prog), &info, &len);
        if (rc)
            return rc < 0 ? rc : -errno;
        ids[n++] = info.id;
    }
    return (int)n;
}

int ftbpf_prog_stats(struct ftbpf *obj, size_t index, char *name, size_t name_len,
                     uint64_t *run_time_ns, uint64_t *run_cnt)
{
    struct bpf_program *prog = prog_at(obj, index);
    if (!prog)
        return -ENOENT;
    struct bpf_prog_info info = {};
    __u32 len = sizeof(info);
    int rc = bpf_obj_get_info_by_fd(bpf_program__fd(prog), &info, &len);
    if (rc)
        return rc < 0 ? rc : -errno;
    snprintf(name, name_len, "%s", bpf_program__name(prog));
    *run_time_ns = info.run_time_ns;
    *run_cnt = info.run_cnt;
    return 0;
}

int ftbpf_events_open(struct ftbpf *obj, ftbpf_event_fn fn, void *ctx)
{
    if (obj->rb)
        return -EBUSY;
    obj->rb = ring_buffer__new(ftbpf_map_fd(obj, FTBPF_MAP_EVENTS), (ring_buffer_sample_fn)fn, ctx, NULL);
    if (!obj->rb)
        return -errno;
    return 0;
}

int ftbpf_events_poll(struct ftbpf *obj, int timeout_ms)
{
    if (!obj->rb)
        return -EINVAL;
    int rc = ring_buffer__poll(obj->rb, timeout_ms);
    if (rc < 0 && rc != -EINTR)
        return rc;
    /* The kernel wakes us only for large batches: epoll times out with records waiting,
     * and ring_buffer__poll consumes only rings epoll reported. */
    int more = ring_buffer__consume(obj->rb);
    if (more < 0)
        return more;
    return (rc > 0 ? rc : 0) + more;
}

int ftbpf_events_consume(struct ftbpf *obj)
{
    if (!obj->rb)
        return -EINVAL;
    return ring_buffer__consume(obj->rb);
}

static int neg_errno(int rc) { return rc < 0 ? (rc == -1 ? -errno : rc) : 0; }

int ftbpf_map_delete_many(int fd, const void *keys, uint32_t key_size, uint32_t count)
{
    /* The kernel stops a batch at the first missing key (-ENOENT, count = deleted so
     * far): skip that key and go on with the rest. */
    const char *k = keys;
    uint32_t done = 0, deleted = 0;
    while (done < count) {
        __u32 n = count - done;
        int rc = bpf_map_delete_batch(fd, k + (size_t)done * key_size, &n, NULL);
        deleted += n;
        done += n;
        if (rc == 0)
            continue;
        if (errno != ENOENT)
            return -errno;
        done++; /* the missing key */
    }
    return (int)deleted;
}

int ftbpf_map_read_many(int fd, uint64_t *cursor, void *keys, void *values, uint32_t cap)
{
    /* The kernel's batch cursor for hash maps is a bucket index (u32 in a u64 slot). */
    __u64 out = 0;
    __u32 n = cap;
    int rc = bpf_map_lookup_batch(fd, *cursor ? cursor : NULL, &out, keys, values, &n, NULL);
    if (rc < 0 && errno != ENOENT)
        return -errno;
    *cursor = out;
    if (rc < 0 && n == 0)
        return 0;
    return (int)n;
}

int ftbpf_obj_get(const char *path) { int fd = bpf_obj_get(path); return fd < 0 ? -errno : fd; }
int ftbpf_map_lookup(int fd, const void *key, void *value) { return neg_errno(bpf_map_lookup_elem(fd, key, value)); }
int ftbpf_map_next_key(int fd, const void *key, void *next_key) { return neg_errno(bpf_map_get_next_key(fd, key, next_key)); }
int ftbpf_map_update(int fd, const void *key, const void *value, uint64_t flags) { return neg_errno(bpf_map_update_elem(fd, key, value, flags)); }
int ftbpf_map_delete(int fd, const void *key) { return neg_errno(bpf_map_delete_elem(fd, key)); }

int ftbpf_num_cpus(void) { return libbpf_num_possible_cpus(); }

int ftbpf_percpu_sum(int fd, uint32_t index, uint64_t *sum)
{
    int ncpu = libbpf_num_possible_cpus();
    if (ncpu <= 0)
        return ncpu < 0 ? ncpu : -EINVAL;
    uint64_t *vals = calloc((size_t)ncpu, sizeof(uint64_t));
    if (!vals)
        return -ENOMEM;
    int rc = neg_errno(bpf_map_lookup_elem(fd, &index, vals));
    if (!rc) {
        uint64_t s = 0;
        for (int i = 0; i < ncpu; i++) s += vals[i];
        *sum = s;
    }
    free(vals);
    return rc;
}

int ftbpf_probe(char *missing, size_t missing_len)
{
    ftbpf_install_print();
    static const struct { enum bpf_prog_type type; const char *name; } progs[] = {
        { BPF_PROG_TYPE_CGROUP_SOCK, "cgroup_sock (CONFIG_CGROUP_BPF)" },
        { BPF_PROG_TYPE_CGROUP_SOCK_ADDR, "cgroup_sock_addr (CONFIG_CGROUP_BPF)" },
        { BPF_PROG_TYPE_SOCK_OPS, "sock_ops (CONFIG_CGROUP_BPF)" },
    };
    static const struct { enum bpf_map_type type; const char *name; } maps[] = {
        { BPF_MAP_TYPE_SK_STORAGE, "sk_storage map (CONFIG_BPF_SYSCALL, Linux >= 5.2)" },
        { BPF_MAP_TYPE_RINGBUF, "ringbuf map (Linux >= 5.8)" },
        { BPF_MAP_TYPE_LRU_HASH, "lru_hash map" },
    };
    for (size_t i = 0; i < sizeof(progs) / sizeof(progs[0]); i++) {
        int rc = libbpf_probe_bpf_prog_type(progs[i].type, NULL);
        if (rc <= 0) {
            snprintf(missing, missing_len, "program type %s", progs[i].name);
            return rc < 0 ? rc : -EOPNOTSUPP;
        }
    }
    for (size_t i = 0; i < sizeof(maps) / sizeof(maps[0]); i++) {
        int rc = libbpf_probe_bpf_map_type(maps[i].type, NULL);
        if (rc <= 0) {
            snprintf(missing, missing_len, "map type %s", maps[i].name);
            return rc < 0 ? rc : -EOPNOTSUPP;
        }
    }
    return 0;
}

int ftbpf_prog_exists(uint32_t id)
{
    int fd = bpf_prog_get_fd_by_id(id);
    if (fd >= 0) {
        close(fd);
        return 1;
    }
    return errno == ENOENT ? 0 : -errno;
}

