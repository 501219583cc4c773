#!/usr/bin/env python3
"""Soak benchmark: runs the release daemon under mixed traffic for a while and
checks that its memory, file descriptors and threads stay flat, that every
message got exactly its reply, and that it stops cleanly.

    python3 benches/soak.py [--minutes N] [--bin PATH] [--sample-every S] [--keep]

Python 3.11 standard library only; works from any directory. It does not
build anything: it runs an existing binary (default target/release/pyipcd
under the repository root).

What runs, for the whole duration (all clients are threads of this script):

- `[[tcp.server]] pool` (len32, dispatch = "pool"): 8 client connections,
  4 long-lived and 4 reconnecting every 100-500 messages; pipelined batches
  of 1-8 messages of 1 B to 64 KiB; the handler reverses the message and
  every reply is compared byte for byte (each message carries its client
  and sequence number, so a stale or misrouted reply cannot match).
- `[[tcp.server]] inline` (line framing, dispatch = "inline"): the same, with
  text messages (no newline).
- `[[tcp.client]] feed`: a Python producer in the daemon yields numbered,
  CRC-carrying len32 messages (0 B to 60 KB); the upstream is a TCP server
  run by this script that closes (gracefully: half-close, read to EOF) and
  reopens its port every ~20 s. It checks every message: CRC, sequence =
  previous + 1 (no gap, no duplicate, no reordering), and that messages
  arrive again after each restart. It acks each message; the daemon's
  `on_reply` raises on a malformed or non-increasing ack (counted in
  /metrics errors).
- `[[shm.region]] shm` (mode = "channel"): one python/pyipcd_shm.py client
  doing call() in a loop (1 B to 64 KiB, reply = reversed request),
  re-attaching every 500-3000 calls.
- SIGHUP every 30 s: odd reloads toggle `pipeline` (64/32) on the pool
  server (the role is replaced: its listener is kept, its open connections
  drain on the old instance for `reload_drain` = 15 s and are then closed),
  even reloads leave the file unchanged (nothing is replaced). Each reload's
  "reloaded: ..." log line is checked against what should have happened.
  A pool-server connection closed by the daemon counts as a drain close only
  when a replacing reload happened after it opened and at least
  reload_drain - 1 s before; requests it had sent that were not answered
  then are counted (the daemon closes after answering what it read), and
  the end-of-run cross-check with /metrics (messages the role counted ==
  replies verified) shows that none of them had been read.

Every --sample-every seconds one line: daemon RSS, fds, threads, message and
error counts. At the end: the samples as a markdown table and the verdicts
(bounds are printed with them). Exit status 0 when every verdict passes, 1
when one fails, 2 when the run could not be set up.
"""

import argparse
import collections
import ctypes
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))
import pyipcd_shm  # noqa: E402

MiB = 1024 * 1024
RELOAD_EVERY = 30.0  # s between SIGHUPs
RELOAD_DRAIN = 15.0  # [daemon] reload_drain
UPSTREAM_UP = 18.0  # s the upstream listens, then it is down for UPSTREAM_DOWN
UPSTREAM_DOWN = 2.0
SOCK_TIMEOUT = 30.0  # every client socket operation
# Bounds (see the verdicts at the end and the notes printed with them).
RSS_GROWTH_MAX = 8 * MiB  # max RSS after warm-up - RSS at the end of warm-up
RSS_TREND_MAX = 2 * MiB  # mean of the last third - mean of the first third
FD_SLACK = 12
THREAD_SLACK = 4
FIRST_MSG_AFTER_RESTART_MAX = 5.0  # s from the upstream reopening to its first message

T0 = time.monotonic()


def now():
    return time.monotonic() - T0


# --------------------------------------------------------------------------
# Shared counters


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = collections.Counter()
        self.errors = []
        self.nerrors = 0

    def add(self, key, n=1):
        with self.lock:
            self.c[key] += n

    def error(self, where, msg):
        with self.lock:
            self.nerrors += 1
            self.c[f"{where}.errors"] += 1
            if len(self.errors) < 40:
                self.errors.append(f"t={now():.1f}s {where}: {msg}")

    def snapshot(self):
        with self.lock:
            return collections.Counter(self.c), self.nerrors


STATS = Stats()
STOP = threading.Event()  # stops the traffic
UPSTREAM_STOP = threading.Event()  # stops the upstream (after the daemon)


# --------------------------------------------------------------------------
# The daemon's files


HANDLERS = r'''
"""soak.py's handlers (written to a temp dir by benches/soak.py)."""
import itertools
import random
import re
import struct
import zlib


def rev_pool(data):
    return data[::-1]


def rev_inline(data):
    return data[::-1]


def rev_shm(data):
    return data[::-1]


# Module-level, so the numbering would go on even across a new generator.
_seq = itertools.count(1)


def produce():
    rng = random.Random(20261202)
    while True:
        n = next(_seq)
        r = rng.random()
        if r < 0.7:
            size = rng.randint(0, 64)
        elif r < 0.98:
            size = rng.randint(65, 4096)
        else:
            size = rng.randint(4097, 60000)
        payload = rng.randbytes(size)
        yield struct.pack(">QI", n, zlib.crc32(payload)) + payload


_last_ack = 0
_ACK = re.compile(rb"ack:(\d+)")


def on_ack(data):
    global _last_ack
    m = _ACK.fullmatch(data)
    if m is None:
        raise ValueError(f"malformed ack {bytes(data[:40])!r}")
    n = int(m.group(1))
    if n <= _last_ack:
        raise ValueError(f"ack {n} after ack {_last_ack}")
    _last_ack = n
'''


def config_text(d, ports, pipeline):
    return f"""# Written by benches/soak.py
[log]
level = "info"
format = "text"

[daemon]
shutdown_grace = "5s"
reload_drain = "{int(RELOAD_DRAIN)}s"

[admin]
listen = "127.0.0.1:{ports['admin']}"

[python]
paths = ["{d}"]
workers = 2
call_timeout = "10s"

[[tcp.server]]
name = "pool"
listen = "127.0.0.1:{ports['pool']}"
framing = "len32"
handler = "soak_handlers:rev_pool"
dispatch = "pool"
max_message = "1MiB"
pipeline = {pipeline}

[[tcp.server]]
name = "inline"
listen = "127.0.0.1:{ports['inline']}"
framing = "line"
handler = "soak_handlers:rev_inline"
dispatch = "inline"
max_message = "1MiB"

[[tcp.client]]
name = "feed"
connect = "127.0.0.1:{ports['upstream']}"
framing = "len32"
producer = "soak_handlers:produce"
on_reply = "soak_handlers:on_ack"
interval = "5ms"
connect_timeout = "2s"
backoff_min = "50ms"
backoff_max = "500ms"
outbox = 1024

[[shm.region]]
name = "shm"
mode = "channel"
path = "{d}/channel.shm"
handler = "soak_handlers:rev_shm"
ring_size = "1MiB"
max_message = "64KiB"
"""


def write_config(path, text):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # the daemon never reads a half-written file


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------
# Messages


class Payloads:
    """Random bytes to cut messages from: binary for len32, text for lines."""

    def __init__(self):
        rng = random.Random(7)
        self.binary = rng.randbytes(256 * 1024)
        alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-_=+*/()[]{}<>"
        self.text = bytes(rng.choices(alphabet, k=256 * 1024))


PAYLOADS = Payloads()


def message_size(rng):
    r = rng.random()
    if r < 0.6:
        return rng.randint(1, 256)
    if r < 0.9:
        return rng.randint(257, 8192)
    if r < 0.99:
        return rng.randint(8193, 65535)
    return 65536


def make_message(rng, size, text, tag):
    src = PAYLOADS.text if text else PAYLOADS.binary
    off = rng.randrange(len(src) - size)
    body = bytearray(src[off : off + size])
    # A unique tag (client, sequence) at the front when there is room: a
    # reply meant for another request cannot equal this one's.
    t = tag[:size]
    body[: len(t)] = t
    return bytes(body)


# --------------------------------------------------------------------------
# TCP clients of the two servers


class ServerClosed(Exception):
    pass


class Reader:
    def __init__(self, sock, framing):
        self.s = sock
        self.framing = framing
        self.buf = bytearray()
        self.scan = 0

    def _fill(self):
        try:
            d = self.s.recv(256 * 1024)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as e:
            raise ServerClosed(f"{type(e).__name__}: {e}") from None
        if not d:
            raise ServerClosed("EOF")
        self.buf += d

    def read(self):
        buf = self.buf
        if self.framing == "len32":
            while len(buf) < 4:
                self._fill()
            (n,) = struct.unpack_from(">I", buf)
            while len(buf) < 4 + n:
                self._fill()
            msg = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            return msg
        while True:
            i = buf.find(b"\n", self.scan)
            if i >= 0:
                msg = bytes(buf[:i])
                del buf[: i + 1]
                self.scan = 0
                return msg
            self.scan = len(buf)
            self._fill()


def frame(msg, framing):
    if framing == "len32":
        return struct.pack(">I", len(msg)) + msg
    return msg + b"\n"


class Reloads:
    """When the pool role was replaced (to tell drain closes from errors)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.replaced = []  # (t, set of roles)

    def record(self, t, roles):
        with self.lock:
            self.replaced.append((t, set(roles)))

    def drain_close_allowed(self, role, opened, closed):
        with self.lock:
            return any(
                role in roles and t > opened and closed >= t + RELOAD_DRAIN - 1.0
                for t, roles in self.replaced
            )


RELOADS = Reloads()


def tcp_client(role, idx, port, framing, reconnect):
    name = f"{role}#{idx}"
    rng = random.Random(zlib.crc32(f"{role}#{idx}".encode()))
    text = framing == "line"
    seq = 0
    while not STOP.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=SOCK_TIMEOUT)
        except OSError as e:
            STATS.error(name, f"connect failed: {e}")
            STOP.wait(0.5)
            continue
        s.settimeout(SOCK_TIMEOUT)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        opened = now()
        STATS.add(f"{role}.connects")
        reader = Reader(s, framing)
        budget = rng.randint(100, 500) if reconnect else None
        done = 0
        batch, answered = [], 0
        try:
            while not STOP.is_set() and (budget is None or done < budget):
                batch, total = [], 0
                for _ in range(rng.randint(1, 8)):
                    size = message_size(rng)
                    tag = b"%s:%d:%d:" % (role.encode(), idx, seq)
                    seq += 1
                    batch.append(make_message(rng, size, text, tag))
                    total += size
                    if total > 64 * 1024:
                        break
                answered = 0
                STATS.add(f"{role}.sent", len(batch))
                try:
                    s.sendall(b"".join(frame(m, framing) for m in batch))
                except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as e:
                    raise ServerClosed(f"sending: {type(e).__name__}: {e}") from None
                for m in batch:
                    reply = reader.read()
                    if reply != m[::-1]:
                        STATS.error(
                            name,
                            f"wrong reply: sent {len(m)} B {m[:24]!r}..., got {len(reply)} B {reply[:24]!r}...",
                        )
                        raise ConnectionAbortedError("desynchronised")
                    answered += 1
                STATS.add(f"{role}.ok", len(batch))
                STATS.add(f"{role}.bytes", 2 * total)
                done += len(batch)
                batch, answered = [], 0
        except ServerClosed as e:
            STATS.add(f"{role}.ok", answered)  # verified before the close
            unanswered = len(batch) - answered
            if RELOADS.drain_close_allowed(role, opened, now()):
                STATS.add(f"{role}.drain_closes")
                STATS.add(f"{role}.unanswered_at_drain", unanswered)
            else:
                STATS.error(
                    name,
                    f"connection closed by the daemon ({e}) after {done + answered} replies, "
                    f"{unanswered} request(s) unanswered, opened at t={opened:.1f}s",
                )
        except socket.timeout:
            STATS.error(name, f"no reply within {SOCK_TIMEOUT}s ({len(batch) - answered} outstanding)")
        except ConnectionAbortedError:
            pass  # already counted
        except OSError as e:
            STATS.error(name, f"{type(e).__name__}: {e}")
        finally:
            s.close()


# --------------------------------------------------------------------------
# shm channel client


def shm_client(path):
    rng = random.Random(99)
    seq = 0
    while not STOP.is_set():
        try:
            c = pyipcd_shm.Client(str(path), timeout=10.0)
        except Exception as e:
            STATS.error("shm", f"attach: {type(e).__name__}: {e}")
            STOP.wait(0.5)
            continue
        STATS.add("shm.attaches")
        try:
            for _ in range(rng.randint(500, 3000)):
                if STOP.is_set():
                    break
                size = min(message_size(rng), c.max_message)
                msg = make_message(rng, size, False, b"shm:%d:" % seq)
                seq += 1
                STATS.add("shm.sent")
                reply = c.call(msg)
                if reply != msg[::-1]:
                    got = "None" if reply is None else f"{len(reply)} B {reply[:24]!r}"
                    STATS.error("shm", f"wrong reply: sent {len(msg)} B {msg[:24]!r}, got {got}")
                    break
                STATS.add("shm.ok")
                STATS.add("shm.bytes", 2 * size)
        except Exception as e:
            STATS.error("shm", f"{type(e).__name__}: {e}")
        finally:
            c.close()


# --------------------------------------------------------------------------
# The tcp.client role's upstream


class Upstream:
    """Listens for UPSTREAM_UP s, closes (gracefully), stays down for
    UPSTREAM_DOWN s, and again. Checks every message of the `feed` role."""

    def __init__(self, port):
        self.port = port
        self.periods = []  # dicts: start, end, msgs, first (delay to the first message)
        self.expected = 1
        self.lock = threading.Lock()
        self.ready = threading.Event()

    def run(self):
        while not UPSTREAM_STOP.is_set():
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                ls.bind(("127.0.0.1", self.port))
            except OSError as e:
                STATS.error("upstream", f"cannot bind {self.port}: {e}")
                UPSTREAM_STOP.wait(1)
                continue
            ls.listen(16)
            ls.settimeout(0.2)
            period = {"start": now(), "end": None, "msgs": 0, "first": None, "conns": 0}
            with self.lock:
                self.periods.append(period)
            self.ready.set()
            conns = []
            until = time.monotonic() + UPSTREAM_UP
            while not UPSTREAM_STOP.is_set() and time.monotonic() < until:
                try:
                    c, _ = ls.accept()
                except socket.timeout:
                    continue
                except OSError as e:
                    STATS.error("upstream", f"accept: {e}")
                    continue
                period["conns"] += 1
                state = {"closing": False, "lock": threading.Lock()}
                t = threading.Thread(target=self.serve, args=(c, period, state), daemon=True)
                t.start()
                conns.append((c, t, state))
            ls.close()
            # Graceful stop: half-close and read what the daemon still sends
            # until it closes its side: nothing it wrote is dropped here.
            for c, t, state in conns:
                with state["lock"]:
                    state["closing"] = True
                    try:
                        c.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
            for c, t, state in conns:
                t.join(8)
                if t.is_alive():
                    STATS.error("upstream", "the daemon did not close its connection within 8 s of a half-close")
                    try:
                        c.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    t.join(2)
            period["end"] = now()
            STATS.add("upstream.restarts")
            UPSTREAM_STOP.wait(UPSTREAM_DOWN)

    def serve(self, c, period, state):
        c.settimeout(1.0)
        buf = bytearray()
        closing_since = None
        try:
            while True:
                try:
                    d = c.recv(256 * 1024)
                except socket.timeout:
                    if state["closing"]:
                        closing_since = closing_since or time.monotonic()
                        if time.monotonic() - closing_since > 7:
                            return
                    continue
                except OSError as e:
                    if not state["closing"] and not UPSTREAM_STOP.is_set():
                        STATS.error("upstream", f"recv: {type(e).__name__}: {e}")
                    return
                if not d:
                    if buf:
                        STATS.add("upstream.partial_frames")
                    return
                buf += d
                acks = []
                while len(buf) >= 4:
                    (n,) = struct.unpack_from(">I", buf)
                    if len(buf) < 4 + n:
                        break
                    body = bytes(buf[4 : 4 + n])
                    del buf[: 4 + n]
                    seq = self.check(body, period)
                    if seq is not None:
                        acks.append(b"ack:%d" % seq)
                if acks:
                    with state["lock"]:
                        if not state["closing"]:
                            try:
                                c.sendall(b"".join(struct.pack(">I", len(a)) + a for a in acks))
                            except OSError:
                                pass
        finally:
            c.close()

    def check(self, body, period):
        if len(body) < 12:
            STATS.error("upstream", f"malformed message ({len(body)} B)")
            return None
        seq, crc = struct.unpack_from(">QI", body)
        payload = body[12:]
        if zlib.crc32(payload) != crc:
            STATS.error("upstream", f"message {seq}: CRC mismatch ({len(payload)} B payload)")
            return None
        with self.lock:
            if seq != self.expected:
                kind = "duplicate/reordered" if seq < self.expected else "gap (lost)"
                STATS.error("upstream", f"{kind}: got message {seq}, expected {self.expected}")
            self.expected = max(self.expected, seq + 1)
            period["msgs"] += 1
            if period["first"] is None:
                period["first"] = now() - period["start"]
        STATS.add("upstream.msgs")
        STATS.add("upstream.bytes", len(body))
        return seq


# --------------------------------------------------------------------------
# The daemon


def http_get(port, path, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def metrics(port):
    out = {}
    try:
        status, text = http_get(port, "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    for line in text.splitlines():
        m = METRIC.match(line)
        if m:
            try:
                out[(m.group(1), m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


def metric_sum(ms, name, label_filter=""):
    if not ms:
        return 0
    return sum(v for (n, labels), v in ms.items() if n == name and label_filter in labels)


def proc_status(pid):
    rss = threads = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds, threads


def _pdeathsig():
    # The daemon dies with this script, even if it is SIGKILLed.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Daemon:
    def __init__(self, binary, cfg, log):
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PYIPCD__")
            and k not in ("RUST_LOG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        self.log_path = log
        self.logf = open(log, "wb")
        self.proc = subprocess.Popen(
            [str(binary), "run", "-c", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the script only; it stops the daemon
            preexec_fn=_pdeathsig,
        )
        self.pid = self.proc.pid

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.logf.close()


def wait_healthy(daemon, admin_port, timeout=30.0):
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            return f"the daemon exited with status {daemon.proc.returncode}"
        try:
            status, body = http_get(admin_port, "/health", timeout=2.0)
            if status == 200:
                return None
            last = f"{status} {body[:300]}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    return f"not healthy within {timeout:.0f} s: {last}"


RELOADED = re.compile(r"reloaded: started \[(.*?)\], replaced \[(.*?)\], stopped \[(.*?)\], failed \[(.*?)\]")


def roles_of(s):
    return {x.strip().strip('"') for x in s.split(",") if x.strip()}


def reloader(daemon, cfg_path, d, ports, plan):
    """SIGHUP every RELOAD_EVERY s; odd reloads toggle the pool server's
    `pipeline`, even ones change nothing. Checks each "reloaded:" log line."""
    pipeline = 64
    n = 0
    while not STOP.wait(RELOAD_EVERY - (now() - plan["start"]) % RELOAD_EVERY):
        if plan["end"] - now() < 5.0:
            continue  # not in the last seconds: the run is about to stop
        n += 1
        expect = set()
        if n % 2 == 1:
            pipeline = 32 if pipeline == 64 else 64
            expect = {"pool"}
        write_config(cfg_path, config_text(d, ports, pipeline))
        before = len(RELOADED.findall(daemon.log_text()))
        t = now()
        os.kill(daemon.pid, signal.SIGHUP)
        STATS.add("reloads")
        deadline = time.monotonic() + 15
        found = None
        while time.monotonic() < deadline:
            lines = RELOADED.findall(daemon.log_text())
            if len(lines) > before:
                found = lines[before]
                break
            time.sleep(0.05)
        if found is None:
            STATS.error("reload", f"reload {n} (t={t:.0f}s): no 'reloaded:' log line within 15 s")
            continue
        started, replaced, stopped, failed = (roles_of(x) for x in found)
        RELOADS.record(t, replaced)
        if failed or started or stopped or replaced != expect:
            STATS.error(
                "reload",
                f"reload {n}: expected replaced {sorted(expect)}, got started {sorted(started)} "
                f"replaced {sorted(replaced)} stopped {sorted(stopped)} failed {sorted(failed)}",
            )
        print(
            f"[{now() - plan['start']:6.1f}s] SIGHUP #{n}: pipeline={pipeline}, replaced {sorted(replaced) or 'nothing'}",
            flush=True,
        )


# --------------------------------------------------------------------------
# Samples and verdicts


COLS = [
    ("pool", "pool.ok"),
    ("inline", "inline.ok"),
    ("shm", "shm.ok"),
    ("upstream", "upstream.msgs"),
]


def take_sample(daemon, admin_port, t):
    try:
        rss, fds, threads = proc_status(daemon.pid)
    except OSError:
        return None  # the daemon is gone
    ms = metrics(admin_port)
    c, nerr = STATS.snapshot()
    return {
        "t": t,
        "rss": rss,
        "fds": fds,
        "threads": threads,
        "counts": c,
        "errors": nerr,
        "daemon_errors": (
            metric_sum(ms, "pyipcd_errors_total")
            + metric_sum(ms, "pyipcd_pool_errors_total")
            + metric_sum(ms, "pyipcd_pool_timeouts_total")
            + metric_sum(ms, "pyipcd_shm_stale_total")
        )
        if ms
        else None,
        "conns": metric_sum(ms, "pyipcd_connections") if ms else None,
        "metrics": ms,
    }


def print_sample(s):
    c = s["counts"]
    msgs = "  ".join(f"{label} {c[key]}" for label, key in COLS)
    de = "?" if s["daemon_errors"] is None else int(s["daemon_errors"])
    conns = "?" if s["conns"] is None else int(s["conns"])
    print(
        f"[{s['t']:6.1f}s] RSS {s['rss'] / MiB:7.2f} MiB  fds {s['fds']:4d} (conns {conns:>3})  "
        f"threads {s['threads']:3d} | {msgs} | errors {s['errors']} (daemon {de})",
        flush=True,
    )


def summary(samples, warmup):
    print()
    print("## Samples")
    print()
    print("| t (s) | RSS (MiB) | fds | threads | pool ok | inline ok | shm ok | upstream msgs | errors | daemon errors |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in samples:
        c = s["counts"]
        de = "?" if s["daemon_errors"] is None else int(s["daemon_errors"])
        mark = " (warm-up end)" if s is warm_end_sample(samples, warmup) else ""
        print(
            f"| {s['t']:.0f}{mark} | {s['rss'] / MiB:.2f} | {s['fds']} | {s['threads']} | "
            f"{c['pool.ok']} | {c['inline.ok']} | {c['shm.ok']} | {c['upstream.msgs']} | {s['errors']} | {de} |"
        )


def warm_end_sample(samples, warmup):
    w = [s for s in samples if s["t"] <= warmup + 0.5]
    return w[-1] if w else samples[0]


def verdicts(samples, warmup):
    out = []  # (ok, text)
    w = warm_end_sample(samples, warmup)
    post = [s for s in samples if s["t"] > w["t"]]
    if not post:
        out.append((False, "no samples after warm-up: run longer"))
        return out
    rss_max = max(s["rss"] for s in post)
    growth = rss_max - w["rss"]
    out.append(
        (
            growth <= RSS_GROWTH_MAX,
            f"RSS growth after warm-up: max {rss_max / MiB:.2f} MiB - {w['rss'] / MiB:.2f} MiB at "
            f"t={w['t']:.0f}s = {growth / MiB:+.2f} MiB (bound <= {RSS_GROWTH_MAX / MiB:.0f} MiB)",
        )
    )
    if len(post) >= 3:
        k = len(post) // 3
        first = sum(s["rss"] for s in post[:k]) / k
        last = sum(s["rss"] for s in post[-k:]) / k
        trend = last - first
        out.append(
            (
                trend <= RSS_TREND_MAX,
                f"RSS trend after warm-up: mean of last {k} sample(s) {last / MiB:.2f} MiB - mean of "
                f"first {k} {first / MiB:.2f} MiB = {trend / MiB:+.2f} MiB (bound <= {RSS_TREND_MAX / MiB:.0f} MiB)",
            )
        )
    else:
        out.append((False, f"RSS trend: only {len(post)} sample(s) after warm-up, need 3: run longer"))
    fd_max = max(s["fds"] for s in post)
    out.append(
        (
            fd_max <= w["fds"] + FD_SLACK,
            f"fds after warm-up: max {fd_max}, {w['fds']} at warm-up end (bound <= {w['fds']} + {FD_SLACK})",
        )
    )
    th_max = max(s["threads"] for s in post)
    out.append(
        (
            th_max <= w["threads"] + THREAD_SLACK,
            f"threads after warm-up: max {th_max}, {w['threads']} at warm-up end "
            f"(bound <= {w['threads']} + {THREAD_SLACK})",
        )
    )
    return out


BOUND_NOTES = f"""Bounds:
- warm-up: the first 20% of the run or 60 s, whichever is longer; the sample
  at its end is the reference.
- RSS: max after warm-up - reference <= {RSS_GROWTH_MAX // MiB} MiB (message buffers of up to
  64 KiB x 8-deep pipelines x 16 connections come and go, and mimalloc
  purges freed pages lazily, so single samples move by a few MiB), and no
  upward trend: mean of the last third of post-warm-up samples - mean of
  the first third <= {RSS_TREND_MAX // MiB} MiB.
- fds <= reference + {FD_SLACK}: each of the 8 reconnecting clients can have its old
  connection not yet reaped by the daemon while its new one is accepted
  (+8), the feed role's socket is replaced during its reconnects (+1), the
  sampler's own admin HTTP connection (+1), slack for a drained pool
  connection being closed while its client's new one opens (+2). A leak of
  one fd per reconnect (hundreds of reconnects per minute) or per reload
  exceeds it.
- threads <= reference + {THREAD_SLACK}: tokio's blocking pool spawns threads on
  demand (a reload resolves the replaced role's Python targets with
  spawn_blocking; the feed role's reconnects resolve its address) and
  keeps idle ones for 10 s, so a snapshot may hold a few more; every other
  daemon thread (GIL pool, io, inline role, shm channel, asyncio loop) is
  fixed. A thread leaked per reload or per upstream restart exceeds it
  within a few minutes."""


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "pyipcd"))
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, handlers, daemon log)")
    args = ap.parse_args()

    def on_term(signum, frame):
        raise KeyboardInterrupt  # the finally below stops the daemon

    signal.signal(signal.SIGTERM, on_term)
    binary = Path(args.bin).resolve()
    if not os.access(binary, os.X_OK):
        print(f"soak: {binary} is not an executable (build it first)", file=sys.stderr)
        return 2
    duration = args.minutes * 60.0
    warmup = max(0.2 * duration, 60.0)
    st = binary.stat()
    print(
        f"soak: {binary} (modified {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(st.st_mtime))}), "
        f"{args.minutes:g} min, sample every {args.sample_every:g} s, warm-up {warmup:.0f} s",
        flush=True,
    )

    d = Path(tempfile.mkdtemp(prefix="pyipcd-soak-"))
    ports = {k: free_port() for k in ("admin", "pool", "inline", "upstream")}
    (d / "soak_handlers.py").write_text(HANDLERS)
    cfg = d / "soak.toml"
    write_config(cfg, config_text(d, ports, 64))
    daemon = None
    threads = []
    failed = True
    try:
        chk = subprocess.run(
            [str(binary), "check", "-c", str(cfg)], capture_output=True, text=True, timeout=60
        )
        if chk.returncode != 0:
            print(f"soak: `pyipcd check` refused the config (status {chk.returncode}):", file=sys.stderr)
            print(chk.stdout + chk.stderr, file=sys.stderr)
            return 2

        daemon = Daemon(binary, cfg, d / "daemon.log")
        upstream = Upstream(ports["upstream"])
        ut = threading.Thread(target=upstream.run, name="upstream", daemon=True)
        ut.start()
        err = wait_healthy(daemon, ports["admin"])
        if err:
            print(f"soak: {err}\n--- daemon log ---\n{daemon.log_text()[-4000:]}", file=sys.stderr)
            return 2
        start = now()
        plan = {"start": start, "end": start + duration}
        print(f"soak: daemon pid {daemon.pid} ready in {start:.1f} s; temp dir {d}", flush=True)

        for role, port, framing in (("pool", ports["pool"], "len32"), ("inline", ports["inline"], "line")):
            for i in range(8):
                t = threading.Thread(
                    target=tcp_client, args=(role, i, port, framing, i >= 4), name=f"{role}#{i}", daemon=True
                )
                threads.append(t)
        threads.append(threading.Thread(target=shm_client, args=(d / "channel.shm",), name="shm", daemon=True))
        threads.append(
            threading.Thread(target=reloader, args=(daemon, cfg, d, ports, plan), name="reloader", daemon=True)
        )
        for t in threads:
            t.start()

        samples = []
        s = take_sample(daemon, ports["admin"], 0.0)
        samples.append(s)
        print_sample(s)
        k = 1
        while True:
            target = min(k * args.sample_every, duration)
            delay = start + target - now()
            if delay > 0:
                time.sleep(delay)
            if daemon.proc.poll() is not None:
                print(f"soak: the daemon exited during the run (status {daemon.proc.returncode})", flush=True)
                break
            s = take_sample(daemon, ports["admin"], now() - start)
            if s is None:
                print("soak: the daemon exited during the run", flush=True)
                break
            samples.append(s)
            print_sample(s)
            if target >= duration:
                break
            k += 1

        # Stop the traffic; each client finishes its batch.
        STOP.set()
        for t in threads:
            t.join(SOCK_TIMEOUT + 5)
        stuck = [t.name for t in threads if t.is_alive()]
        for name in stuck:
            STATS.error(name, "client did not stop within its socket timeout")
        alive = daemon.proc.poll() is None
        final_ms = metrics(ports["admin"]) if alive else None
        health = None
        if alive:
            try:
                health = http_get(ports["admin"], "/health")
            except OSError as e:
                health = (None, str(e))
        counts, _ = STATS.snapshot()
        t_stop = now()

        # SIGTERM: a clean stop must exit 0.
        rc = None
        if alive:
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                rc = daemon.proc.wait(20)
            except subprocess.TimeoutExpired:
                rc = "no exit within 20 s of SIGTERM"
        else:
            rc = daemon.proc.returncode
        UPSTREAM_STOP.set()
        ut.join(15)
        counts, nerrors = STATS.snapshot()

        summary(samples, warmup)
        print()
        print(BOUND_NOTES)
        print()

        v = verdicts(samples, warmup)
        v.append((rc == 0, f"daemon exit status after SIGTERM: {rc} (expected 0)"))
        v.append((not stuck, f"clients stopped in time{'' if not stuck else ': stuck ' + ', '.join(stuck)}"))
        v.append((nerrors == 0, f"client-side errors: {nerrors} (wrong replies, unexpected closes, timeouts, shm errors, upstream gaps/CRC)"))
        de = None
        if final_ms is not None:
            de = {
                "pyipcd_errors_total": metric_sum(final_ms, "pyipcd_errors_total"),
                "pyipcd_pool_errors_total": metric_sum(final_ms, "pyipcd_pool_errors_total"),
                "pyipcd_pool_timeouts_total": metric_sum(final_ms, "pyipcd_pool_timeouts_total"),
                "pyipcd_pool_skipped_total": metric_sum(final_ms, "pyipcd_pool_skipped_total"),
                "pyipcd_shm_stale_total": metric_sum(final_ms, "pyipcd_shm_stale_total"),
                "pyipcd_connections_refused_total": metric_sum(final_ms, "pyipcd_connections_refused_total"),
            }
            v.append(
                (
                    all(x == 0 for x in de.values()),
                    "daemon-side errors (/metrics at the end): " + ", ".join(f"{k} {int(x)}" for k, x in de.items()),
                )
            )
            # Every request the daemon read got its reply: the role's
            # message count equals the replies the clients verified.
            for role, key in (("pool", "pool.ok"), ("inline", "inline.ok"), ("shm", "shm.ok")):
                got = metric_sum(final_ms, "pyipcd_messages_total", f'role="{role}"')
                v.append(
                    (
                        int(got) == counts[key],
                        f"{role}: messages the daemon counted {int(got)} == replies verified {counts[key]} "
                        f"(sent {counts[key.replace('.ok', '.sent')]})",
                    )
                )
        else:
            v.append((False, "could not read /metrics at the end"))
        unanswered = counts["pool.unanswered_at_drain"]
        v.append(
            (
                counts["pool.ok"] + unanswered == counts["pool.sent"]
                and counts["inline.ok"] == counts["inline.sent"]
                and counts["shm.ok"] == counts["shm.sent"],
                f"every request answered: pool {counts['pool.ok']}/{counts['pool.sent']} "
                f"(+{unanswered} never read, sent on {counts['pool.drain_closes']} connection(s) the daemon "
                f"closed at reload_drain), inline {counts['inline.ok']}/{counts['inline.sent']}, "
                f"shm {counts['shm.ok']}/{counts['shm.sent']}",
            )
        )
        if health is not None:
            # The feed role is down whenever the upstream happens to be
            # closed; every other role must be up.
            try:
                roles = json.loads(health[1]).get("roles", {})
            except ValueError:
                roles = {}
            others = {r: st for r, st in roles.items() if r != "feed"}
            v.append(
                (
                    sorted(others) == ["inline", "pool", "shm"] and all(st == "up" for st in others.values()),
                    f"/health at the end: {health[0]}, roles {roles} (feed follows the upstream's up/down cycle)",
                )
            )
        # Upstream: messages after every restart.
        periods = list(upstream.periods)
        considered = [p for p in periods if p["start"] < t_stop - 5.0]
        empty = [i for i, p in enumerate(considered) if p["msgs"] == 0]
        firsts = [p["first"] for p in considered if p["first"] is not None]
        slow = [round(f, 2) for f in firsts if f > FIRST_MSG_AFTER_RESTART_MAX]
        v.append(
            (
                not empty and len(considered) >= 2,
                f"upstream: {len(considered)} listening period(s) ({len(considered) - 1} restart(s)), "
                f"messages per period {[p['msgs'] for p in considered]}"
                + (f"; none in period(s) {empty}" if empty else "")
                + ("; need at least one restart: run longer" if len(considered) < 2 else ""),
            )
        )
        v.append(
            (
                not slow,
                f"upstream: first message after (re)opening within {FIRST_MSG_AFTER_RESTART_MAX:g} s "
                f"(max {max(firsts) if firsts else float('nan'):.2f} s)" + (f"; slow: {slow}" if slow else ""),
            )
        )
        reloads = counts["reloads"]
        v.append(
            (
                reloads >= 1 and counts["reload.errors"] == 0,
                f"reloads: {reloads} SIGHUP(s), each logged 'reloaded:' with the expected roles replaced",
            )
        )
        # The daemon's log: ERROR lines fail; WARN lines are listed.
        log = daemon.log_text()
        levels = collections.Counter()
        warns = collections.Counter()
        for line in log.splitlines():
            m = re.search(r"\b(ERROR|WARN|INFO|DEBUG|TRACE)\b", line)
            if not m:
                continue
            levels[m.group(1)] += 1
            if m.group(1) in ("ERROR", "WARN"):
                msg = line[m.end():]
                msg = re.sub(r"\d+", "N", msg).strip()
                warns[f"{m.group(1)} {msg[:160]}"] += 1
        v.append((levels["ERROR"] == 0, f"daemon log: {levels['ERROR']} ERROR line(s), {levels['WARN']} WARN line(s)"))

        print("## Counters")
        print()
        for key in sorted(counts):
            print(f"- {key}: {counts[key]}")
        if de is not None:
            ms = final_ms or {}
            for (n, labels), val in sorted(ms.items()):
                if n in ("pyipcd_messages_total", "pyipcd_pool_calls_total", "pyipcd_pool_calls_here_total"):
                    print(f"- {n}{labels}: {int(val)}")
        if warns:
            print()
            print("## Daemon WARN/ERROR log lines (digits as N)")
            print()
            for msg, n in warns.most_common(25):
                print(f"- {n} x {msg}")
        if STATS.errors:
            print()
            print("## First errors")
            print()
            for e in STATS.errors:
                print(f"- {e}")
        print()
        print("## Verdicts")
        print()
        for ok, text in v:
            print(f"- {'PASS' if ok else 'FAIL'}: {text}")
        failed = not all(ok for ok, _ in v)
        print()
        total = counts["pool.ok"] + counts["inline.ok"] + counts["shm.ok"] + counts["upstream.msgs"]
        print(
            f"soak: {'FAILED' if failed else 'PASSED'} after {t_stop - start:.0f} s, {total} messages checked"
            + (f"; daemon log and config kept in {d}" if failed or args.keep else "")
        )
        return 1 if failed else 0
    except KeyboardInterrupt:
        print("\nsoak: interrupted", file=sys.stderr)
        return 130
    finally:
        STOP.set()
        UPSTREAM_STOP.set()
        if daemon is not None:
            daemon.kill()
        if not failed and not args.keep:
            shutil.rmtree(d, ignore_errors=True)
        elif daemon is None or failed:
            print(f"soak: files kept in {d}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
