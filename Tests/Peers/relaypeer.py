#!/usr/bin/python3
"""Peers for the stream-relay tests: an echo server and clients that check every byte.

Data is deterministic (seeded), written in random chunk sizes so that patterns split
across writes. Each peer prints one JSON line with what it saw; the tests compare."""
import argparse, errno, fcntl, hashlib, json, os, random, select, socket, struct, sys, termios, threading, time

def write_port(path, port):
    with open(path + ".tmp", "w") as f:
        f.write(str(port))
    os.rename(path + ".tmp", path)

def reset_after_fin(s, e, take):
    """Whether error `e` is a reset that came after the peer's FIN: Linux reports a reset
    that finds the FIN already in (CLOSE_WAIT) as EPIPE, one without it as ECONNRESET. The
    stream then ended with that FIN (the reset was provoked by sends in flight), and the
    bytes before it are still readable: `take` gets them."""
    if e.errno != errno.EPIPE:
        return False
    s.setblocking(True); s.settimeout(5)
    try:
        while True:
            d = s.recv(65536)
            if not d:
                return True
            take(d)
    except OSError:
        return False

def payload(size, seed, text):
    if text:
        words = [b"it is rainy today. ", b"rain", b"y or not, ", b"cloudy skies ", b"sun. "]
        rnd = random.Random(seed)
        out = bytearray()
        while len(out) < size:
            out += rnd.choice(words)
        return bytes(out[:size])
    return random.Random(seed).randbytes(size)

def server(args):
    fam = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    l = socket.socket(fam); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((args.bind, args.port)); l.listen(256)
    write_port(args.portfile, l.getsockname()[1])
    def push(c):
        """Sends --expect bytes as fast as the socket takes them; says how far it got
        after 3 s (the client is not reading then). Measured by the sending loop itself
        (a timer thread can be late on a loaded machine, after the client began to read)."""
        data = payload(1 << 20, 9, False)
        sent = [0]; h = hashlib.sha256()
        start = time.monotonic(); reported = False
        try:
            while sent[0] < args.expect:
                if not reported and time.monotonic() - start >= 3.0:
                    print(json.dumps({"pushed_after_3s": sent[0]}), flush=True); reported = True
                chunk = data[:min(65536, args.expect - sent[0])]
                c.sendall(chunk); h.update(chunk); sent[0] += len(chunk)
            if not reported:
                print(json.dumps({"pushed_after_3s": sent[0]}), flush=True)
            # The client says when it has everything; then the FIN.
            c.settimeout(120); c.recv(2)
            c.shutdown(socket.SHUT_WR)
            print(json.dumps({"pushed": sent[0], "sha": h.hexdigest()}), flush=True)
        except OSError as e:
            print(json.dumps({"pushed": sent[0], "error": str(e)}), flush=True)
        c.close()

    def digest(c, peer):
        """Reads to EOF, then answers with what arrived (count and sha256) and closes."""
        h = hashlib.sha256(); n = 0
        try:
            while True:
                d = c.recv(1 << 16)
                if not d: break
                h.update(d); n += len(d)
            r = {"received": n, "sha": h.hexdigest(), "eof": True, "peer_port": peer[1]}
            c.sendall((json.dumps(r) + "\n").encode())
        except OSError as e:
            r = {"received": n, "error": str(e)}
        print(json.dumps(r), flush=True)
        c.close()

    def whoami(c, peer):
        """Tells the client the address it came from, then waits for its EOF."""
        c.sendall((json.dumps({"peer": [peer[0], peer[1]], "local": list(c.getsockname()[:2])}) + "\n").encode())
        try:
            while c.recv(1 << 16): pass
        except OSError: pass
        c.close()

    def stream_echo(c, peer):
        """An echo that reads before it writes on every wake-up (as the stream client does),
        so the first read that sees the end names it: "eof" for a FIN that came after every
        byte, even when its own later echoes provoke a reset (a blocking echo would be stuck
        in sendall then and see only the reset). The rest is echoed after the EOF."""
        c.setblocking(False)
        pending = bytearray(); n = 0; h = hashlib.sha256(); error = None
        def take(d):
            nonlocal n
            h.update(d); n += len(d)
        p = select.poll(); p.register(c, select.POLLIN)
        try:
            while True:
                events = dict(p.poll(1000)).get(c.fileno(), 0)
                if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
                    try:
                        d = c.recv(65536)
                        if not d:
                            break
                        take(d); pending.extend(d)
                    except BlockingIOError:
                        pass
                if events & select.POLLOUT and pending:
                    try:
                        del pending[:c.send(pending[:65536])]
                    except BlockingIOError:
                        pass
                p.modify(c, select.POLLIN | (select.POLLOUT if pending else 0))
        except OSError as e:
            pending.clear()
            if not reset_after_fin(c, e, take):
                error = str(e)
        r = {"received": n, "error": error} if error else \
            {"received": n, "sha": h.hexdigest(), "eof": True, "peer_port": peer[1]}
        print(json.dumps(r), flush=True)
        try:
            c.setblocking(True); c.sendall(pending); c.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        c.close()

    def serve(c, peer):
        if args.mode == "stream":
            return stream_echo(c, peer)
        if args.mode == "push":
            return push(c)
        if args.mode == "digest":
            return digest(c, peer)
        if args.mode == "whoami":
            return whoami(c, peer)
        h = hashlib.sha256(); n = 0
        try:
            while True:
                d = c.recv(65536)
                if not d: break
                h.update(d); n += len(d)
                if args.mode == "reset":
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    c.close()
                    print(json.dumps({"received": n, "reset": True}), flush=True)
                    return
                c.sendall(d)
            # EOF from the client (half-close): the other direction still works.
            print(json.dumps({"received": n, "sha": h.hexdigest(), "eof": True, "peer_port": peer[1]}), flush=True)
            if args.mode == "trailer":
                # Half-closed by the client: this direction still carries data, and the
                # FIN right behind it must not overtake it.
                c.sendall(b"bye")
            c.shutdown(socket.SHUT_WR)
        except OSError as e:
            print(json.dumps({"received": n, "error": str(e)}), flush=True)
        finally:
            c.close()
    while True:
        c, peer = l.accept()
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()

def one_client(args, seed, results):
    data = payload(args.size, seed, args.text)
    expect_at_server = data.replace(b"rainy", b"cloudy") if args.edit else data
    expect_back = expect_at_server.replace(b"cloudy", b"sunny") if args.edit else data
    s = socket.create_connection((args.host, args.port), timeout=30)
    got = bytearray(); err = []
    want = len(expect_back) + (3 if args.trailer else 0)
    reset_seen = []
    def rd():
        try:
            while len(got) < len(expect_back):
                d = s.recv(65536)
                if not d: break
                got.extend(d)
        except (ConnectionResetError, BrokenPipeError):
            reset_seen.append(True)
        except OSError as e:
            err.append(str(e))
    t = threading.Thread(target=rd); t.start()
    rnd = random.Random(seed + 1)
    t0 = time.time(); i = 0
    try:
        while i < len(data):
            n = rnd.randint(1, args.max_chunk)
            s.sendall(data[i:i + n]); i += n
    except (ConnectionResetError, BrokenPipeError):
        reset_seen.append(True)  # the reset surfaced on a write: the error is reported once
    except OSError as e:
        err.append(str(e))
    t.join(60)
    echo_ok = bytes(got) == expect_back
    r = {"seed": seed, "sent": len(data), "got": len(got), "echo_equal": echo_ok, "local_port": s.getsockname()[1],
         "server_sha": hashlib.sha256(expect_at_server).hexdigest(), "seconds": round(time.time() - t0, 3)}
    if args.reset:
        try:
            if reset_seen: raise ConnectionResetError()
            while s.recv(65536): pass
            r["reset"] = False
        except (ConnectionResetError, BrokenPipeError):
            r["reset"] = True
        except OSError as e:
            r["reset"] = False; r["error"] = str(e)
    else:
        s.shutdown(socket.SHUT_WR)
        tail = bytearray()
        try:
            while not (args.trailer and len(tail) >= 3):
                d = s.recv(65536)
                if not d: break
                tail += d
            r["eof"] = True
        except OSError as e:
            r["eof"] = False; err.append(str(e))
        r["after_half_close"] = tail.decode("latin1")
    if err: r["errors"] = err
    s.close()
    results.append(r)

def client(args):
    results = []
    threads = [threading.Thread(target=one_client, args=(args, args.seed + 1000 * k, results)) for k in range(args.flows)]
    for t in threads: t.start()
    for t in threads: t.join()
    ok = all(r["echo_equal"] for r in results)
    print(json.dumps({"flows": len(results), "all_equal": ok, "results": results if not ok or args.flows == 1 else results[:1]}), flush=True)

def stream(args):
    """Writes and reads until the connection ends: for stopping the agent mid-transfer.
    One thread, reading before writing on every wake-up, so the first syscall that sees the
    end names it: "eof" for a FIN (also when a send meets the reset after it first: see
    reset_after_fin), the error for a reset that came without one."""
    s = socket.create_connection((args.host, args.port), timeout=30)
    s.setblocking(False)
    data = payload(64 << 20, args.seed, False)
    got = bytearray(); end = None; i = 0; running = False
    p = select.poll(); p.register(s, select.POLLIN | select.POLLOUT)
    deadline = time.monotonic() + 120
    while end is None and time.monotonic() < deadline:
        if i >= len(data): p.modify(s, select.POLLIN)
        events = dict(p.poll(1000)).get(s.fileno(), 0)
        try:
            if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
                d = s.recv(65536)
                if not d: end = "eof"; break
                got.extend(d)
                if len(got) >= 256 << 10 and not running:
                    running = True
                    print(json.dumps({"running": True}), flush=True)
            if events & select.POLLOUT and i < len(data):
                i += s.send(data[i:i + 16384])
                time.sleep(0.001)
        except BlockingIOError:
            pass
        except OSError as e:
            end = "eof" if reset_after_fin(s, e, got.extend) else "error: " + str(e)
    print(json.dumps({"end": end or "none", "got": len(got), "prefix_equal": bytes(got) == data[:len(got)],
                      "sent": i}), flush=True)

def upload(args):
    """Sends `size` bytes as fast as the socket takes them, half-closes at once, and
    compares the server's count and sha256 (told after its EOF) with what was sent."""
    data = payload(1 << 20, args.seed, False)
    s = socket.create_connection((args.host, args.port), timeout=120)
    h = hashlib.sha256(); n = 0
    rnd = random.Random(args.seed)
    try:
        while n < args.size:
            k = min(rnd.randint(1, 1 << 17), args.size - n)
            off = n % len(data)
            chunk = (data[off:] + data)[:k]
            s.sendall(chunk); h.update(chunk); n += k
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            d = s.recv(4096)
            if not d: break
            answer += d
        server = json.loads(answer.decode()) if answer else {}
        ok = server.get("received") == n and server.get("sha") == h.hexdigest()
        print(json.dumps({"sent": n, "sha": h.hexdigest(), "server": server, "equal": ok}), flush=True)
    except OSError as e:
        print(json.dumps({"sent": n, "error": str(e), "equal": False}), flush=True)

def blocking(args):
    """One thread reads with blocking recv(1000) while another sends on the same socket
    (its own sends wake it up): every echoed byte must come back, in order."""
    data = payload(args.size, args.seed, False)
    s = socket.create_connection((args.host, args.port))
    s.settimeout(None)
    got = bytearray(); errs = []
    def rd():
        try:
            while len(got) < len(data):
                d = s.recv(1000)
                if not d: break
                got.extend(d)
        except OSError as e:
            errs.append("recv: " + str(e))
    t = threading.Thread(target=rd); t.start()
    rnd = random.Random(args.seed); i = 0
    try:
        while i < len(data):
            k = rnd.choice([1, 7, 999, 1000, 1001, 4093, 65537])
            s.sendall(data[i:i + k]); i += k
            if args.wait_go and i == k:
                # The callouts decide on the first bytes; the test says when to go on
                # (once the relay put the flow on its fast path).
                print(json.dumps({"first": k}), flush=True)
                sys.stdin.readline()
    except OSError as e:
        errs.append("send: " + str(e))
    t.join(120)
    s.close()
    print(json.dumps({"sent": len(data), "got": len(got), "equal": bytes(got) == data, "errors": errs}), flush=True)

def names(args):
    """What the process sees of its connection, and what the peer sees."""
    fam = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    s = socket.socket(fam)
    s.settimeout(10)
    s.connect((args.host, args.port))
    early = list(s.getsockname()[:2])
    line = b""
    while not line.endswith(b"\n"):
        d = s.recv(4096)
        if not d: break
        line += d
    seen = json.loads(line.decode())
    print(json.dumps({"peername": list(s.getpeername()[:2]), "sockname": early, "sockname_late": list(s.getsockname()[:2]),
                      "peer_saw": seen["peer"], "peer_local": seen["local"]}), flush=True)
    s.close()

def handed_over_connection(host, port):
    """A connection made by a child process that passes the fd here and exits: the
    flow's owner in the kernel's stamp is then a process that no longer exists."""
    here, there = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        c = socket.create_connection((host, port), timeout=60)
        socket.send_fds(there, [b"fd"], [c.fileno()])
        os._exit(0)
    # The child has sent the fd and exits; for a while the socket is only inside the
    # unix socket's queue, held by no process at all.
    os.waitpid(pid, 0)  # reaped: /proc/PID is gone too
    time.sleep(0.3)
    _, fds, _, _ = socket.recv_fds(here, 16, 1)
    s = socket.socket(fileno=fds[0])
    s.settimeout(60)
    print(json.dumps({"connected_by": pid, "reader": os.getpid()}), flush=True)
    return s

def slowread(args):
    """Connects, reads nothing for 3.5 s, then everything until EOF."""
    if args.handoff:
        s = handed_over_connection(args.host, args.port)
    else:
        s = socket.create_connection((args.host, args.port), timeout=60)
    time.sleep(3.5)
    h = hashlib.sha256(); n = 0
    while n < args.size:
        try:
            d = s.recv(1 << 16)
        except TimeoutError:
            # Say how far it got and what the socket itself counts unread (a stall).
            unread = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
            print(json.dumps({"got": n, "error": "timed out", "unread": unread}), flush=True)
            sys.exit(1)
        if not d: break
        h.update(d); n += len(d)
    s.sendall(b"ok")
    while s.recv(1 << 16): pass
    print(json.dumps({"got": n, "sha": h.hexdigest()}), flush=True)

p = argparse.ArgumentParser()
sub = p.add_subparsers(dest="cmd", required=True)
a = sub.add_parser("server"); a.add_argument("portfile"); a.add_argument("--bind", default="127.0.0.1")
a.add_argument("--mode", default="echo", choices=["echo", "stream", "trailer", "reset", "push", "digest", "whoami"])
a.add_argument("--expect", type=int, default=0); a.add_argument("--port", type=int, default=0)
a = sub.add_parser("client"); a.add_argument("host"); a.add_argument("port", type=int)
a.add_argument("--size", type=int, default=100000); a.add_argument("--seed", type=int, default=1)
a.add_argument("--flows", type=int, default=1); a.add_argument("--max-chunk", type=int, default=8192)
a.add_argument("--text", action="store_true"); a.add_argument("--edit", action="store_true")
a.add_argument("--trailer", action="store_true"); a.add_argument("--reset", action="store_true")
a = sub.add_parser("stream"); a.add_argument("host"); a.add_argument("port", type=int); a.add_argument("--seed", type=int, default=7)
a = sub.add_parser("slowread"); a.add_argument("host"); a.add_argument("port", type=int)
a.add_argument("--size", type=int, required=True); a.add_argument("--handoff", action="store_true")
a = sub.add_parser("upload"); a.add_argument("host"); a.add_argument("port", type=int)
a.add_argument("--size", type=int, required=True); a.add_argument("--seed", type=int, default=5)
a = sub.add_parser("blocking"); a.add_argument("host"); a.add_argument("port", type=int)
a.add_argument("--size", type=int, default=20 << 20); a.add_argument("--seed", type=int, default=11)
a.add_argument("--wait-go", action="store_true")
a = sub.add_parser("names"); a.add_argument("host"); a.add_argument("port", type=int)
args = p.parse_args()
{"server": server, "client": client, "stream": stream, "slowread": slowread, "upload": upload,
 "blocking": blocking, "names": names}[args.cmd](args)
