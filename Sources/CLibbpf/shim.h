/* libbpf as a system library: only linked; CFlowTagBPF is the one user of its API. */
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
