"""Python client for a pyipcd shared-memory channel (docs/shm-protocol.md).

    import pyipcd_shm
    c = pyipcd_shm.Client("/run/pyipcd/ch.shm")
    reply = c.call(b"request")        # bytes, or None if the handler returned None

Pure Python over `mmap`. Ordering: a record's bytes are written before the
ring's `tail` is stored, and read before `head` is stored, each as a separate
copy into the mapping. This relies on x86-64's total store order and on
`tail`/`head` being read and written with single aligned 8-byte accesses,
which is what indexing a `memoryview` cast to "Q" does (see `_Words`). On a
weakly ordered CPU (ARM) use the C or Rust client, which use real
acquire/release atomics.

One client at a time: the client holds an exclusive `flock` on the file for
its lifetime; the kernel drops it if the process dies, so a new client can
attach after a crash. Attaching starts a new client epoch: the daemon drops
what a dead client left, and replies of older epochs are skipped here.

Waiting: after publishing a request the client rings the daemon's doorbell
(a futex word in the mapping, `FUTEX_WAKE` through ctypes) if the daemon
sleeps on it; waiting for a reply it spins briefly, then sleeps on the
response ring's doorbell, which the daemon rings.
"""

import ctypes
import fcntl
import mmap
import os
import platform
import struct
import threading
import time
import zlib

MAGIC = b"PYIPCSH1"
VERSION = 2
PAGE = 4096
RECORD_HEADER = 24  # len, seq, crc32, flags (u32 each), epoch (u64)
WRAP = 0xFFFFFFFF
OK, NO_REPLY, ERROR, RESET = 0, 1, 2, 3
STATE, CLIENT_PID, EPOCH = 32, 40, 48
BELL, SLEEPING = 128, 132  # in each ring's control page

# The doorbell's futex calls (Linux). Without them (another OS or CPU), the
# client still works: it polls, and the daemon's sleeps are cut into slices.
_LIBC = ctypes.CDLL(None, use_errno=True)
# x86-64 only: the doorbell's fence below relies on its memory model, as
# the rest of this client does.
_SYS_FUTEX = {"x86_64": 202}.get(platform.machine())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex(addr, op, value, timeout=None):
    if _SYS_FUTEX is None:
        if op == _FUTEX_WAIT and timeout:
            time.sleep(min(timeout, 0.0002))
        return
    ts = None
    if timeout is not None:
        ts = ctypes.byref(_Timespec(int(timeout), int((timeout % 1) * 1e9)))
    _LIBC.syscall(
        ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_int(op),
        ctypes.c_uint32(value), ts, None, ctypes.c_int(0),
    )
READY, STOPPED = 1, 2


class ChannelError(Exception):
    """The channel cannot be used (bad file, busy, daemon gone)."""


class HandlerError(ChannelError):
    """The daemon's handler raised; the message is its last traceback line."""


class DaemonRestarted(ChannelError):
    """The daemon restarted: reconnect (requests in flight are lost)."""


class StreamReset(ChannelError):
    """The daemon lost the request stream's framing and dropped every request
    sent so far: none still outstanding will be answered."""


class _Words:
    """The aligned 4- and 8-byte words of a shared mapping, each read and
    written with one machine load or store (a memoryview item is copied with
    a single fixed-size memcpy).

    Not `struct.pack_into`: it zeroes the destination before packing the
    value, so a reader in another process can catch a position at 0 between
    the two stores (the daemon saw `tail = 0` behind a large `head` that way).
    Not "<Q" either: that packs byte by byte, and a reader can see it torn.
    """

    def __init__(self, mm):
        self._w32 = memoryview(mm).cast("I")
        self._w64 = memoryview(mm).cast("Q")

    def u32(self, off):
        return self._w32[off >> 2]

    def set_u32(self, off, value):
        self._w32[off >> 2] = value

    def u64(self, off):
        return self._w64[off >> 3]

    def set_u64(self, off, value):
        self._w64[off >> 3] = value

    def release(self):
        """Drops the views (the mapping cannot be closed while they exist)."""
        self._w32.release()
        self._w64.release()


class Client:
    def __init__(self, path, timeout=10.0):
        self.timeout = timeout
        self._fd = os.open(path, os.O_RDWR)
        self._mm = None
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ChannelError(f"{path}: another client is attached") from None
            # Ready before anything else is read: a daemon (re)initialising the
            # file may be resizing it and rewriting the header.
            deadline = time.monotonic() + timeout
            while True:
                head = os.pread(self._fd, 44, 0)
                magic = head[:8]
                if len(head) == 44 and magic not in (MAGIC, bytes(8)):
                    # Never a channel being set up: fail now, not at the timeout.
                    raise ChannelError(f"{path}: bad magic {magic!r} (not a pyipcd channel)")
                if magic == MAGIC and struct.unpack_from("<I", head, STATE)[0] == READY:
                    break
                if time.monotonic() > deadline:
                    if magic == MAGIC and struct.unpack_from("<I", head, 8)[0] != VERSION:
                        version = struct.unpack_from("<I", head, 8)[0]
                        raise ChannelError(
                            f"{path}: layout version {version}, this client speaks {VERSION}"
                        )
                    raise ChannelError(f"{path}: the daemon is not serving this channel")
                time.sleep(0.001)
            size = os.fstat(self._fd).st_size
            if size < PAGE:
                raise ChannelError(f"{path}: {size} bytes is too small for a channel")
            self._mm = mm = mmap.mmap(self._fd, size)
            self._words = _Words(mm)
            if mm[0:8] != MAGIC:
                raise ChannelError(f"{path}: bad magic {mm[0:8]!r} (not a pyipcd channel)")
            version, header, ring, max_record = struct.unpack_from("<IIII", mm, 8)
            if version != VERSION:
                raise ChannelError(f"{path}: layout version {version}, this client speaks {VERSION}")
            if header != PAGE or ring < PAGE or ring & (ring - 1) or size < PAGE + 2 * (PAGE + ring):
                raise ChannelError(f"{path}: bad sizes (header {header}, ring {ring}, file {size})")
            if not 0 < max_record or RECORD_HEADER + _round8(max_record) > ring // 2:
                raise ChannelError(f"{path}: bad max record {max_record}")
            self.max_message = max_record
            self._ring = ring
            self._req_ctl, self._req_data = PAGE, 2 * PAGE
            self._resp_ctl, self._resp_data = 2 * PAGE + ring, 3 * PAGE + ring
            self._words.set_u32(CLIENT_PID, os.getpid())
            self._generation = self._u64(24)
            # A new epoch: the daemon drops the previous client's requests and
            # replies from now on; what is in the response ring is not ours.
            self._epoch = (self._u64(EPOCH) + 1) & 0xFFFFFFFFFFFFFFFF
            self._set_u64(EPOCH, self._epoch)
            self._set_u64(self._resp_ctl + 64, self._u64(self._resp_ctl))
            self._words.set_u32(self._resp_ctl + SLEEPING, 0)  # a dead predecessor's flag
            self._seq = 0
            self._seen_tail = 0
            # The doorbells' futex words, by address (released before closing).
            self._req_bell = ctypes.c_uint32.from_buffer(mm, self._req_ctl + BELL)
            self._resp_bell = ctypes.c_uint32.from_buffer(mm, self._resp_ctl + BELL)
            # Acquiring a lock is a locked instruction: a full fence on x86-64,
            # which the doorbell needs between publishing and looking for a sleeper.
            self._fence = threading.Lock()
        except BaseException:
            # Nothing half-attached stays behind: not the lock, not the mapping.
            self._abandon()
            raise

    def _abandon(self):
        if self._mm is not None:
            for name in ("_req_bell", "_resp_bell"):
                if hasattr(self, name):
                    delattr(self, name)
            if hasattr(self, "_words"):
                self._words.release()
            self._mm.close()
            self._mm = None
        os.close(self._fd)

    def close(self):
        if self._mm is not None:
            self._abandon()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, data):
        """Sends `data` and returns the reply (`None` if the handler returned None)."""
        seq = self.send(data)
        got, reply = self.recv()
        if got != seq:
            raise ChannelError(f"reply {got} for request {seq}")
        return reply

    def send(self, data):
        data = bytes(data)
        if len(data) > self.max_message:
            raise ChannelError(f"message of {len(data)} bytes is over max_message ({self.max_message})")
        seq = self._seq
        wait = self._waiter()
        while not self._try_push(seq, data):
            next(wait)
        self._seq = (seq + 1) & 0xFFFFFFFF
        return seq

    def recv(self):
        wait = self._waiter(sleep_on=self._resp_ctl)
        while True:
            rec = self._try_pop()
            if rec is not None:
                break
            next(wait)
        seq, flags, payload, crc_ok = rec
        if not crc_ok:
            raise ChannelError(f"reply {seq} failed its checksum")
        if flags == OK:
            return seq, payload
        if flags == NO_REPLY:
            return seq, None
        if flags == RESET:
            raise StreamReset(payload.decode(errors="replace"))
        raise HandlerError(payload.decode(errors="replace"))

    # -- internals ---------------------------------------------------------

    # Words the daemon reads or writes concurrently go through `_Words`
    # (single loads and stores, native byte order: little-endian, like the
    # layout and the hosts this runs on). Record headers and payloads are
    # written with struct/slices before `tail` publishes them, so nobody
    # reads them mid-write.
    def _u32(self, off):
        return self._words.u32(off)

    def _u64(self, off):
        return self._words.u64(off)

    def _set_u64(self, off, value):
        self._words.set_u64(off, value)

    def _waiter(self, sleep_on=None):
        """Spins, then sleeps: on the doorbell of the ring whose control page
        is at `sleep_on` (for replies), or in short steps (for room)."""
        start = time.monotonic()
        spins = 0
        while True:
            if self._u64(24) != self._generation:
                raise DaemonRestarted("the daemon restarted; reconnect")
            if self._u32(32) == STOPPED:
                raise ChannelError("the daemon stopped")
            spins += 1
            if spins > 200:
                waited = time.monotonic() - start
                if waited > self.timeout:
                    raise ChannelError(f"no progress within {self.timeout}s")
                if sleep_on is not None:
                    self._sleep_on(sleep_on, min(0.05, self.timeout - waited), self._seen_tail)
                else:
                    time.sleep(0 if waited < 0.002 else 0.0002)
            yield

    def _sleep_on(self, ctl, timeout, seen_tail):
        bell = self._resp_bell if ctl == self._resp_ctl else self._req_bell
        seen = self._u32(ctl + BELL)
        self._words.set_u32(ctl + SLEEPING, 1)
        with self._fence:
            pass
        if self._u64(ctl) == seen_tail:  # nothing published since we looked
            _futex(ctypes.addressof(bell), _FUTEX_WAIT, seen, timeout)
        self._words.set_u32(ctl + SLEEPING, 0)

    def _ring_bell(self, ctl):
        """After publishing: wakes the ring's consumer if it sleeps."""
        with self._fence:
            pass
        if self._u32(ctl + SLEEPING):
            self._words.set_u32(ctl + BELL, (self._u32(ctl + BELL) + 1) & 0xFFFFFFFF)
            bell = self._req_bell if ctl == self._req_ctl else self._resp_bell
            _futex(ctypes.addressof(bell), _FUTEX_WAKE, 0x7FFFFFFF)

    def _try_push(self, seq, payload):
        mm, ring = self._mm, self._ring
        need = RECORD_HEADER + _round8(len(payload))
        tail = self._u64(self._req_ctl)
        head = self._u64(self._req_ctl + 64)
        pos = tail % ring
        room = ring - pos
        skip = room if room < need else 0
        if tail + skip + need - head > ring:
            return False
        base = self._req_data
        at = pos
        if skip:
            if skip >= RECORD_HEADER:
                struct.pack_into("I", mm, base + at, WRAP)
            at = 0
        struct.pack_into(
            "<IIIIQ", mm, base + at, len(payload), seq, zlib.crc32(payload), OK, self._epoch
        )
        mm[base + at + RECORD_HEADER : base + at + RECORD_HEADER + len(payload)] = payload
        self._set_u64(self._req_ctl, tail + skip + need)  # publish
        self._ring_bell(self._req_ctl)
        return True

    def _try_pop(self):
        mm, ring = self._mm, self._ring
        head = self._u64(self._resp_ctl + 64)
        tail = self._u64(self._resp_ctl)
        base = self._resp_data
        self._seen_tail = tail  # nothing readable behind it, if we return None
        skips = 0
        while head != tail:
            if tail - head > ring or head % 8 or skips > 1:
                # Positions no daemon could publish, or a second skip in a
                # row: the framing is lost.
                self._set_u64(self._resp_ctl + 64, tail)
                return 0, ERROR, b"", False
            pos = head % ring
            room = ring - pos
            if room < RECORD_HEADER or self._u32(base + pos) == WRAP:
                head += room
                skips += 1
                continue
            skips = 0
            length, seq, crc, flags, epoch = struct.unpack_from("<IIIIQ", mm, base + pos)
            need = RECORD_HEADER + _round8(length)
            if need > room or head + need > tail:
                self._set_u64(self._resp_ctl + 64, tail)  # framing lost
                return seq, flags, b"", False
            if epoch != self._epoch:
                # Another client's reply, pushed before the daemon saw our epoch.
                head += need
                self._set_u64(self._resp_ctl + 64, head)
                continue
            if length > self.max_message:
                self._set_u64(self._resp_ctl + 64, head + need)
                return seq, flags, b"", False
            payload = mm[base + pos + RECORD_HEADER : base + pos + RECORD_HEADER + length]
            self._set_u64(self._resp_ctl + 64, head + need)  # consume
            return seq, flags, payload, zlib.crc32(payload) == crc
        return None


def _round8(n):
    return (n + 7) & ~7
