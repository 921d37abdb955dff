#include "flowtag_shim.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>

#include "shim_internal.h"
#include "generated/relay.skel.h"

#define FTRELAY_MAX_LINKS 8

struct ftrelay {
    struct relay_bpf *skel;
    struct bpf_link *links[FTRELAY_MAX_LINKS];
    size_t nlinks;
    struct ring_buffer *rb;
};

static const char *const ftrelay_map_names[FTRELAY_MAP_COUNT] = {
#define FTRELAY_MAP_NAME(id, name) [FTRELAY_MAP_##id] = #name,
    FTRELAY_MAPS(FTRELAY_MAP_NAME)
#undef FTRELAY_MAP_NAME
};

int ftrelay_open_load(int procs_fd, int origs_fd, int marks_fd, int inbound_fd, int fast_path, struct ftrelay **out,
                      char *err, size_t err_len)
{
    ftbpf_install_print();
    *out = NULL;
    struct ftrelay *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->skel = relay_bpf__open();
    if (!r->skel) {
        int rc = -errno;
        ftbpf_set_err(err, err_len, "open the relay's BPF object", rc);
        free(r);
        return rc;
    }
    int rc = bpf_map__reuse_fd(r->skel->maps.ft_procs, procs_fd);
    if (!rc)
        rc = bpf_map__reuse_fd(r->skel->maps.ft_relay_origs, origs_fd);
    if (!rc)
        rc = bpf_map__reuse_fd(r->skel->maps.ft_relay_marks, marks_fd);
    if (!rc)
        rc = bpf_map__reuse_fd(r->skel->maps.ft_relay_inbound, inbound_fd);
    if (rc) {
        ftbpf_set_err(err, err_len, "share the flowtag object's maps with the relay", rc);
        relay_bpf__destroy(r->skel);
        free(r);
        return rc;
    }
    /* The hand-over map is written by the flowtag object only: not created here. */
    bpf_map__set_autocreate(r->skel->maps.ft_relay_pending, false);
    bpf_program__set_autoload(r->skel->progs.ft_relay_verdict, fast_path != 0);
    if ((rc = relay_bpf__load(r->skel))) {
        ftbpf_set_err(err, err_len, fast_path ? "load the relay's BPF programs (with the sockmap fast path: "
                                                "needs sk_skb verdicts and the bpf_cast_to_kern_ctx and bpf_rdonly_cast kfuncs)"
                                              : "load the relay's BPF programs", rc);
        relay_bpf__destroy(r->skel);
        free(r);
        return rc;
    }
    *out = r;
    return 0;
}

static void detach(struct ftrelay *r)
{
    for (size_t i = 0; i < r->nlinks; i++)
        bpf_link__destroy(r->links[i]);
    r->nlinks = 0;
}

int ftrelay_attach(struct ftrelay *r, int cgroup_fd, char *err, size_t err_len)
{
    struct bpf_program *prog;
    bpf_object__for_each_program(prog, r->skel->obj) {
        if (bpf_program__type(prog) != BPF_PROG_TYPE_CGROUP_SOCK_ADDR)
            continue; /* sk_lookup is attached per netns */
        struct bpf_link *link = r->nlinks < FTRELAY_MAX_LINKS ? bpf_program__attach_cgroup(prog, cgroup_fd) : NULL;
        if (!link) {
            int rc = r->nlinks < FTRELAY_MAX_LINKS ? -errno : -E2BIG;
            char what[128];
            snprintf(what, sizeof(what), "attach relay program %s (%s)", bpf_program__name(prog),
                     bpf_program__section_name(prog));
            ftbpf_set_err(err, err_len, what, rc);
            detach(r);
            return rc;
        }
        r->links[r->nlinks++] = link;
    }
    return 0;
}

int ftrelay_attach_inbound(struct ftrelay *r, int netns_fd, char *err, size_t err_len)
{
    if (r->nlinks >= FTRELAY_MAX_LINKS) {
        ftbpf_set_err(err, err_len, "attach the inbound sk_lookup program", -E2BIG);
        return -E2BIG;
    }
    struct bpf_link *link = bpf_program__attach_netns(r->skel->progs.ft_relay_lookup, netns_fd);
    if (!link) {
        int rc = -errno;
        ftbpf_set_err(err, err_len, "attach the inbound sk_lookup program to the network namespace", rc);
        return rc;
    }
    r->links[r->nlinks++] = link;
    return 0;
}

int ftrelay_attach_splice(struct ftrelay *r, char *err, size_t err_len)
{
    int prog = bpf_program__fd(r->skel->progs.ft_relay_verdict);
    if (prog < 0) {
        ftbpf_set_err(err, err_len, "attach the fast path's verdict (not loaded)", -EINVAL);
        return -EINVAL;
    }
    int rc = bpf_prog_attach(prog, bpf_map__fd(r->skel->maps.ft_relay_splice),
                             BPF_SK_SKB_STREAM_VERDICT, 0);
    if (rc) {
        rc = -errno;
        ftbpf_set_err(err, err_len, "attach the fast path's sk_skb verdict to its sockhash", rc);
    }
    return rc;
}

int ftrelay_open_inbound(struct ftrelay *main, int netns_fd, uint64_t netns_cookie, int v4_fd, int v6_fd,
                         struct ftrelay **out, char *err, size_t err_len)
{
    *out = NULL;
    struct ftrelay *r = calloc(1, sizeof(*r));
    if (!r) {
        ftbpf_set_err(err, err_len, "allocate a network namespace's inbound program", -ENOMEM);
        return -ENOMEM;
    }
    int rc = 0;
    r->skel = relay_bpf__open();
    if (!r->skel) {
        rc = -errno;
        ftbpf_set_err(err, err_len, "open the relay's BPF object for a network namespace", rc);
        free(r);
        return rc;
    }
    struct bpf_map *m;
    bpf_object__for_each_map(m, r->skel->obj) {
        const char *name = bpf_map__name(m);
        if (!strcmp(name, "ft_relay_home") || !strcmp(name, "ft_relay_inbound_listener") || bpf_map__is_internal(m))
            continue;
        struct bpf_map *shared = bpf_object__find_map_by_name(main->skel->obj, name);
        int fd = shared ? bpf_map__fd(shared) : -1;
        rc = fd >= 0 ? bpf_map__reuse_fd(m, fd) : bpf_map__set_autocreate(m, false);
        if (rc) {
            ftbpf_set_err(err, err_len, "share the relay's maps with a network namespace's inbound program", rc);
            goto fail;
        }
    }
    struct bpf_program *prog;
    bpf_object__for_each_program(prog, r->skel->obj)
        bpf_program__set_autoload(prog, prog == r->skel->progs.ft_relay_lookup);
    if ((rc = relay_bpf__load(r->skel))) {
        ftbpf_set_err(err, err_len, "load a network namespace's inbound program", rc);
        goto fail;
    }
    __u32 zero = 0, one = 1;
    __u64 fd4 = (__u64)v4_fd, fd6 = (__u64)v6_fd;
    if (bpf_map_update_elem(bpf_map__fd(r->skel->maps.ft_relay_home), &zero, &netns_cookie, 0) ||
        bpf_map_update_elem(bpf_map__fd(r->skel->maps.ft_relay_inbound_listener), &zero, &fd4, 0) ||
        (v6_fd >= 0 && bpf_map_update_elem(bpf_map__fd(r->skel->maps.ft_relay_inbound_listener), &one, &fd6, 0))) {
        rc = -errno;
        ftbpf_set_err(err, err_len, "publish a network namespace's inbound listeners", rc);
        goto fail;
    }
    if ((rc = ftrelay_attach_inbound(r, netns_fd, err, err_len)))
        goto fail;
    *out = r;
    return 0;
fail:
    ftrelay_destroy(r);
    return rc;
}

void ftrelay_destroy(struct ftrelay *r)
{
    if (!r)
        return;
    if (r->rb)
        ring_buffer__free(r->rb);
    detach(r);
    relay_bpf__destroy(r->skel);
    free(r);
}

int ftrelay_map_fd(struct ftrelay *r, enum ftrelay_map map)
{
    if ((int)map < 0 || map >= FTRELAY_MAP_COUNT)
        return -EINVAL;
    struct bpf_map *m = bpf_object__find_map_by_name(r->skel->obj, ftrelay_map_names[map]);
    return m ? bpf_map__fd(m) : -ENOENT;
}

int ftrelay_requests_open(struct ftrelay *r, ftbpf_event_fn fn, void *ctx)
{
    if (r->rb)
        return -EALREADY;
    r->rb = ring_buffer__new(bpf_map__fd(r->skel->maps.ft_relay_requests), (ring_buffer_sample_fn)fn, ctx, NULL);
    return r->rb ? 0 : -errno;
}

int ftrelay_requests_fd(struct ftrelay *r) { return r->rb ? ring_buffer__epoll_fd(r->rb) : -EBADF; }

int ftrelay_requests_consume(struct ftrelay *r) { return r->rb ? ring_buffer__consume(r->rb) : -EBADF; }
