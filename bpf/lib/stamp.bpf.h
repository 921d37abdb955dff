/* The acting process's identity, written into a stamp (process context only). */
#ifndef FT_LIB_STAMP_BPF_H
#define FT_LIB_STAMP_BPF_H

static __always_inline void stamp_current(struct ft_stamp *s, __u8 hook)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u64 uid_gid = bpf_get_current_uid_gid();
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();

    s->tgid = pid_tgid >> 32;
    s->tid = (__u32)pid_tgid;
    s->uid = (__u32)uid_gid;
    s->gid = uid_gid >> 32;
    s->cgroup_id = bpf_get_current_cgroup_id();
    s->proc_start_ns = BPF_CORE_READ(task, group_leader, start_boottime);
    s->stamped_ns = bpf_ktime_get_boot_ns();
    bpf_get_current_comm(s->comm, sizeof(s->comm));
    s->attribution = FT_ATTR_KERNEL;
    s->hook = hook;
}

#endif
