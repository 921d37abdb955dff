// SPDX-License-Identifier: GPL-2.0
/* flowtag kernel programs: stamp every socket with its owner in process context and
 * report each flow's open and close.
 *
 * Hooks used (no kprobes, no fentry/fexit, no BPF LSM on the kernels we target):
 *   process table  tp_btf/sched_process_exec|fork|exit
 *   stamps         cgroup/sock_create, cgroup/connect4|6, cgroup/sendmsg4|6,
 *                  cgroup/recvmsg4|6, tp_btf/sock_send_length|sock_recv_length
 *   accept         cgroup/getpeername4|6 (accept/accept4 asking for the peer's address),
 *                  else the accepted socket's first send or receive
 *   TCP lifecycle  sockops (active/passive established, state -> TCP_CLOSE)
 *   relayed flows  the hand-over to the agent at establishment, getpeername's original
 *                  destination (the redirect itself is the relay object's: relay/)
 *   UDP lifecycle  sock_send_length/sock_recv_length (open, counters),
 *                  cgroup/sock_release (close); idle expiry is done by the agent.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "flowtag_abi.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define TCP_CLOSE 7

/* By hook family (as Tetragon's bpf/): one object, headers per concern. */
#include "lib/maps.bpf.h"
#include "lib/events.bpf.h"
#include "lib/stamp.bpf.h"
#include "tagging/stamps.bpf.h"
#include "tagging/relayed.bpf.h"
#include "tagging/tcp_flows.bpf.h"
#include "tagging/io.bpf.h"
#include "tagging/processes.bpf.h"
