/* What the shim's files share: the handle's layout and the map names. Not for Swift. */
#ifndef FLOWTAG_SHIM_INTERNAL_H
#define FLOWTAG_SHIM_INTERNAL_H

#include <bpf/libbpf.h>
#include "flowtag_shim.h"

#define FTBPF_MAX_LINKS 32

static const char *const ftbpf_map_names[FTBPF_MAP_COUNT] = {
#define FTBPF_MAP_NAME(id, name) [FTBPF_MAP_##id] = #name,
    FTBPF_MAPS(FTBPF_MAP_NAME)
#undef FTBPF_MAP_NAME
};

struct flowtag_bpf;

struct ftbpf {
    struct flowtag_bpf *skel; /* NULL when adopted from pins */
    struct bpf_object *bobj;  /* skel's object (NULL when adopted) */
    int pinned_fds[FTBPF_MAP_COUNT];
    struct bpf_link *links[FTBPF_MAX_LINKS];
    char link_names[FTBPF_MAX_LINKS][64];
    size_t nlinks;
    struct ring_buffer *rb;
};

/* libbpf's print hook, installed once; the last error in libbpf's own words. */
void ftbpf_install_print(void);
void ftbpf_set_err(char *err, size_t err_len, const char *what, int rc);
/* Whether a program type attaches to a cgroup. */
int ftbpf_is_cgroup_prog(enum bpf_prog_type type);

#endif
