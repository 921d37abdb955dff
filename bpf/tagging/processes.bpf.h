/* The process table: exec, fork, exit, and the executable's path. */
#ifndef FT_TAGGING_PROCESSES_BPF_H
#define FT_TAGGING_PROCESSES_BPF_H

/* ---------------------------------------------------------------- processes */

/* Resolve a file's path the way readlink(/proc/PID/exe) shows it: walk dentries up to
 * the mount root, cross to the parent mount, stop at the namespace root. The walk runs
 * under bpf_loop so the verifier checks one step, not every unrolled path. */
#define FT_MAX_COMPONENTS 64
struct path_walk {
    struct dentry *d;
    struct mount *mnt;
    struct ft_scratch *sc;
    __u32 off; /* start of the text written so far; writing goes backwards */
    __u32 truncated;
};

/* Mask an index so the verifier sees the bound (the compiler would drop a plain mask). */
static __always_inline __u32 bounded(__u32 idx)
{
    asm volatile("%[i] &= %[m]" : [i] "+r"(idx) : [m] "i"(FT_PATH_MAX - 1));
    return idx;
}

static long path_step(__u32 i, void *arg)
{
    struct path_walk *w = arg;
    struct dentry *d = w->d;
    struct mount *mnt = w->mnt;
    struct dentry *mnt_root = BPF_CORE_READ(mnt, mnt.mnt_root);
    struct dentry *parent = BPF_CORE_READ(d, d_parent);
    if (d == mnt_root || d == parent) {
        if (d != mnt_root)
            return 1;
        struct mount *up = BPF_CORE_READ(mnt, mnt_parent);
        if (up == mnt)
            return 1; /* namespace root */
        w->d = BPF_CORE_READ(mnt, mnt_mountpoint);
        w->mnt = up;
        return 0;
    }
    __u32 len = BPF_CORE_READ(d, d_name.len);
    const unsigned char *name = BPF_CORE_READ(d, d_name.name);
    __u32 off = w->off;
    if (len == 0 || len > 255)
        return 1;
    if (len + 1 > off || off > FT_PATH_MAX - 1) {
        w->truncated = 1;
        return 1;
    }
    off -= len;
    bpf_probe_read_kernel(&w->sc->buf[bounded(off)], len & 255, name);
    off -= 1;
    w->sc->buf[bounded(off)] = '/';
    w->off = off;
    w->d = parent;
    return 0;
}

static __always_inline void resolve_path(struct file *file, struct ft_proc *p)
{
    __u32 zero = 0;
    struct ft_scratch *sc = bpf_map_lookup_elem(&ft_scratch_map, &zero);
    if (!sc)
        return;
    struct path_walk w = {};
    struct vfsmount *vmnt = BPF_CORE_READ(file, f_path.mnt);
    w.d = BPF_CORE_READ(file, f_path.dentry);
    w.mnt = container_of(vmnt, struct mount, mnt);
    w.sc = sc;
    w.off = FT_PATH_MAX - 1; /* buf[FT_PATH_MAX-1] is the terminating NUL */
    sc->buf[FT_PATH_MAX - 1] = 0;
    bpf_loop(FT_MAX_COMPONENTS, path_step, &w, 0);
    if (w.truncated)
        p->flags |= FT_PROC_PATH_TRUNCATED;
    __u32 off = w.off;
    if (off >= FT_PATH_MAX - 1) {
        p->exe[0] = '/';
        p->exe[1] = 0;
        return;
    }
    __u32 n = FT_PATH_MAX - off; /* includes the NUL */
    bpf_probe_read_kernel(p->exe, bounded(n), &sc->buf[bounded(off)]);
}

static __always_inline struct ft_proc *proc_slot(__u32 tgid)
{
    struct ft_proc *p = bpf_map_lookup_elem(&ft_procs, &tgid);
    if (p)
        return p;
    __u32 zero = 0;
    struct ft_scratch *sc = bpf_map_lookup_elem(&ft_scratch_map, &zero);
    if (!sc)
        return 0;
    /* A zeroed value from scratch space: ft_proc is too large for the stack. */
    __builtin_memset(sc->buf, 0, sizeof(struct ft_proc));
    bpf_map_update_elem(&ft_procs, &tgid, sc->buf, BPF_ANY);
    return bpf_map_lookup_elem(&ft_procs, &tgid);
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(ft_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
    __u32 tgid = task->tgid;
    struct ft_proc *p = proc_slot(tgid);
    if (!p)
        return 0;
    __u64 uid_gid = bpf_get_current_uid_gid();
    p->tgid = tgid;
    p->ppid = BPF_CORE_READ(task, real_parent, tgid);
    p->uid = (__u32)uid_gid;
    p->gid = uid_gid >> 32;
    p->start_ns = BPF_CORE_READ(task, group_leader, start_boottime);
    p->exit_ns = 0;
    p->flags = 0;
    bpf_get_current_comm(p->comm, sizeof(p->comm));
    struct file *file = BPF_CORE_READ(bprm, file);
    p->exe_ino = BPF_CORE_READ(file, f_inode, i_ino);
    p->exe_dev = BPF_CORE_READ(file, f_inode, i_sb, s_dev);
    resolve_path(file, p);
    count(FT_CNT_EXECS);
    return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(ft_fork, struct task_struct *parent, struct task_struct *child)
{
    __u32 child_tgid = child->tgid;
    if (child->pid != child_tgid)
        return 0; /* a new thread, not a new process */
    __u32 parent_tgid = parent->tgid;
    struct ft_proc *pp = bpf_map_lookup_elem(&ft_procs, &parent_tgid);
    if (!pp)
        return 0; /* unknown parent: the agent resolves the child from /proc */
    if (bpf_map_update_elem(&ft_procs, &child_tgid, pp, BPF_ANY))
        return 0;
    struct ft_proc *c = bpf_map_lookup_elem(&ft_procs, &child_tgid);
    if (!c)
        return 0;
    c->tgid = child_tgid;
    c->ppid = parent_tgid;
    c->start_ns = child->start_boottime;
    c->exit_ns = 0;
    c->flags &= ~FT_PROC_EXITED;
    return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(ft_exit, struct task_struct *task)
{
    if (task->pid != task->tgid)
        return 0;
    __u32 tgid = task->tgid;
    struct ft_proc *p = bpf_map_lookup_elem(&ft_procs, &tgid);
    if (p) {
        /* Kept (LRU) so flows that outlive the process keep their owner. */
        p->flags |= FT_PROC_EXITED;
        p->exit_ns = bpf_ktime_get_boot_ns();
    }
    return 0;
}

#endif
