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
attach after a crash.
"""

import fcntl
import mmap
import os
import struct
import time
import zlib

MAGIC = b"PYIPCSH1"
VERSION = 1
PAGE = 4096
RECORD_HEADER = 16
WRAP = 0xFFFFFFFF
OK, NO_REPLY, ERROR = 0, 1, 2
READY, STOPPED = 1, 2


class ChannelError(Exception):
    """The channel cannot be used (bad file, busy, daemon gone)."""


class HandlerError(ChannelError):
    """The daemon's handler raised; the message is its last traceback line."""


class DaemonRestarted(ChannelError):
    """The daemon restarted: reconnect (requests in flight are lost)."""


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
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ChannelError(f"{path}: another client is attached") from None
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
        deadline = time.monotonic() + timeout
        while self._u32(32) != READY:
            if time.monotonic() > deadline:
                raise ChannelError(f"{path}: the daemon is not serving this channel")
            time.sleep(0.001)
        self._words.set_u32(40, os.getpid())
        self._generation = self._u64(24)
        # Wait until the previous client's requests are answered, then drop their replies.
        while self._u64(self._req_ctl + 64) != self._u64(self._req_ctl):
            if time.monotonic() > deadline or self._u64(24) != self._generation:
                raise ChannelError(f"{path}: the daemon did not drain the previous client")
            time.sleep(0.0001)
        self._set_u64(self._resp_ctl + 64, self._u64(self._resp_ctl))
        self._seq = 0

    def close(self):
        if self._mm is not None:
            self._words.release()
            self._mm.close()
            self._mm = None
            os.close(self._fd)

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
        wait = self._waiter()
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

    def _waiter(self):
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
                time.sleep(0 if waited < 0.002 else 0.0002)
            yield

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
        struct.pack_into("<IIII", mm, base + at, len(payload), seq, zlib.crc32(payload), OK)
        mm[base + at + RECORD_HEADER : base + at + RECORD_HEADER + len(payload)] = payload
        self._set_u64(self._req_ctl, tail + skip + need)  # publish
        return True

    def _try_pop(self):
        mm, ring = self._mm, self._ring
        head = self._u64(self._resp_ctl + 64)
        tail = self._u64(self._resp_ctl)
        base = self._resp_data
        while head != tail:
            pos = head % ring
            room = ring - pos
            if room < RECORD_HEADER or self._u32(base + pos) == WRAP:
                head += room
                continue
            length, seq, crc, flags = struct.unpack_from("<IIII", mm, base + pos)
            need = RECORD_HEADER + _round8(min(length, self.max_message))
            if length > self.max_message or need > room or head + need > tail:
                self._set_u64(self._resp_ctl + 64, tail)
                return seq, flags, b"", False
            payload = mm[base + pos + RECORD_HEADER : base + pos + RECORD_HEADER + length]
            self._set_u64(self._resp_ctl + 64, head + need)  # consume
            return seq, flags, payload, zlib.crc32(payload) == crc
        return None


def _round8(n):
    return (n + 7) & ~7
