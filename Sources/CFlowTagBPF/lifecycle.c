#include "flowtag_shim.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <pthread.h>
#include <dirent.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>


#include "shim_internal.h"
#include "generated/flowtag.skel.h"

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
void ftbpf_install_print(void) { pthread_once(&print_once, install_print); }

void ftbpf_set_err(char *err, size_t err_len, const char *what, int rc)
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
    ftbpf_install_print();
    *out = NULL;
    struct ftbpf *obj = calloc(1, sizeof(*obj));
    if (!obj)
        return -ENOMEM;
    for (int i = 0; i < FTBPF_MAP_COUNT; i++)
        obj->pinned_fds[i] = -1;
    for (int i = 0; i < FTBPF_MAP_COUNT; i++) {
        char path[512];
        snprintf(path, sizeof(path), "%s/maps/%s", dir, ftbpf_map_names[i]);
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
    ftbpf_install_print();
    last_log_len = 0;
    last_log[0] = 0;
    *out = NULL;
    struct ftbpf *obj = calloc(1, sizeof(*obj));
    if (!obj)
        return -ENOMEM;
    obj->skel = flowtag_bpf__open();
    if (!obj->skel) {
        int rc = -errno;
        ftbpf_set_err(err, err_len, "open BPF object", rc);
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
        ftbpf_set_err(err, err_len, "load BPF programs", rc);
        flowtag_bpf__destroy(obj->skel);
        free(obj);
        return rc;
    }
    obj->bobj = obj->skel->obj;
    *out = obj;
    return 0;
}

int ftbpf_is_cgroup_prog(enum bpf_prog_type type)
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
        if (ftbpf_is_cgroup_prog(type))
            link = bpf_program__attach_cgroup(prog, cgroup_fd);
        else
            link = bpf_program__attach(prog);
        if (!link) {
            int rc = -errno;
            char what[128];
            snprintf(what, sizeof(what), "attach program %s (%s)", bpf_program__name(prog),
                     bpf_program__section_name(prog));
            ftbpf_set_err(err, err_len, what, rc);
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

int ftbpf_expected_links(void)
{
    ftbpf_install_print();
    struct flowtag_bpf *skel = flowtag_bpf__open();
    if (!skel)
        return -errno;
    int n = 0;
    struct bpf_program *prog;
    bpf_object__for_each_program(prog, skel->obj)
        n++;
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
