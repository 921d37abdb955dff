#!/usr/bin/python3
"""What flowtag's benchmarks share (see BENCHMARKS.md): cgroups, the agent, traffic,
program statistics, results.

Each benchmark runs the real flowtagd attached to a private cgroup v2 it creates, drives
real traffic over loopback, compares with a baseline measured in the same run
(interleaved A B A B, medians), prints a table and writes JSON to .bench/.
Everything is bounded in count and time and cleaned up, also on failure.
"""
import json, os, shutil, signal, socket, sqlite3, statistics, subprocess, sys, tempfile, threading, time, urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOWTAGD = os.path.join(REPO, ".build", os.environ.get("CONFIG", "release"), "flowtagd")
PEER = os.path.join(REPO, "Tests", "Peers", "peer.py")
OUT = os.path.join(REPO, ".bench")
PY = "/usr/bin/python3"
RUN = f"flowtag-bench-{os.getpid()}"


def cgroup_root():
    for line in open("/proc/mounts"):
        f = line.split()
        if f[2] == "cgroup2":
            return f[1]
    sys.exit("no cgroup2 mount")


class Cgroup:
    def __init__(self, name):
        self.path = os.path.join(cgroup_root(), f"{RUN}-{name}")
        os.mkdir(self.path)

    def wrap(self, argv):
        return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', self.path] + argv

    def enter(self):
        """Moves this process in; returns a function that moves it back."""
        with open(f"/proc/self/cgroup") as f:
            old = [l.strip()[3:] for l in f if l.startswith("0::")][0]
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        def leave():
            with open(os.path.join(cgroup_root() + old, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        return leave

    def remove(self):
        try:
            with open(os.path.join(self.path, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:
            pass
        for _ in range(100):
            try:
                os.rmdir(self.path); return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


class Agent:
    """flowtagd attached to a cgroup; its event lines (`--output`, JSON unless told) go to a file."""
    def __init__(self, cgroup, tag, extra=(), output="json"):
        self.pins = f"/sys/fs/bpf/{RUN}-{tag}"
        self.out = f"/tmp/{RUN}-{tag}.jsonl"
        self.err = open(f"/tmp/{RUN}-{tag}.err", "w")
        self.proc = subprocess.Popen([FLOWTAGD, "--cgroup", cgroup.path, "--output", output, "--pin-dir", self.pins,
                                      "--socket", f"/tmp/{RUN}-{tag}.sock", "--metrics-address", "127.0.0.1:0",
                                      "--journal", os.environ.get("FLOWTAG_BENCH_JOURNAL", f"/tmp/{RUN}-{tag}.db")] + list(extra),
                                     stdout=open(self.out, "w"), stderr=self.err)
        for _ in range(500):
            if os.path.exists(self.pins + "/links"): break
            if self.proc.poll() is not None:
                raise RuntimeError("flowtagd failed: " + open(self.err.name).read())
            time.sleep(0.01)
        time.sleep(0.3)  # the process table is seeded right after pinning

    def cpu_seconds(self):
        f = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def prog_ids(self):
        ids = []
        links = os.path.join(self.pins, "links")
        for name in os.listdir(links):
            info = json.loads(subprocess.check_output(["bpftool", "link", "show", "pinned", os.path.join(links, name), "--json"]))
            ids.append(info["prog_id"])
        return ids

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill(); self.proc.wait()
        subprocess.call(["rm", "-rf", self.pins])

    @property
    def journal(self):
        return self.proc.args[self.proc.args.index("--journal") + 1]

    def metric(self, name):
        """One sample of the agent's Prometheus text, by its full name with labels."""
        err = open(self.err.name).read()
        url = [w for w in err.split() if w.startswith("http://") and w.endswith("/metrics")][0]
        with urllib.request.urlopen(url, timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[-1])
        return None

    def events(self):
        out = []
        for line in open(self.out):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def cleanup(self):
        self.stop()
        db = self.journal
        for p in (self.out, self.err.name) + ((db, db + "-wal", db + "-shm") if db else ()):
            try: os.unlink(p)
            except OSError: pass


def prog_stats(ids):
    stats = {}
    for pid in ids:
        info = json.loads(subprocess.check_output(["bpftool", "prog", "show", "id", str(pid), "--json"]))
        stats[info["name"]] = (info.get("run_time_ns", 0), info.get("run_cnt", 0))
    return stats


def listener():
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", 0)); l.listen(4096)
    stop = threading.Event()
    def loop():
        l.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = l.accept(); c.close()
            except socket.timeout:
                pass
            except OSError:
                return
    t = threading.Thread(target=loop, daemon=True); t.start()
    return l, stop


def connect_loop(port, n):
    t0 = time.perf_counter_ns()
    for _ in range(n):
        s = socket.socket()
        s.connect(("127.0.0.1", port))
        s.close()
    return (time.perf_counter_ns() - t0) / n


def save(name, result):
    os.makedirs(OUT, exist_ok=True)
    result["kernel"] = os.uname().release
    result["cpus"] = os.cpu_count()
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)


def set_stats(on):
    with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
        f.write("1" if on else "0")


def measured(ids, run):
    """Runs `run()` with BPF run-time stats on; returns its result and, per program name,
    the (run_time_ns, run_cnt) it added."""
    set_stats(True)
    try:
        before = prog_stats(ids)
        result = run()
        after = prog_stats(ids)
    finally:
        set_stats(False)
    return result, {k: (t - before[k][0], c - before[k][1]) for k, (t, c) in after.items()}


