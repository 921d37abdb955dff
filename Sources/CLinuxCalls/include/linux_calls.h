/* Linux system calls Swift's Glibc module cannot make directly (packed structs, missing
 * declarations), a few non-inline functions prefixed lc_, returning 0 or a negative errno.
 * No libbpf here: the BPF lifecycle is CFlowTagBPF's. */
#ifndef LINUX_CALLS_H
#define LINUX_CALLS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* epoll without epoll_event's packed layout. */
enum lc_epoll_op { LC_EPOLL_ADD = 1, LC_EPOLL_DEL = 2, LC_EPOLL_MOD = 3 };
int lc_epoll_create(void);
int lc_epoll_ctl(int epfd, enum lc_epoll_op op, int fd, uint32_t events);
/* Waits up to timeout_ms; fills fds/events (at most max, at most 64); the count or -errno. */
int lc_epoll_wait(int epfd, int *fds, uint32_t *events, int max, int timeout_ms);

/* A non-blocking eventfd, or -errno. */
int lc_eventfd(void);
int lc_gettid(void);

/* Returns freed heap memory to the kernel (malloc_trim). */
void lc_heap_trim(void);

/* statfs(2) f_type of a path (bpffs and cgroup2 checks). */
int lc_statfs_type(const char *path, int64_t *type);

/* A duplicate of fd `target` of process `pid` (pidfd_open + pidfd_getfd), or -errno. */
int lc_pidfd_getfd(int pid, int target);

/* A TCP socket's state and the payload bytes it has received (TCP_INFO), or -errno. */
int lc_tcp_progress(int fd, uint8_t *state, uint64_t *bytes_received);

/* One TCP socket from sock_diag (NETLINK_SOCK_DIAG, INET_DIAG_INFO). */
struct lc_diag_sock {
    uint8_t family;     /* AF_INET or AF_INET6 */
    uint8_t state;      /* TCP state */
    uint16_t local_port; /* host order */
    uint16_t remote_port;
    uint16_t pad;
    uint32_t uid;
    uint32_t inode;
    uint8_t local[16];  /* network order; IPv4 in the first 4 bytes */
    uint8_t remote[16];
    uint64_t cookie;
    uint64_t bytes_acked;    /* payload bytes sent (bytes_sent - bytes_retrans) */
    uint64_t bytes_received; /* payload bytes received */
};
typedef int (*lc_diag_fn)(void *ctx, const struct lc_diag_sock *sock);
/* Dumps the TCP sockets of one family in this network namespace, in the given states
 * (bit per TCP state). Returns the count, or -errno. */
int lc_tcp_dump(int family, uint32_t states, lc_diag_fn fn, void *ctx);

/* The inode of one TCP socket of this network namespace, by its exact 4-tuple and
 * cookie (addresses in network order, IPv4 in the first 4 bytes). 0, or -errno
 * (-ENOENT: no such socket in this namespace). */
int lc_tcp_inode(int family, const uint8_t local[16], uint16_t local_port, const uint8_t remote[16],
                 uint16_t remote_port, uint64_t cookie, uint32_t *inode);
/* Aborts one TCP socket of this network namespace, found the same way (SOCK_DESTROY,
 * as `ss -K`: RST to the peer, ECONNABORTED to the process). 0, or -errno (-ENOENT:
 * no such socket; -EOPNOTSUPP: a kernel without CONFIG_INET_DIAG_DESTROY). */
int lc_tcp_destroy(int family, const uint8_t local[16], uint16_t local_port, const uint8_t remote[16],
                   uint16_t remote_port, uint64_t cookie);

#ifdef __cplusplus
}
#endif
#endif
