#include "flowtag_shim.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>
#include <pthread.h>
#include <dirent.h>
#include <malloc.h>
#include <sys/syscall.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/inet_diag.h>
#include <linux/tcp.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>

#include "generated/flowtag.skel.h"

#define FTBPF_MAX_LINKS 32

static const char *const map_names[FTBPF_MAP_COUNT] = {
#define FTBPF_MAP_NAME(id, name) [FTBPF_MAP_##id] = #name,
    FTBPF_MAPS(FTBPF_MAP_NAME)
#undef FTBPF_MAP_NAME
};

struct ftbpf {
    struct flowtag_bpf *skel; /* NULL when adopted from pins */
    int pinned_fds[FTBPF_MAP_COUNT];
    struct bpf_link *links[FTBPF_MAX_LINKS];
    char link_names[FTBPF_MAX_LINKS][64];
    size_t nlinks;
    struct ring_buffer *rb;
};

/* libbpf talks through one global print hook: keep its recent words per thread so a
 * failed load can say why, and print only when FLOWTAG_LIBBPF_DEBUG is set. */
static __thread char last_log[2048];
static __thread size_t last_log_len;

static int ftbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
    char line[512];
    va_list copy;
    va_copy(copy, ap);
    int n = vsnprintf(line, sizeof(line), fmt, copy);
    va_end(copy);
    if (n > 0) {
        size_t len = strlen(line);
        if (len >= sizeof(last_log)) len = sizeof(last_log) - 1;
        if (last_log_len + len >= sizeof(last_log)) {
            /* keep the tail: the reason is usually last */
            size_t keep = sizeof(last_log) / 2;
            if (last_log_len > keep) {
                memmove(last_log, last_log + last_log_len - keep, keep);
                last_log_len = keep;
            }
            if (last_log_len + len >= sizeof(last_log)) last_log_len = 0;
        }
        memcpy(last_log + last_log_len, line, len);
        last_log_len += len;
        last_log[last_log_len] = 0;
    }
    (void)level;
    if (getenv("FLOWTAG_LIBBPF_DEBUG"))
        return vfprintf(stderr, fmt, ap);
    return 0;
}

static pthread_once_t print_once = PTHREAD_ONCE_INIT;
static void install_print(void) { libbpf_set_print(ftbpf_print); }

static void set_err(char *err, size_t err_len, const char *what, int rc)
{
    if (!err || !err_len)
        return;
    /* last two lines of libbpf's log, which name the program and the reason */
    const char *tail = last_log;
    int newlines = 0;
    for (const char *p = last_log + last_log_len; p > last_log; p--) {
        if (p[-1] == '\n' && p != last_log + last_log_len) {
            if (++newlines == 3) { tail = p; break; }
        }
    }
    snprintf(err, err_len, "%s: %s%s%s", what, strerror(-rc), *tail ? "\n" : "", tail);
}

int ftbpf_open_pinned(const char *dir, struct ftbpf **out, char *err, size_t err_len)
{
    pthread_once(&print_once, install_print);
    *out = NULL;
    struct ftbpf *obj = calloc(1, sizeof(*obj));
    if (!obj)
        return -ENOMEM;
    for (int i = 0; i < FTBPF_MAP_COUNT; i++)
        obj->pinned_fds[i] = -1;
    for (int i = 0; i < FTBPF_MAP_COUNT; i++) {
        char path[512];
        snprintf(path, sizeof(path), "%s/maps/%s", dir, map_names[i]);
        int fd = bpf_obj_get(path);
        if (fd < 0) {
            int rc = -errno;
            if (err && err_len)
                snprintf(err, err_len, "open pinned map %s: %s", path, strerror(-rc));
            ftbpf_destroy(obj);
            return rc;
        }
        obj->pinned_fds[i] = fd;
    }
    *out = obj;
    return 0;
}

int ftbpf_open_load(const struct ftbpf_config *config, struct ftbpf **out, char *err, size_t err_len)
{
    pthread_once(&print_once, install_print);
    last_log_len = 0;
    last_log[0] = 0;
    *out = NULL;
    struct ftbpf *obj = calloc(1, sizeof(*obj));
    if (!obj)
        return -ENOMEM;
    obj->skel = flowtag_bpf__open();
    if (!obj->skel) {
        int rc = -errno;
        set_err(err, err_len, "open BPF object", rc);
        free(obj);
        return rc;
    }
    if (config) {
        if (config->tcp_flows_max)
            bpf_map__set_max_entries(obj->skel->maps.ft_tcp_flows, config->tcp_flows_max);
        if (config->udp_flows_max)
            bpf_map__set_max_entries(obj->skel->maps.ft_udp_flows, config->udp_flows_max);
        if (config->procs_max)
            bpf_map__set_max_entries(obj->skel->maps.ft_procs, config->procs_max);
        if (config->ringbuf_bytes)
            bpf_map__set_max_entries(obj->skel->maps.ft_events, config->ringbuf_bytes);
    }
    int rc = flowtag_bpf__load(obj->skel);
    if (rc) {
        set_err(err, err_len, "load BPF programs", rc);
        flowtag_bpf__destroy(obj->skel);
        free(obj);
        return rc;
    }
    *out = obj;
    return 0;
}

static int is_cgroup_prog(enum bpf_prog_type type)
{
    return type == BPF_PROG_TYPE_CGROUP_SOCK || type == BPF_PROG_TYPE_CGROUP_SOCK_ADDR ||
           type == BPF_PROG_TYPE_SOCK_OPS || type == BPF_PROG_TYPE_CGROUP_SKB;
}

static void detach_all(struct ftbpf *obj)
{
    for (size_t i = 0; i < obj->nlinks; i++)
        bpf_link__destroy(obj->links[i]);
    obj->nlinks = 0;
}

int ftbpf_attach(struct ftbpf *obj, int cgroup_fd, char *err, size_t err_len)
{
    struct bpf_program *prog;
    last_log_len = 0;
    last_log[0] = 0;
    bpf_object__for_each_program(prog, obj->skel->obj) {
        if (obj->nlinks >= FTBPF_MAX_LINKS) {
            detach_all(obj);
            return -E2BIG;
        }
        struct bpf_link *link;
        enum bpf_prog_type type = bpf_program__type(prog);
        if (type == BPF_PROG_TYPE_SK_MSG || type == BPF_PROG_TYPE_SK_SKB) {
            /* Attached to the relay sockhash, not a cgroup: it lives as long as the map
             * (pinned), with no link to pin. libbpf 1.1 has no attach_sockmap. */
            struct bpf_map *target = prog == obj->skel->progs.ft_relay_writer ? obj->skel->maps.ft_relay_writers
                                                                              : obj->skel->maps.ft_relay_socks;
            int rc = bpf_prog_attach(bpf_program__fd(prog), bpf_map__fd(target),
                                     type == BPF_PROG_TYPE_SK_MSG ? BPF_SK_MSG_VERDICT : BPF_SK_SKB_VERDICT, 0);
            if (rc) {
                rc = -errno;
                char what[128];
                snprintf(what, sizeof(what), "attach program %s to the relay sockhash", bpf_program__name(prog));
                set_err(err, err_len, what, rc);
                detach_all(obj);
                return rc;
            }
            continue;
        }
        if (is_cgroup_prog(type))
            link = bpf_program__attach_cgroup(prog, cgroup_fd);
        else
            link = bpf_program__attach(prog);
        if (!link) {
            int rc = -errno;
            char what[128];
            snprintf(what, sizeof(what), "attach program %s (%s)", bpf_program__name(prog),
                     bpf_program__section_name(prog));
            set_err(err, err_len, what, rc);
            detach_all(obj);
            return rc;
        }
        snprintf(obj->link_names[obj->nlinks], sizeof(obj->link_names[0]), "%s", bpf_program__name(prog));
        obj->links[obj->nlinks++] = link;
    }
    return 0;
}

static int mkdir_p(const char *dir)
{
    if (mkdir(dir, 0700) && errno != EEXIST)
        return -errno;
    return 0;
}

int ftbpf_pin(struct ftbpf *obj, const char *dir)
{
    char path[512];
    int rc;
    if ((rc = mkdir_p(dir)))
        return rc;
    snprintf(path, sizeof(path), "%s/maps", dir);
    if ((rc = mkdir_p(path)))
        return rc;
    snprintf(path, sizeof(path), "%s/links", dir);
    if ((rc = mkdir_p(path)))
        return rc;
    struct bpf_map *map;
    bpf_object__for_each_map(map, obj->skel->obj) {
        if (strstr(bpf_map__name(map), ".bss") || strstr(bpf_map__name(map), ".rodata") ||
            strstr(bpf_map__name(map), ".data"))
            continue;
        snprintf(path, sizeof(path), "%s/maps/%s", dir, bpf_map__name(map));
        if ((rc = bpf_map__pin(map, path)))
            return rc;
    }
    for (size_t i = 0; i < obj->nlinks; i++) {
        snprintf(path, sizeof(path), "%s/links/%s", dir, obj->link_names[i]);
        if ((rc = bpf_link__pin(obj->links[i], path)))
            return rc;
    }
    return 0;
}

static int unlink_all(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return errno == ENOENT ? 0 : -errno;
    struct dirent *e;
    char path[768];
    int first = 0;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        if (unlink(path) && !first)
            first = -errno;
    }
    closedir(d);
    return first;
}

int ftbpf_unpin(struct ftbpf *obj, const char *dir)
{
    char path[512];
    int first = 0;
    if (!obj->skel) {
        /* adopted: the pins are all there is; removing the link pins detaches */
        snprintf(path, sizeof(path), "%s/links", dir);
        first = unlink_all(path);
        rmdir(path);
        snprintf(path, sizeof(path), "%s/maps", dir);
        int rc = unlink_all(path);
        if (rc && !first) first = rc;
        rmdir(path);
        return first;
    }
    struct bpf_map *map;
    bpf_object__for_each_map(map, obj->skel->obj) {
        if (bpf_map__is_pinned(map)) {
            int rc = bpf_map__unpin(map, NULL);
            if (rc && !first) first = rc;
        }
    }
    for (size_t i = 0; i < obj->nlinks; i++) {
        if (bpf_link__pin_path(obj->links[i])) {
            int rc = bpf_link__unpin(obj->links[i]);
            if (rc && !first) first = rc;
        }
    }
    snprintf(path, sizeof(path), "%s/maps", dir);
    rmdir(path);
    snprintf(path, sizeof(path), "%s/links", dir);
    rmdir(path);
    /* The directory itself is the agent's lock: its holder removes it (PinDirectoryLock). */
    return first;
}

void ftbpf_destroy(struct ftbpf *obj)
{
    if (!obj)
        return;
    if (obj->rb)
        ring_buffer__free(obj->rb);
    if (!obj->skel) {
        for (int i = 0; i < FTBPF_MAP_COUNT; i++)
            if (obj->pinned_fds[i] >= 0)
                close(obj->pinned_fds[i]);
        free(obj);
        return;
    }
    detach_all(obj);
    flowtag_bpf__destroy(obj->skel);
    free(obj);
}

int ftbpf_map_fd(struct ftbpf *obj, enum ftbpf_map which)
{
    if (which < 0 || which >= FTBPF_MAP_COUNT)
        return -EINVAL;
    if (!obj->skel)
        return obj->pinned_fds[which];
    struct bpf_map *m = bpf_object__find_map_by_name(obj->skel->obj, map_names[which]);
    if (!m)
        return -ENOENT;
    return bpf_map__fd(m);
}

size_t ftbpf_prog_count(struct ftbpf *obj)
{
    if (!obj->skel)
        return 0;
    size_t n = 0;
    struct bpf_program *prog;
    bpf_object__for_each_program(prog, obj->skel->obj) n++;
    return n;
}

static struct bpf_program *prog_at(struct ftbpf *obj, size_t index)
{
    size_t n = 0;
    struct bpf_program *prog;
    bpf_object__for_each_program(prog, obj->skel->obj) {
        if (n++ == index)
            return prog;
    }
    return NULL;
}

int ftbpf_prog_ids(struct ftbpf *obj, uint32_t *ids, size_t cap)
{
    if (!obj->skel)
        return 0;
    size_t n = 0;
    struct bpf_program *prog;
    bpf_object__for_each_program(prog, obj->skel->obj) {
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

int ftbpf_expected_links(void)
{
    pthread_once(&print_once, install_print);
    struct flowtag_bpf *skel = flowtag_bpf__open();
    if (!skel)
        return -errno;
    int n = 0;
    struct bpf_program *prog;
    bpf_object__for_each_program(prog, skel->obj) {
        enum bpf_prog_type type = bpf_program__type(prog);
        if (type != BPF_PROG_TYPE_SK_MSG && type != BPF_PROG_TYPE_SK_SKB)
            n++;
    }
    flowtag_bpf__destroy(skel);
    return n;
}

uint64_t ftbpf_object_hash(void)
{
    size_t size = 0;
    const unsigned char *bytes = flowtag_bpf__elf_bytes(&size);
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < size; i++) {
        h ^= bytes[i];
        h *= 1099511628211ULL;
    }
    return h;
}

int ftbpf_obj_get(const char *path) { int fd = bpf_obj_get(path); return fd < 0 ? -errno : fd; }
int ftbpf_map_lookup(int fd, const void *key, void *value) { return neg_errno(bpf_map_lookup_elem(fd, key, value)); }
int ftbpf_map_next_key(int fd, const void *key, void *next_key) { return neg_errno(bpf_map_get_next_key(fd, key, next_key)); }
int ftbpf_map_update(int fd, const void *key, const void *value, uint64_t flags) { return neg_errno(bpf_map_update_elem(fd, key, value, flags)); }
int ftbpf_map_delete(int fd, const void *key) { return neg_errno(bpf_map_delete_elem(fd, key)); }
int ftbpf_queue_push(int fd, const void *value) { return neg_errno(bpf_map_update_elem(fd, NULL, value, 0)); }
int ftbpf_queue_pop(int fd, void *value) { return neg_errno(bpf_map_lookup_and_delete_elem(fd, NULL, value)); }

void ftbpf_heap_trim(void) { malloc_trim(0); }

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
    pthread_once(&print_once, install_print);
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

int ftbpf_statfs_type(const char *path, int64_t *type)
{
    struct statfs st;
    if (statfs(path, &st))
        return -errno;
    *type = (int64_t)st.f_type;
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

int ftbpf_pidfd_getfd(int pid, int target)
{
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0)
        return -errno;
    int fd = (int)syscall(SYS_pidfd_getfd, pidfd, target, 0);
    int rc = fd < 0 ? -errno : fd;
    close(pidfd);
    return rc;
}

int ftbpf_tcp_progress(int fd, uint8_t *state, uint64_t *bytes_received)
{
    struct tcp_info info = {0};
    socklen_t len = sizeof(info);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0)
        return -errno;
    *state = info.tcpi_state;
    *bytes_received = info.tcpi_bytes_received;
    return 0;
}

int ftbpf_epoll_create(void)
{
    int fd = epoll_create1(EPOLL_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ftbpf_epoll_ctl(int epfd, int op, int fd, uint32_t events)
{
    struct epoll_event ev = { .events = events, .data.fd = fd };
    return epoll_ctl(epfd, op, fd, &ev) ? -errno : 0;
}

int ftbpf_epoll_wait(int epfd, int *fds, uint32_t *events, int max, int timeout_ms)
{
    struct epoll_event evs[64];
    if (max > 64)
        max = 64;
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    if (n < 0)
        return -errno;
    for (int i = 0; i < n; i++) {
        fds[i] = evs[i].data.fd;
        events[i] = evs[i].events;
    }
    return n;
}

int ftbpf_eventfd(void)
{
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return fd < 0 ? -errno : fd;
}

int ftbpf_gettid(void) { return (int)syscall(SYS_gettid); }

/* Sends one TCP sock_diag request (a dump when `id` is NULL, else the one socket `id`
 * names); returns the netlink socket to read the answer from, or -errno. */
static int diag_request(uint16_t type, int family, uint32_t states, uint8_t ext, const struct inet_diag_sockid *id)
{
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0)
        return -errno;
    struct {
        struct nlmsghdr nlh;
        struct inet_diag_req_v2 req;
    } msg = {0};
    msg.nlh.nlmsg_len = sizeof(msg);
    msg.nlh.nlmsg_type = type;
    msg.nlh.nlmsg_flags = NLM_F_REQUEST | (id ? 0 : NLM_F_DUMP) | (type == SOCK_DESTROY ? NLM_F_ACK : 0);
    msg.req.sdiag_family = (uint8_t)family;
    msg.req.sdiag_protocol = IPPROTO_TCP;
    msg.req.idiag_states = states;
    msg.req.idiag_ext = ext;
    if (id)
        msg.req.id = *id;
    struct sockaddr_nl nl = { .nl_family = AF_NETLINK };
    if (sendto(fd, &msg, sizeof(msg), 0, (struct sockaddr *)&nl, sizeof(nl)) < 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    return fd;
}

static struct inet_diag_sockid exact_sockid(int family, const uint8_t local[16], uint16_t local_port,
                                            const uint8_t remote[16], uint16_t remote_port, uint64_t cookie)
{
    struct inet_diag_sockid id = {0};
    id.idiag_sport = htons(local_port);
    id.idiag_dport = htons(remote_port);
    memcpy(id.idiag_src, local, family == AF_INET ? 4 : 16);
    memcpy(id.idiag_dst, remote, family == AF_INET ? 4 : 16);
    id.idiag_cookie[0] = (uint32_t)cookie;
    id.idiag_cookie[1] = (uint32_t)(cookie >> 32);
    return id;
}

/* One request about one socket, by exact 4-tuple and cookie, and its one reply in buf:
 * the reply's length, or -errno. */
static ssize_t diag_exact(uint16_t type, int family, const uint8_t local[16], uint16_t local_port,
                          const uint8_t remote[16], uint16_t remote_port, uint64_t cookie, char *buf, size_t len)
{
    struct inet_diag_sockid id = exact_sockid(family, local, local_port, remote, remote_port, cookie);
    int fd = diag_request(type, family, ~0u, 0, &id);
    if (fd < 0)
        return fd;
    ssize_t n;
    do { n = recv(fd, buf, len, 0); } while (n < 0 && errno == EINTR);
    if (n < 0)
        n = -errno;
    close(fd);
    return n;
}

int ftbpf_tcp_inode(int family, const uint8_t local[16], uint16_t local_port, const uint8_t remote[16],
                    uint16_t remote_port, uint64_t cookie, uint32_t *inode)
{
    char buf[4096];
    ssize_t n = diag_exact(SOCK_DIAG_BY_FAMILY, family, local, local_port, remote, remote_port, cookie, buf, sizeof(buf));
    if (n < 0)
        return (int)n;
    for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
        if (h->nlmsg_type == NLMSG_ERROR) {
            struct nlmsgerr *e = NLMSG_DATA(h);
            return e->error < 0 ? e->error : -EIO;
        }
        if (h->nlmsg_type == SOCK_DIAG_BY_FAMILY) {
            *inode = ((struct inet_diag_msg *)NLMSG_DATA(h))->idiag_inode;
            return 0;
        }
    }
    return -EIO;
}

int ftbpf_tcp_destroy(int family, const uint8_t local[16], uint16_t local_port, const uint8_t remote[16],
                      uint16_t remote_port, uint64_t cookie)
{
    char buf[1024];
    ssize_t n = diag_exact(SOCK_DESTROY, family, local, local_port, remote, remote_port, cookie, buf, sizeof(buf));
    if (n < 0)
        return (int)n;
    struct nlmsghdr *h = (struct nlmsghdr *)buf;
    if (NLMSG_OK(h, (size_t)n) && h->nlmsg_type == NLMSG_ERROR)
        return ((struct nlmsgerr *)NLMSG_DATA(h))->error; /* 0: acknowledged */
    return -EIO;
}

int ftbpf_tcp_dump(int family, uint32_t states, ftbpf_diag_fn fn, void *ctx)
{
    int fd = diag_request(SOCK_DIAG_BY_FAMILY, family, states, 1 << (INET_DIAG_INFO - 1), NULL);
    if (fd < 0)
        return fd;
    static __thread char buf[1 << 16];
    int count = 0, rc = 0;
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            break;
        }
        if (n == 0)
            break;
        int done = 0;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_type == NLMSG_DONE) { done = 1; break; }
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *e = NLMSG_DATA(h);
                rc = e->error < 0 ? e->error : -EIO;
                done = 1;
                break;
            }
            struct inet_diag_msg *m = NLMSG_DATA(h);
            struct ftbpf_diag_sock s = {0};
            s.family = m->idiag_family;
            s.state = m->idiag_state;
            s.local_port = ntohs(m->id.idiag_sport);
            s.remote_port = ntohs(m->id.idiag_dport);
            s.uid = m->idiag_uid;
            s.inode = m->idiag_inode;
            memcpy(s.local, m->id.idiag_src, 16);
            memcpy(s.remote, m->id.idiag_dst, 16);
            s.cookie = ((uint64_t)m->id.idiag_cookie[1] << 32) | m->id.idiag_cookie[0];
            int len = h->nlmsg_len - NLMSG_LENGTH(sizeof(*m));
            for (struct rtattr *a = (struct rtattr *)(m + 1); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
                if (a->rta_type == INET_DIAG_INFO) {
                    struct tcp_info info = {0};
                    size_t l = RTA_PAYLOAD(a) < sizeof(info) ? RTA_PAYLOAD(a) : sizeof(info);
                    memcpy(&info, RTA_DATA(a), l);
                    /* Payload only: what was sent less retransmissions (bytes_acked also
                     * counts the SYN), and what arrived less a received FIN. */
                    s.bytes_acked = info.tcpi_bytes_sent - info.tcpi_bytes_retrans;
                    s.bytes_received = info.tcpi_bytes_received;
                    int fin_in = s.state == 8 || s.state == 9 || s.state == 11 || s.state == 6;
                    if (fin_in && s.bytes_received)
                        s.bytes_received -= 1;
                }
            }
            count++;
            if (fn && fn(ctx, &s))
                done = 1;
        }
        if (done)
            break;
    }
    close(fd);
    return rc < 0 ? rc : count;
}
