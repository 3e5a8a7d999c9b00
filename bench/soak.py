#!/usr/bin/env python3
"""Soak test of h3gate: bench/soak [MINUTES] (default 10). Run through bench/soak, which builds.

Starts tools/origin and h3gate (`workers 2`, metrics endpoint on) on free loopback ports and,
for MINUTES, runs these loops at once, each with its own seeded RNG:

  get      h3load, open loop at a moderate rate, mixed sizes (/bytes/1024 ... /bytes/1048576,
           /chunked/N), runs of 10 s; a failed request, a short body or a non-2xx is an error
  verify   h3get GETs of /bytes/N or /chunked/N (N up to 4 MiB, 1-4 streams per connection),
           every body's sha256 checked against the origin's pattern
  upload   h3get POSTs to /echo (echoed body's sha256 checked) or /sink (byte count checked),
           0 B to 4 MiB, with or without content-length, 1-3 streams
  rebind   h3get --rebind-every 500-800 ms on a 24-32 MiB download read at 8 MB/s (larger than
           the client's window, so the body crosses the new paths), sha256 checked
  abort    (injected) clients that go away: killed (SIGKILL) mid-download, mid-upload, while
           the origin trickles or before it answers, or h3get's own deadline (CONNECTION_CLOSE
           with H3_REQUEST_CANCELLED) mid-download
  junk     (injected) random datagrams to the proxy port at a bounded rate: random bytes,
           long headers (v1 Initials with garbage, truncated Initials, unknown versions),
           short headers with CIDs shaped like ours (stateless-reset path)

Every 10 s it prints one row: elapsed time, proxy RSS (VmRSS), live connections / streams /
backend connections and memory budget in use (summed over workers from /stats), proxy CPU,
requests done and errors per class, proxy 5xx. After a third of the time it holds the loops
until the proxy is idle and measures its idle RSS (the quiet point, never before 2 min of
warm-up or half the run; the pause does not count as load time). At the end it stops the load, waits for quiescence, measures idle RSS again and
prints a verdict; exit 0 on PASS, 1 on FAIL. Memory is flat when the final idle RSS is at most
4 MiB above the quiet point's (RSS under load follows the load of the moment and is only
printed); runs shorter than 5 min print memory but do not judge it. The table also goes to
bench/results/soak.md. Aborts and junk are injected faults: their own failures are expected;
any failure of get/verify/upload/rebind is an error, and so is an abort client that got an
answer it should not have (wrong status or bytes before it was killed).

Every child runs in its own process group and is killed at the end, on error or on
SIGINT/SIGTERM.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR") or "target"), "release")
H3GATE = os.environ.get("H3GATE_BIN") or os.path.join(BIN, "h3gate")
H3GET = os.path.join(BIN, "h3get")
H3LOAD = os.path.join(BIN, "h3load")
ORIGIN = os.path.join(BIN, "origin")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Verdict thresholds (MiB): see verdict().
FLAT_MIB = 4.0
FINAL_MIB = 4.0
QUIESCE_S = 30.0
# tools/origin closes a keep-alive connection after 60 s without a request (its read timeout);
# h3gate then sees the close on the read it keeps armed on every pooled connection.
BACKEND_QUIESCE_S = 75.0
# The heap grows for the first minute or two (malloc arenas per thread, quiche and pool state
# reaching their working size): the quiet point comes after this, and never before a third.
WARMUP_S = 120.0
# Below this the run cannot place its quiet point past warm-up: memory is printed, not judged.
MEMORY_VERDICT_MIN = 5.0
ROW_EVERY = 10.0
SAMPLE_EVERY = 1.0

CLASSES = ["get", "verify", "upload", "rebind", "abort", "junk"]
INJECTED = ("abort", "junk")


def log(msg):
    print(f"soak: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------

LOCK = threading.Lock()
RUNNING = set()  # Popen objects of short-lived clients
CLOSED = threading.Event()  # set at clean-up: no new client may start


def spawn(argv, **kw):
    """Starts a client in its own process group (so killpg reaches everything it started)."""
    with LOCK:
        if CLOSED.is_set():
            raise RuntimeError("shutting down")
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        RUNNING.add(p)
    return p


def killpg(p, sig=signal.SIGKILL):
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap(p, timeout=None):
    """Waits for p (killing its group after timeout s); returns (rc, stdout, stderr, timed_out)."""
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        killpg(p)
        out, err = p.communicate()
    with LOCK:
        RUNNING.discard(p)
    return p.returncode, out.decode(errors="replace"), err.decode(errors="replace"), timed_out


def run(argv, timeout):
    return reap(spawn(argv), timeout)


class Child:
    """A long-lived process (origin, h3gate) in its own process group, logging to a file."""

    def __init__(self, name, argv, logfile):
        self.name, self.logfile = name, logfile
        self.out = open(logfile, "wb")
        self.p = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.p.pid

    def alive(self):
        return self.p.poll() is None

    def stop(self, grace=5.0):
        if self.alive():
            killpg(self.p, signal.SIGTERM)
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        killpg(self.p)
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.out.close()

    def text(self):
        try:
            with open(self.logfile, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, n=20):
        return "\n".join(self.text().splitlines()[-n:])


def free_port(kind):
    for _ in range(100):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        # Also free on the other protocol, so that nothing else here wants it.
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == socket.SOCK_STREAM
                              else socket.SOCK_STREAM)
        try:
            other.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            other.close()
    raise RuntimeError("no free port")


def proc_kib(pid, key="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


# ---------------------------------------------------------------------------------------------
# Expected bodies
# ---------------------------------------------------------------------------------------------

# Byte i of the origin's downloads and of h3get --data-size bodies: (i*7 + (i>>8)) as u8. It
# only depends on the low 16 bits of i, so one 64 KiB block describes it.
BLOCK = bytes(((i * 7 + (i >> 8)) & 0xFF) for i in range(65536))
_SHA = {}


def pattern_sha(n):
    with LOCK:
        if n in _SHA:
            return _SHA[n]
    h = hashlib.sha256()
    full, rest = divmod(n, len(BLOCK))
    for _ in range(full):
        h.update(BLOCK)
    h.update(BLOCK[:rest])
    d = h.hexdigest()
    with LOCK:
        _SHA[n] = d
    return d


def sha_line(status, body):
    return f"status={status} bytes={len(body)} sha256={hashlib.sha256(body).hexdigest()}"


def pattern_line(n):
    return f"status=200 bytes={n} sha256={pattern_sha(n)}"


# ---------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------

class Counters:
    def __init__(self, errlog):
        self.ok = {c: 0 for c in CLASSES}
        self.err = {c: 0 for c in CLASSES}
        self.extra = {}  # free-form counters ("abort.killed", "junk.replies", ...)
        self.errors = []  # (elapsed, class, text)
        self.errlog = errlog
        self.t0 = time.monotonic()

    def add(self, cls, ok=0, err=0, why=None):
        if CLOSED.is_set():
            return  # clients killed by the clean-up (Ctrl-C, a stuck loop): not the proxy's doing
        with LOCK:
            self.ok[cls] += ok
            self.err[cls] += err
            if why is not None:
                el = time.monotonic() - self.t0
                self.errors.append((el, cls, why))
                with open(self.errlog, "a") as f:
                    f.write(f"--- {el:.1f} s {cls}\n{why}\n")

    def bump(self, key, n=1):
        with LOCK:
            self.extra[key] = self.extra.get(key, 0) + n

    def snapshot(self):
        with LOCK:
            return dict(self.ok), dict(self.err), dict(self.extra)


def explain(argv, rc, out, err, note=""):
    def cut(s, n=24):
        lines = s.strip().splitlines()
        if len(lines) > n:
            lines = lines[:8] + [f"... {len(lines) - n + 8} more lines"] + lines[-(n - 8):]
        return "\n".join("    " + ln for ln in lines)
    return (f"{note}\n  $ {shlex.join(argv)}\n  exit {rc}\n  stdout:\n{cut(out)}\n"
            f"  stderr:\n{cut(err)}").strip()


def check_lines(out, expected):
    """h3get --sha256 output vs the expected 'status=... bytes=... sha256=...' lines (any order)."""
    got = sorted(ln.strip() for ln in out.splitlines() if ln.startswith("status="))
    return got == sorted(expected)


# ---------------------------------------------------------------------------------------------
# Load loops
# ---------------------------------------------------------------------------------------------

class Loop(threading.Thread):
    def __init__(self, name, soak, seed):
        super().__init__(daemon=True, name=name)
        self.soak, self.rng = soak, random.Random(seed)
        self.c = soak.counters
        self.crashed = None

    def left(self):
        return self.soak.end - time.monotonic()

    def run(self):
        try:
            while not self.soak.stop.is_set() and self.left() > 0:
                while self.soak.hold.is_set() and not self.soak.stop.is_set():
                    self.soak.stop.wait(0.2)
                self.once()
        except Exception as ex:  # noqa: BLE001 - reported as an error of the loop
            if not CLOSED.is_set():
                self.crashed = repr(ex)
                self.c.add(self.cls, err=1, why=f"loop {self.name} crashed: {ex!r}")

    def pause(self, lo, hi):
        self.soak.stop.wait(self.rng.uniform(lo, hi))

    def h3get(self, *args):
        return [H3GET, "--insecure", *args]


class GetLoop(Loop):
    """h3load, open loop, mixed sizes, runs of at most 10 s (counted when each run ends)."""
    cls = "get"
    PATHS = ["/bytes/1024"] * 6 + ["/", "/chunked/16384", "/bytes/65536", "/bytes/1048576"]

    def once(self):
        d = min(10.0, self.left())
        if d < 2:
            self.soak.stop.wait(self.left())
            return
        paths = self.PATHS[:]
        self.rng.shuffle(paths)
        argv = [H3LOAD, "--json", "-c", "4", "-m", "4", "-d", f"{d:.1f}", "--rps",
                str(self.soak.args.get_rps), "--timeout", "15"] + [self.soak.url(p) for p in paths]
        rc, out, err, to = run(argv, d + 60)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            self.c.add("get", err=1, why=explain(argv, rc, out, err,
                                                  "h3load timed out" if to else "h3load gave no result"))
            return
        r = json.loads(lines[-1])
        bad = r["failed"] + r["non_2xx"]
        good = r["done"] - r["non_2xx"]
        if not r["ok"]:
            self.c.add("get", ok=good, err=max(bad, 1), why=explain(argv, rc, "", err, "h3load failed"))
        else:
            self.c.add("get", ok=good)
        self.c.bump("get.bytes", r["bytes_in"])


class VerifyLoop(Loop):
    """h3get GETs whose every body is checked (sha256)."""
    cls = "verify"

    def once(self):
        n = self.rng.choice([0, 1, 1000, 16384, 65536, 65537, 300000, 1048576, 4194304])
        path = self.rng.choice(["/bytes/", "/chunked/"]) + str(n)
        k = self.rng.randint(1, 4)
        argv = self.h3get("--sha256", "-n", str(k), "--timeout", "30", self.soak.url(path))
        rc, out, err, _ = run(argv, 60)
        if rc == 0 and check_lines(out, [pattern_line(n)] * k):
            self.c.add("verify", ok=k)
        else:
            self.c.add("verify", err=k, why=explain(argv, rc, out, err, f"expected {k} x {pattern_line(n)}"))
        self.pause(0.5, 1.5)


class UploadLoop(Loop):
    """h3get POSTs: /echo (sha256 of the echoed body) or /sink (the byte count)."""
    cls = "upload"

    def once(self):
        n = self.rng.choice([0, 1, 1000, 16384, 100000, 262144, 1048576, 4194304])
        k = self.rng.randint(1, 3)
        echo = self.rng.random() < 0.6
        args = ["--sha256", "-n", str(k), "--timeout", "30", "--data-size", str(n)]
        if self.rng.random() < 0.3:
            args.append("--no-content-length")
        if self.rng.random() < 0.3:
            args += ["--chunk", str(self.rng.choice([1000, 4096, 65536]))]
        argv = self.h3get(*args, self.soak.url("/echo" if echo else "/sink"))
        want = pattern_line(n) if echo else sha_line(200, f"{n}\n".encode())
        rc, out, err, _ = run(argv, 60)
        if rc == 0 and check_lines(out, [want] * k):
            self.c.add("upload", ok=k)
        else:
            self.c.add("upload", err=k, why=explain(argv, rc, out, err, f"expected {k} x {want}"))
        self.pause(0.5, 1.5)


class RebindLoop(Loop):
    """A 24-32 MiB download read at 8 MB/s whose client changes source port every 500-800 ms.
    The body is larger than the client's flow-control window (10 MB), so most of it crosses
    the new paths, and the rebindings stay below the 15 a connection allows."""
    cls = "rebind"

    def once(self):
        n = self.rng.randint(24 << 20, 32 << 20)
        every = self.rng.randint(500, 800)
        # -v: the rebindings and connection details go to stderr, shown when it fails.
        argv = self.h3get("--sha256", "-v", "--rebind-every", str(every), "--rate", "8000000",
                          "--timeout", "30", self.soak.url(f"/bytes/{n}"))
        rc, out, err, _ = run(argv, 60)
        if rc == 0 and check_lines(out, [pattern_line(n)]):
            self.c.add("rebind", ok=1)
        else:
            self.c.add("rebind", err=1, why=explain(argv, rc, out, err, f"expected {pattern_line(n)}"))
        self.pause(0.5, 1.5)


class AbortLoop(Loop):
    """Clients that go away mid-request. Their own failure is the point; an error is only an
    answer they should not have had (wrong status or bytes) before they went."""
    cls = "abort"
    KINDS = ["kill-download", "kill-upload", "kill-trickle", "kill-slow", "deadline-download",
             "kill-many"]

    def once(self):
        kind = self.rng.choice(self.KINDS)
        u = self.soak.url
        # Killed clients never close their connection: a short idle timeout lets h3gate forget
        # them in 5 s instead of 30.
        base = ["--sha256", "--idle-timeout", "5000"]
        want = None  # the line a client that finished anyway must print
        if kind == "kill-download":
            n = 50_000_000
            argv = self.h3get(*base, "--rate", str(self.rng.choice([500_000, 2_000_000, 8_000_000])),
                              u(f"/bytes/{n}"))
            delay, want = self.rng.uniform(0.1, 3.0), [pattern_line(n)]
        elif kind == "kill-many":
            n, k = 20_000_000, self.rng.randint(2, 8)
            argv = self.h3get(*base, "-n", str(k), "--rate", "4000000",
                              u(self.rng.choice(["/bytes/", "/chunked/"]) + str(n)))
            delay, want = self.rng.uniform(0.1, 2.0), [pattern_line(n)] * k
        elif kind == "kill-upload":
            n = 20_000_000
            argv = self.h3get(*base, "--data-size", str(n), u("/sink"))
            delay, want = self.rng.uniform(0.02, 0.5), [sha_line(200, f"{n}\n".encode())]
        elif kind == "kill-trickle":
            n = 2000  # 20 s of one byte every 10 ms
            argv = self.h3get(*base, u(f"/trickle/{n}"))
            delay, want = self.rng.uniform(0.2, 3.0), [pattern_line(n)]
        elif kind == "kill-slow":
            argv = self.h3get(*base, u("/slow/3000"))
            delay, want = self.rng.uniform(0.05, 2.5), [sha_line(200, b"slow\n")]
        else:  # deadline-download: h3get's own deadline closes the connection mid-body
            t = self.rng.uniform(0.3, 2.5)
            argv = self.h3get(*base, "--rate", "2000000", "--timeout", f"{t:.2f}",
                              u("/bytes/50000000"))
            delay = None
        p = spawn(argv)
        if delay is not None:
            if self.soak.stop.wait(delay):
                pass
            killed = p.poll() is None
            if killed:
                killpg(p)
            rc, out, err, _ = reap(p, 30)
            if killed:
                self.c.add("abort", ok=1)
                self.c.bump(f"abort.{kind}")
            elif rc == 0 and check_lines(out, want):
                # Finished before we killed it: fine, and correct.
                self.c.add("abort", ok=1)
                self.c.bump("abort.finished-first")
            else:
                self.c.add("abort", err=1, why=explain(argv, rc, out, err, f"{kind}: ended before the kill, wrongly"))
        else:
            rc, out, err, _ = reap(p, 30)
            if rc == 1 and "timeout:" in err and not out.strip():
                self.c.add("abort", ok=1)
                self.c.bump(f"abort.{kind}")
            else:
                self.c.add("abort", err=1, why=explain(argv, rc, out, err, f"{kind}: expected h3get's timeout"))
        self.pause(0.3, 1.2)


class JunkLoop(Loop):
    """Random datagrams to the proxy port, at most --junk-rate per second, from a few sockets
    that change source port every 10 s. Counts what comes back: h3gate may answer junk only
    with smaller packets (stateless resets, version negotiation), so more bytes back than
    sent is an error (amplification)."""
    cls = "junk"

    def __init__(self, *a):
        super().__init__(*a)
        self.socks = []
        self.sent_bytes = 0
        self.reply_bytes = 0

    def new_socks(self):
        for s in self.socks:
            s.close()
        self.socks = []
        for _ in range(4):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            self.socks.append(s)

    def datagram(self):
        r = self.rng
        kind = r.choice(["random", "initial", "truncated-initial", "unknown-version",
                         "short-ours", "short-other", "tiny"])
        rb = r.randbytes
        if kind == "random":
            d = rb(r.randint(1, 1500))
        elif kind == "tiny":
            d = rb(r.randint(1, 8))
        elif kind in ("initial", "truncated-initial", "unknown-version"):
            ver = b"\x00\x00\x00\x01" if kind != "unknown-version" else rb(4)
            if kind == "unknown-version" and ver == b"\x00\x00\x00\x01":
                ver = b"\x1a\x2a\x3a\x4a"
            dcid = rb(r.randint(8, 20))
            scid = rb(r.randint(0, 20))
            first = 0xC0 | r.randint(0, 0x3F) if kind != "initial" else 0xC0 | r.randint(0, 3)
            head = bytes([first]) + ver + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
            if kind != "unknown-version":
                head += b"\x00"  # token length 0
                body_len = r.randint(1200, 1350) if kind == "initial" else r.randint(20, 600)
                head += (0x4000 | min(body_len, 0x3FFF)).to_bytes(2, "big")
            size = r.randint(1200, 1350) if kind != "truncated-initial" else r.randint(30, 600)
            d = head + rb(max(0, size - len(head)))
        else:
            # Short header; "ours": 16-byte DCID whose first byte names a worker, as h3gate's
            # CIDs do, so the datagram reaches the stateless-reset path.
            cid = bytes([r.randint(0, 1)]) + rb(15) if kind == "short-ours" else rb(r.randint(1, 20))
            d = bytes([0x40 | r.randint(0, 0x3F)]) + cid + rb(r.randint(1, 1200))
        self.c.bump(f"junk.{kind}")
        return d

    def once(self):
        self.new_socks()
        until = min(self.soak.end, time.monotonic() + 10)
        gap = 1.0 / self.soak.args.junk_rate
        nxt = time.monotonic()
        while (not self.soak.stop.is_set() and not self.soak.hold.is_set()
               and time.monotonic() < until):
            d = self.datagram()
            s = self.rng.choice(self.socks)
            try:
                s.sendto(d, self.soak.proxy_addr)
                self.sent_bytes += len(d)
                self.c.add("junk", ok=1)
            except OSError as ex:
                self.c.bump("junk.send-errors")
                if ex.errno not in (11, 105):  # EAGAIN, ENOBUFS: the local queue, not h3gate
                    self.c.add("junk", err=1, why=f"sendto: {ex}")
            self.drain()
            nxt += gap
            self.soak.stop.wait(max(0.0, nxt - time.monotonic()))
        time.sleep(0.2)
        self.drain()
        if self.reply_bytes > self.sent_bytes:
            self.c.add("junk", err=1, why=f"amplification: {self.reply_bytes} bytes answered to "
                                           f"{self.sent_bytes} bytes of junk")
            self.sent_bytes = self.reply_bytes = 0

    def drain(self):
        for s in self.socks:
            while True:
                try:
                    b = s.recv(65535)
                except OSError:
                    break
                self.reply_bytes += len(b)
                self.c.bump("junk.replies")
                self.c.bump("junk.reply-bytes", len(b))


# ---------------------------------------------------------------------------------------------
# The soak
# ---------------------------------------------------------------------------------------------

def stats(port):
    """Sum over workers of h3gate's /stats JSON (None when the endpoint does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=3) as r:
            j = json.loads(r.read())
    except Exception:  # noqa: BLE001 - a missing sample is shown as n/a
        return None
    tot = {}
    for w in j["workers"]:
        for k, v in w.items():
            if isinstance(v, (int, float)) and k != "worker":
                tot[k] = tot.get(k, 0) + v
    return tot


class Soak:
    def __init__(self, args, d):
        self.args, self.dir = args, d
        self.stop = threading.Event()
        # Set during the mid-run quiet point: loops start nothing new until it is cleared.
        self.hold = threading.Event()
        self.counters = Counters(os.path.join(d, "errors.log"))
        self.samples = []  # (elapsed, rss KiB, stats dict or None, cpu s)
        self.children = []

    def url(self, path):
        return f"https://localhost:{self.port}{path}"

    def start(self):
        d = self.dir
        subprocess.run([os.path.join(ROOT, "tools", "mkcert"), d], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.origin_port = free_port(socket.SOCK_STREAM)
        o = Child("origin", [ORIGIN, "--quiet", "--listen", f"127.0.0.1:{self.origin_port}"],
                  os.path.join(d, "origin.log"))
        self.children.append(o)
        self.origin = o
        end = time.monotonic() + 10
        while "origin listening on" not in o.text():
            if not o.alive() or time.monotonic() > end:
                raise RuntimeError(f"origin did not start:\n{o.tail()}")
            time.sleep(0.05)
        self.port = free_port(socket.SOCK_DGRAM)
        self.proxy_addr = ("127.0.0.1", self.port)
        self.stats_port = free_port(socket.SOCK_STREAM)
        user = "    user root\n" if os.geteuid() == 0 else ""
        conf = os.path.join(d, "h3gate.conf")
        with open(conf, "w") as f:
            f.write(f"""global
    workers 2
    max-memory {self.args.max_memory}
    access-log off
{user}defaults
    timeout connect 5s
    timeout server 30s
    timeout client 30s
    timeout drain 2s
    timeout handshake 10s
frontend soak
    bind 127.0.0.1:{self.port}
    cert {d}/cert.pem
    key {d}/key.pem
    default_backend origin
backend origin
    server o1 127.0.0.1:{self.origin_port}
stats
    bind 127.0.0.1:{self.stats_port}
""")
        self.conf = conf
        p = Child("h3gate", [H3GATE, "run", "-c", conf, "-l", self.args.log_level], os.path.join(d, "h3gate.log"))
        self.children.append(p)
        self.proxy = p
        end = time.monotonic() + 20
        while True:
            if not p.alive():
                raise RuntimeError(f"h3gate exited at start:\n{p.tail()}")
            if p.text().count("serving on") >= 2 and stats(self.stats_port) is not None:
                rc, out, err, _ = run([H3GET, "--insecure", "--sha256", "--timeout", "3",
                                       self.url("/bytes/1000")], 10)
                if rc == 0 and check_lines(out, [pattern_line(1000)]):
                    break
            if time.monotonic() > end:
                raise RuntimeError(f"h3gate not ready after 20 s:\n{p.tail()}")
            time.sleep(0.2)

    def sample(self, t0):
        st = stats(self.stats_port)
        try:
            rss, cpu = proc_kib(self.proxy.pid), proc_cpu(self.proxy.pid)
        except OSError:
            rss, cpu = None, None
        s = (time.monotonic() - t0, rss, st, cpu)
        self.samples.append(s)
        return s

    def row(self, s, cpu0, last):
        el, rss, st, cpu = s
        ok, err, _ = self.counters.snapshot()
        g = (lambda k: st.get(k, 0)) if st else (lambda k: None)
        cpu_pct = None
        if cpu is not None and last is not None and last[3] is not None and el > last[0]:
            cpu_pct = (cpu - last[3]) / (el - last[0]) * 100
        cells = [f"{el:4.0f}", fmt(rss / 1024 if rss else None), fmt(g("connections")),
                 fmt(g("streams")), fmt(g("backend_connections")),
                 fmt(g("budget_used_bytes") / 1048576 if st else None), fmt(cpu_pct, 0)]
        for c in CLASSES:
            cells.append(f"{ok[c]}/{err[c]}")
        cells.append(fmt(g("responses_5xx")))
        return "| " + " | ".join(cells) + " |"

    def header(self):
        cols = ["t (s)", "RSS MiB", "conns", "streams", "backend", "budget MiB", "CPU %"]
        cols += [f"{c} ok/err" for c in CLASSES] + ["5xx"]
        return ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]


def fmt(v, digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def busy(st):
    """Backend connections carrying an exchange (0 when the proxy does not tell idle ones apart:
    then only the wait for the pool to empty checks them)."""
    if "backend_connections_idle" not in st:
        return 0
    return st["backend_connections"] - st["backend_connections_idle"]


def wait_idle(soak, limit_s):
    """Seconds until no connection, stream or busy backend connection is left, or None."""
    t0 = time.monotonic()
    while soak.proxy.alive() and time.monotonic() - t0 < limit_s:
        st = stats(soak.stats_port)
        if st and st["connections"] == 0 and st["streams"] == 0 and busy(st) == 0:
            return time.monotonic() - t0
        time.sleep(0.5)
    return None


def median(xs):
    return statistics.median(xs) if xs else None


def slope_per_min(pts):
    """Least-squares slope of (t s, MiB) points, MiB per minute."""
    if len(pts) < 3:
        return None
    mt = sum(t for t, _ in pts) / len(pts)
    mv = sum(v for _, v in pts) / len(pts)
    den = sum((t - mt) ** 2 for t, _ in pts)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in pts) / den * 60


def main():
    ap = argparse.ArgumentParser(description="h3gate soak test (run via bench/soak)")
    ap.add_argument("minutes", nargs="?", type=float, default=10.0, help="load duration (default 10)")
    ap.add_argument("--seed", type=int, default=8, help="RNG seed (default 8)")
    ap.add_argument("--get-rps", type=int, default=100, help="h3load request rate (default 100)")
    ap.add_argument("--junk-rate", type=float, default=100.0, help="junk datagrams/s (default 100)")
    ap.add_argument("--max-memory", default="128m", help="h3gate max-memory (default 128m)")
    ap.add_argument("--rebind-loops", type=int, default=1, help="concurrent rebind loops (default 1)")
    ap.add_argument("--log-level", default="info", help="h3gate -l (default info; access log off)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "soak.md"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    command = "bench/soak" + "".join(" " + shlex.quote(x) for x in sys.argv[1:])
    for b in (H3GATE, H3GET, H3LOAD, ORIGIN):
        if not os.access(b, os.X_OK):
            sys.exit(f"soak: {b} missing: run bench/soak (it builds), or cargo build --release --bins")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell starts background jobs with SIGINT ignored, which Python inherits.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    d = tempfile.mkdtemp(prefix="h3gate-soak-")
    soak = Soak(a, d)
    lines = []  # the table
    problems = []
    result = {}
    started = datetime.datetime.now(datetime.timezone.utc)

    def out(line=""):
        print(line, flush=True)
        lines.append(line)

    loops = []
    try:
        soak.start()
        log(f"h3gate pid {soak.proxy.pid} on udp/{soak.port} (stats tcp/{soak.stats_port}), origin "
            f"tcp/{soak.origin_port}, {a.minutes:g} min, seed {a.seed}, files in {d}")
        t0 = time.monotonic()
        soak.counters.t0 = t0
        soak.end = t0 + a.minutes * 60
        first = soak.sample(t0)
        rss0 = first[1]
        cpu0 = first[3]
        for row in soak.header():
            out(row)
        out(soak.row(first, cpu0, None))
        kinds = [GetLoop, VerifyLoop, UploadLoop, RebindLoop, AbortLoop, AbortLoop, JunkLoop]
        kinds += [RebindLoop] * (a.rebind_loops - 1)
        for i, k in enumerate(kinds):
            lp = k(f"{k.cls}-{i}", soak, a.seed * 1000 + i)
            loops.append(lp)
            lp.start()
        last_row = first
        next_row = t0 + ROW_EVERY
        total = a.minutes * 60
        quiet_at = t0 + max(total / 3, min(WARMUP_S, total / 2))
        while time.monotonic() < soak.end:
            if quiet_at is not None and time.monotonic() >= quiet_at:
                # Mid-run quiet point: the same measurement as after the load, for comparison.
                quiet_at = None
                log("quiet point: holding the loops until the proxy is idle")
                soak.hold.set()
                h0 = time.monotonic()
                idle = wait_idle(soak, QUIESCE_S + 30) is not None
                time.sleep(1.0)  # as after the load: the worker's malloc_trim once idle
                q = soak.sample(t0)
                result["mid_quiet_rss_kib"] = q[1] if idle else None
                result["mid_quiet_t"] = q[0]
                out(soak.row(q, cpu0, None))
                soak.hold.clear()
                soak.end += time.monotonic() - h0  # the pause does not count as load time
                continue
            soak.stop.wait(min(SAMPLE_EVERY, max(0.0, soak.end - time.monotonic())))
            s = soak.sample(t0)
            if not soak.proxy.alive():
                problems.append(f"h3gate died during the load:\n{soak.proxy.tail(40)}")
                break
            if time.monotonic() >= next_row - 0.5:
                out(soak.row(s, cpu0, last_row))
                last_row = s
                next_row += ROW_EVERY
        load_end = time.monotonic()
        log("load time over: waiting for the loops to finish their last request")
        soak.stop.set()
        for lp in loops:
            lp.join(max(1.0, 90 - (time.monotonic() - load_end)))
        stuck = [lp.name for lp in loops if lp.is_alive()]
        if stuck:
            problems.append(f"loops still running 90 s after the end: {', '.join(stuck)}")
        with LOCK:
            CLOSED.set()
            left = list(RUNNING)
        for p in left:
            killpg(p)
        s = soak.sample(t0)
        out(soak.row(s, cpu0, last_row))
        load_s = load_end - t0
        cpu_load = (s[3] - cpu0) if s[3] is not None else None

        result["client_cpu"] = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
        log("load stopped: waiting for quiescence")
        # Quiescence: QUIC connections and streams first, then the backend pool (the origin
        # closes idle keep-alive connections after 60 s), then the budget.
        q0 = time.monotonic()
        result["quiet_s"] = wait_idle(soak, QUIESCE_S)
        bquiet = None
        while soak.proxy.alive() and time.monotonic() - q0 < BACKEND_QUIESCE_S:
            st = stats(soak.stats_port)
            if st and st["backend_connections"] == 0 and st["connections"] == 0:
                bquiet = time.monotonic() - q0
                break
            time.sleep(0.5)
        result["backend_quiet_s"] = bquiet
        time.sleep(1.0)  # a publish period or four, and the worker's malloc_trim after the peak
        fin = soak.sample(t0)
        out(soak.row(fin, cpu0, None))
        result["final_stats"] = fin[2]
        result["final_rss_kib"] = fin[1]
        # One last verified GET through the proxy.
        alive = soak.proxy.alive()
        final_get = False
        if alive:
            CLOSED.clear()
            rc, o, e, _ = run([H3GET, "--insecure", "--sha256", "--timeout", "10",
                               soak.url("/bytes/1048576")], 20)
            CLOSED.set()
            final_get = rc == 0 and check_lines(o, [pattern_line(1048576)])
            if not final_get:
                problems.append(explain(["h3get", "/bytes/1048576"], rc, o, e, "final GET failed"))
        result.update(alive=alive and soak.proxy.alive(), final_get=final_get, load_s=load_s,
                      cpu_load=cpu_load, rss0=rss0)
    except KeyboardInterrupt as ex:
        problems.append(f"interrupted ({ex})")
        log(f"interrupted ({ex})")
    except RuntimeError as ex:
        problems.append(str(ex))
        log(f"error: {ex}")
    finally:
        soak.stop.set()
        with LOCK:
            CLOSED.set()
            left = list(RUNNING)
        for p in left:
            killpg(p)
        for ch in reversed(soak.children):
            ch.stop()

    # ---------------- verdict ----------------
    ok, err, extra = soak.counters.snapshot()
    verdict_lines, passed = verdict(soak, result, ok, err, problems)
    out()
    for ln in verdict_lines:
        out(ln)
    if soak.counters.errors:
        log(f"{len(soak.counters.errors)} error report(s) in {soak.counters.errlog}; the first:")
        for el, cls, why in soak.counters.errors[:5]:
            print(f"--- {el:.1f} s {cls}\n{why}", file=sys.stderr)
    for p in problems:
        log(f"PROBLEM: {p}")
    if not any(p.startswith("interrupted") for p in problems):
        write_md(a, command, started, lines, extra, result)
    keep = a.keep or not passed
    if keep:
        log(f"kept {d} (h3gate.log, origin.log, errors.log)")
    else:
        subprocess.run(["rm", "-rf", d])
    sys.exit(0 if passed else 1)


def verdict(soak, r, ok, err, problems):
    L = []
    checks = []
    real = {c: err[c] for c in CLASSES}
    errs = sum(v for c, v in real.items())
    checks.append((errs == 0, "no errors: " + ", ".join(f"{c} {ok[c]} ok / {err[c]} err" for c in CLASSES)
                   + " (abort and junk are injected: their errors are wrong answers and amplification)"))
    # Memory: thirds of the load period, the first one being warm-up.
    load_s = r.get("load_s")
    pts = [(t, k / 1024) for (t, k, _, _) in soak.samples if k and load_s and t <= load_s]
    if load_s and len(pts) >= 6:
        m2 = median([v for t, v in pts if load_s / 3 <= t < 2 * load_s / 3])
        m3 = median([v for t, v in pts if t >= 2 * load_s / 3])
        slope = slope_per_min([(t, v) for t, v in pts if t >= load_s / 3])
        peak = max(v for _, v in pts)
        fin = r["final_rss_kib"] / 1024 if r.get("final_rss_kib") else None
        back = fin is not None and fin <= m2 + FINAL_MIB
        # Under load RSS follows the load of the moment (buffers in flight, quiche state of
        # the live connections, the heap trimmed whenever a worker goes idle): its medians are
        # printed, not judged. Retained memory is judged at two points of equal load, none:
        # the quiet point after the first third and the end, each idle and trimmed.
        mq = r.get("mid_quiet_rss_kib")
        mq = mq / 1024 if mq else None
        flat = mq is not None and fin is not None and fin <= mq + FLAT_MIB
        short = load_s < MEMORY_VERDICT_MIN * 60
        if short:
            # A short run is a smoke test: its quiet point falls in warm-up.
            flat = True
        checks.append((flat, ("(info, run shorter than "
                              f"{MEMORY_VERDICT_MIN:g} min: not judged) " if short else "")
                             + f"memory flat: idle RSS {fmt(mq)} MiB at the quiet point "
                             f"(t={r.get('mid_quiet_t', 0):.0f} s) -> {fmt(fin)} MiB after the "
                             f"load, {(fin - mq) if (fin is not None and mq is not None) else 0:+.1f} "
                             f"MiB (limit {FLAT_MIB:g})"))
        checks.append((True, f"(info) RSS under load: median {m2:.1f} MiB (2nd third) -> "
                             f"{m3:.1f} MiB (last third), {m3 - m2:+.1f} MiB; slope after warm-up "
                             f"{slope:+.2f} MiB/min; start {r['rss0'] / 1024:.1f} MiB, peak "
                             f"{peak:.1f} MiB"))
        checks.append((back or short, f"RSS after quiescence {fmt(fin)} MiB <= 2nd-third median + "
                             f"{FINAL_MIB:g} = {m2 + FINAL_MIB:.1f} MiB"))
    else:
        checks.append((False, "memory: not enough samples"))
    st = r.get("final_stats")
    q = r.get("quiet_s")
    bq = r.get("backend_quiet_s")
    if st:
        checks.append((q is not None, f"connections, streams and busy backend connections back to 0: "
                                      + (f"after {q:.1f} s" if q is not None else f"not within {QUIESCE_S:g} s")))
        checks.append((bq is not None, "backend connections back to 0 (origin closes idle ones after "
                                       "60 s): " + (f"after {bq:.1f} s" if bq is not None
                                                    else f"not within {BACKEND_QUIESCE_S:g} s")))
        checks.append((st.get("budget_used_bytes", 1) == 0,
                       f"memory budget in use back to 0: {st.get('budget_used_bytes')} bytes "
                       f"(peak {st.get('budget_peak_bytes', 0) / 1048576:.1f} MiB)"))
        L.append(f"final: connections {st['connections']}, streams {st['streams']}, backend "
                 f"{st['backend_connections']}, budget {st['budget_used_bytes']} B; proxy totals: "
                 f"2xx {st.get('responses_2xx')}, 4xx {st.get('responses_4xx')}, 5xx "
                 f"{st.get('responses_5xx')}, accepted {st.get('conns_accepted')}, "
                 f"dropped unparsable {st.get('dropped_unparsable')}, unknown CID "
                 f"{st.get('dropped_unknown')}, stateless resets {st.get('stateless_resets')}, "
                 f"version negotiations {st.get('version_negotiations')}, migrations "
                 f"{st.get('migrations')}")
    else:
        checks.append((False, "no final /stats sample"))
    if st and ok["rebind"]:
        checks.append((st.get("migrations", 0) > 0,
                       f"rebinding exercised: h3gate counted {st.get('migrations', 0)} migrations "
                       f"for {ok['rebind']} rebinding downloads"))
    checks.append((bool(r.get("alive")) and bool(r.get("final_get")),
                   "h3gate alive at the end and serves a final verified GET"
                   if r.get("alive") and r.get("final_get") else "h3gate dead or final GET failed"))
    if r.get("cpu_load") is not None and r.get("load_s"):
        L.append(f"proxy CPU during the load: {r['cpu_load']:.0f} s in {r['load_s']:.0f} s = "
                 f"{r['cpu_load'] / r['load_s'] * 100:.0f}% of one core; load generators (h3load, "
                 f"h3get) {r['client_cpu'] / r['load_s'] * 100:.0f}% of one core")
    for p in problems:
        checks.append((False, "problem: " + p.strip().splitlines()[0]))
    passed = all(c for c, _ in checks)
    for c, text in checks:
        L.append(f"- [{'x' if c else ' '}] {text}")
    L.append(f"VERDICT: {'PASS' if passed else 'FAIL'}")
    return L, passed


def write_md(a, command, started, lines, extra, result):
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    try:
        commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                                capture_output=True, timeout=10).stdout.decode().strip()
    except Exception:  # noqa: BLE001
        commit = "?"
    ex = ", ".join(f"{k} {v}" for k, v in sorted(extra.items()) if not k.endswith("bytes"))
    md = [f"## soak", "",
          f"Made by `{command}` on {started:%Y-%m-%d %H:%M} UTC: {os.cpu_count()} cores, Linux "
          f"{platform.release()}, h3gate {commit} (`workers 2`, `max-memory {a.max_memory}`), "
          f"seed {a.seed}, h3load at {a.get_rps} req/s, junk at {a.junk_rate:g} datagrams/s. "
          "RSS is VmRSS; conns/streams/backend/budget are summed over the workers from `/stats`; "
          "CPU is the proxy's over the last row's interval; ok/err count requests (abort: "
          "clients that went away; junk: datagrams sent). The last rows are after the load "
          "stopped, and after quiescence.", "", *lines, "", f"Injected: {ex}.", ""]
    with open(a.out, "w") as f:
        f.write("\n".join(md))
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
