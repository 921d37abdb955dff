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

/* Moves the calling thread into the network namespace `fd` refers to (setns). 0 or -errno. */
int lc_setns_net(int fd);
/* accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC: the new socket, or -errno. */
int lc_accept_nonblock(int listener);

/* Bytes ever put into a TCP socket's send queue: acknowledged (TCP_INFO) plus still
 * queued (SIOCOUTQ). An ACK between the two readings moves bytes from one to the other:
 * with exact == 0 they are read so that it can only under-count; with exact != 0 the
 * acknowledged count is read before and after the queue and the reading repeats until
 * they agree (exact while nothing is written meanwhile; -EAGAIN if ACKs never pause).
 * 0 or -errno. */
int lc_tcp_bytes_queued(int fd, int exact, uint64_t *out);
/* Bytes (and FIN) in a TCP socket's send queue not yet acknowledged (SIOCOUTQ), or -errno. */
int lc_tcp_outq(int fd);
/* The TCP state of a socket (TCP_ESTABLISHED is 1), or -errno. */
int lc_tcp_state(int fd);

/* Returns freed heap memory to the kernel (malloc_trim). */
void lc_heap_trim(void);

/* statfs(2) f_type of a path (bpffs and cgroup2 checks). */
int lc_statfs_type(const char *path, int64_t *type);

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

#ifdef __cplusplus
}
#endif
#endif
