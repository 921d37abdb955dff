#define _GNU_SOURCE /* setns, accept4 */
#include "linux_calls.h"

#include <errno.h>
#include <sched.h>
#include <malloc.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/inet_diag.h>
#include <linux/tcp.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>

void lc_heap_trim(void) { malloc_trim(0); }

int lc_setns_net(int fd) { return setns(fd, CLONE_NEWNET) ? -errno : 0; }

int lc_accept_nonblock(int listener)
{
    int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    return fd < 0 ? -errno : fd;
}
static int tcp_bytes_acked(int fd, uint64_t *acked)
{
    struct tcp_info info;
    socklen_t len = sizeof(info);
    memset(&info, 0, sizeof(info));
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len))
        return -errno;
    if (len < offsetof(struct tcp_info, tcpi_bytes_acked) + sizeof(info.tcpi_bytes_acked))
        return -ENOTSUP;
    *acked = info.tcpi_bytes_acked;
    return 0;
}
int lc_tcp_bytes_queued(int fd, int exact, uint64_t *out)
{
    for (int attempt = 0; attempt < 1000; attempt++) {
        uint64_t acked = 0, acked_after = 0;
        int queued = 0, rc;
        if ((rc = tcp_bytes_acked(fd, &acked)))
            return rc;
        if (ioctl(fd, SIOCOUTQ, &queued))
            return -errno;
        /* bytes_acked only grows: equal readings mean no ACK came between them. */
        if (exact && (rc = tcp_bytes_acked(fd, &acked_after)))
            return rc;
        if (exact && acked_after != acked)
            continue;
        *out = acked + (uint64_t)(queued > 0 ? queued : 0);
        return 0;
    }
    return -EAGAIN;
}
int lc_tcp_outq(int fd)
{
    int queued = 0;
    return ioctl(fd, SIOCOUTQ, &queued) ? -errno : queued;
}
int lc_tcp_state(int fd)
{
    struct tcp_info info;
    socklen_t len = sizeof(info);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len))
        return -errno;
    return info.tcpi_state;
}
int lc_statfs_type(const char *path, int64_t *type)
{
    struct statfs st;
    if (statfs(path, &st))
        return -errno;
    *type = (int64_t)st.f_type;
    return 0;
}

int lc_epoll_create(void)
{
    int fd = epoll_create1(EPOLL_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int lc_epoll_ctl(int epfd, enum lc_epoll_op op, int fd, uint32_t events)
{
    struct epoll_event ev = { .events = events, .data.fd = fd };
    return epoll_ctl(epfd, (int)op, fd, &ev) ? -errno : 0;
}

int lc_epoll_wait(int epfd, int *fds, uint32_t *events, int max, int timeout_ms)
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

int lc_eventfd(void)
{
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return fd < 0 ? -errno : fd;
}

int lc_gettid(void) { return (int)syscall(SYS_gettid); }

/* Sends one TCP sock_diag dump request; returns the netlink socket to read the answer
 * from, or -errno. */
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

int lc_tcp_dump(int family, uint32_t states, lc_diag_fn fn, void *ctx)
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
            struct lc_diag_sock s = {0};
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
