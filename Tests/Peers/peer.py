#!/usr/bin/python3
"""Real peers for flowtag's kernel tests: small clients and servers whose pids, ports and
byte counts are the ground truth the tests compare the agent's reports with."""
import json, os, socket, subprocess, sys, threading, time

def family(name):
    return socket.AF_INET6 if name == "6" else socket.AF_INET

def loopback(name):
    return "::1" if name == "6" else "127.0.0.1"

def write_port(path, port):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.rename(tmp, path)

def http(portfile, body_size, count):
    """HTTP/1.0 server: answers `count` requests with a body of body_size bytes."""
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", 0)); l.listen(64)
    write_port(portfile, l.getsockname()[1])
    body = b"x" * body_size
    for _ in range(count):
        c, _ = l.accept()
        req = b""
        while b"\r\n\r\n" not in req:
            chunk = c.recv(65536)
            if not chunk: break
            req += chunk
        head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
        c.sendall(head + body)
        c.close()
        print(json.dumps({"pid": os.getpid(), "received": len(req), "sent": len(head) + len(body)}), flush=True)

def sink(portfile, mode="drain"):
    """TCP server outside the watched cgroup: accepts and drains (or closes at once,
    mode "close"; or echoes, mode "echo") until killed."""
    l = socket.socket(socket.AF_INET6); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    l.bind(("::", 0)); l.listen(1024)
    write_port(portfile, l.getsockname()[1])
    def drain(c):
        try:
            while True:
                d = c.recv(65536)
                if not d: break
                if mode == "echo": c.sendall(d)
        except OSError: pass
        c.close()
    while True:
        c, _ = l.accept()
        if mode == "close":
            c.close()
        else:
            threading.Thread(target=drain, args=(c,), daemon=True).start()

def udp_server(fam, portfile):
    s = socket.socket(family(fam), socket.SOCK_DGRAM)
    s.bind((loopback(fam), 0))
    write_port(portfile, s.getsockname()[1])
    data, peer = s.recvfrom(65536)
    s.sendto(b"pong" * 10, peer)
    s.close()
    print(json.dumps({"pid": os.getpid(), "port": s.getsockname()[1] if False else None, "peer_port": peer[1], "received": len(data), "sent": 40}), flush=True)

def udp_client(fam, port):
    s = socket.socket(family(fam), socket.SOCK_DGRAM)
    s.sendto(b"ping" * 5, (loopback(fam), int(port)))
    data, _ = s.recvfrom(65536)
    local = s.getsockname()[1]
    s.close()
    print(json.dumps({"pid": os.getpid(), "port": local, "sent": 20, "received": len(data)}), flush=True)

def fork_connect(port):
    """The parent creates the socket, a forked child connects it."""
    s = socket.socket()
    pid = os.fork()
    if pid == 0:
        s.connect(("127.0.0.1", int(port)))
        s.sendall(b"from the child")
        s.close()
        os._exit(0)
    s.close()
    os.waitpid(pid, 0)
    print(json.dumps({"parent": os.getpid(), "child": pid}), flush=True)

def wait_connect(port):
    """Started before the programs load; connects when told on stdin."""
    print(json.dumps({"pid": os.getpid()}), flush=True)
    sys.stdin.readline()
    s = socket.create_connection(("127.0.0.1", int(port)))
    s.sendall(b"late")
    local = s.getsockname()[1]
    s.close()
    print(json.dumps({"pid": os.getpid(), "port": local}), flush=True)

def connect_from(port, src_port):
    """Connect from a fixed source port (for the same 5-tuple in two namespaces)."""
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(src_port)))
    s.connect(("127.0.0.1", int(port)))
    s.sendall(b"hi"); s.close()
    print(json.dumps({"pid": os.getpid()}), flush=True)

def accept_variants(wait=""):
    """A listener in this process; for each case a forked child accepts one connection
    that this process makes: with the peer's address (Python's accept), or with
    accept(fd, NULL, NULL) followed by a receive, a send, or nothing. With "wait", the
    cases start when told on stdin (the listener is older than the programs)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(8)
    print(json.dumps({"listener_owner": os.getpid(), "port": l.getsockname()[1]}), flush=True)
    if wait == "wait":
        sys.stdin.readline()
    for case in ("addr", "null-recv", "null-send", "null-nothing"):
        c = socket.socket()
        pid = os.fork()
        if pid == 0:
            if case == "addr":
                a, _ = l.accept()
            else:
                fd = libc.accept(l.fileno(), None, None)
                if fd < 0: os._exit(3)
                a = socket.socket(fileno=fd)
            if case == "null-recv": a.recv(16)
            if case == "null-send": a.sendall(b"s")
            a.close()
            os._exit(0)
        c.connect(l.getsockname())
        port = c.getsockname()[1]
        if case == "null-recv": c.sendall(b"r")
        _, status = os.waitpid(pid, 0)
        c.close()
        print(json.dumps({"case": case, "acceptor": pid, "client_port": port, "status": status}), flush=True)

def listen_once(port):
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", int(port))); l.listen(4)
    print("ready", flush=True)
    c, _ = l.accept()
    while c.recv(65536): pass
    c.close()

STORM_EXES = {
    "bash": lambda port: ["/bin/bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"],
    "curl": lambda port: ["/usr/bin/curl", "-s", "-m", "2", "-o", "/dev/null", f"http://127.0.0.1:{port}/"],
    "python": lambda port: ["/usr/bin/python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', {port})).close()"],
}

def storm(port, count, exes, parallel):
    """`count` processes, round-robin over `exes`, each connects once and exits at once.
    Prints one JSON line per process: pid and executable path (the ground truth)."""
    names = exes.split(",")
    running = []
    for i in range(int(count)):
        name = names[i % len(names)]
        argv = STORM_EXES[name](port)
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(json.dumps({"pid": p.pid, "exe": os.path.realpath(argv[0])}), flush=True)
        running.append(p)
        if len(running) >= int(parallel):
            running.pop(0).wait()
    for p in running: p.wait()

def connect_loop(port, count, ports_file, seconds="0", udp_port="0", report_at="0"):
    """Connects `count` times (or for `seconds`, if nonzero) to 127.0.0.1:port, one
    connection after the other, each closed at once; with `udp_port`, every fourth time
    also one datagram from a new UDP socket, closed at once (a UDP flow each). With
    `report_at`, prints {"reached": n} once that many connects are made (a test acts in
    the storm, not after a guessed time). Writes every local port, one a line, to
    `ports_file` (UDP ones to ports_file.udp: the ground truth), then prints
    {"pid", "connects", "datagrams"}."""
    deadline = time.monotonic() + float(seconds) if float(seconds) > 0 else None
    ports, udp, n = [], [], 0
    while (deadline is None and n < int(count)) or (deadline is not None and time.monotonic() < deadline):
        try:
            c = socket.create_connection(("127.0.0.1", int(port)))
        except OSError:
            time.sleep(0.001)
            continue
        ports.append(c.getsockname()[1])
        c.close()
        n += 1
        if n == int(report_at):
            print(json.dumps({"reached": n}), flush=True)
        if int(udp_port) and n % 4 == 0:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.sendto(b"x", ("127.0.0.1", int(udp_port)))
            udp.append(u.getsockname()[1])
            u.close()
    with open(ports_file, "w") as f:
        f.write("\n".join(map(str, ports)) + "\n")
    if int(udp_port):
        with open(ports_file + ".udp", "w") as f:
            f.write("\n".join(map(str, udp)) + "\n")
    print(json.dumps({"pid": os.getpid(), "connects": n, "datagrams": len(udp)}), flush=True)

def reconnect(port):
    """One TCP socket connected twice: connect, send, connect(AF_UNSPEC) (disconnects and
    keeps the socket, and so its cookie), connect again, send, close. Prints its ports."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    s = socket.socket()
    s.connect(("127.0.0.1", int(port)))
    first = s.getsockname()[1]
    s.sendall(b"first")
    time.sleep(0.1)
    unspec = (ctypes.c_ubyte * 16)()  # sa_family 0: AF_UNSPEC
    if libc.connect(s.fileno(), ctypes.byref(unspec), 16) != 0:
        raise OSError(ctypes.get_errno(), "connect(AF_UNSPEC)")
    time.sleep(0.1)
    s.connect(("127.0.0.1", int(port)))
    s.sendall(b"second!")
    second = s.getsockname()[1]
    time.sleep(0.1)
    s.close()
    print(json.dumps({"pid": os.getpid(), "first": first, "second": second}), flush=True)

def watchers(sock_path, count, seconds):
    """`count` clients that ask /v1/watch and never read, for `seconds`; prints how many
    the agent closed (it drops watchers that fall too far behind)."""
    conns = []
    for _ in range(int(count)):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(sock_path)
        s.sendall(b"GET /v1/watch HTTP/1.1\r\nHost: x\r\n\r\n")
        conns.append(s)
    print(json.dumps({"watchers": len(conns)}), flush=True)
    time.sleep(float(seconds))
    closed = 0
    for s in conns:
        s.setblocking(False)
        try:
            while True:
                b = s.recv(1 << 20)
                if not b:
                    closed += 1
                    break
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    print(json.dumps({"closed_by_agent": closed}), flush=True)

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"http": lambda: http(args[0], int(args[1]), int(args[2])),
     "sink": lambda: sink(*args),
     "udp-server": lambda: udp_server(args[0], args[1]),
     "udp-client": lambda: udp_client(args[0], args[1]),
     "fork-connect": lambda: fork_connect(args[0]),
     "wait-connect": lambda: wait_connect(args[0]),
     "connect-from": lambda: connect_from(args[0], args[1]),
     "listen-once": lambda: listen_once(args[0]),
     "accept-variants": lambda: accept_variants(*args),
     "storm": lambda: storm(args[0], args[1], args[2], args[3]),
     "connect-loop": lambda: connect_loop(*args),
     "reconnect": lambda: reconnect(args[0]),
     "watchers": lambda: watchers(*args),
     }[cmd]()
