"""Baseline for benches/shm_channel.rs: the same Python echo handler behind a
Unix socket (blocking, one client, len32 framing).

Usage: python3 benches/unix_echo.py PATH   (prints "ready" once listening)
"""

import os
import socket
import struct
import sys


def echo(data: bytes) -> bytes:
    return data


def recv_exact(conn, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def main(path):
    if os.path.exists(path):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    print("ready", flush=True)
    while True:
        conn, _ = s.accept()
        with conn:
            while True:
                head = recv_exact(conn, 4)
                if head is None:
                    break
                (n,) = struct.unpack(">I", head)
                data = recv_exact(conn, n)
                reply = echo(data)
                conn.sendall(struct.pack(">I", len(reply)) + reply)


if __name__ == "__main__":
    main(sys.argv[1])
