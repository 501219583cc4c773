"""Baseline for benches/tcp_echo.rs: an asyncio Protocol speaking len32 framing
that calls the same Python echo function per message.

Usage: python3 benches/asyncio_echo.py PORT [--uvloop] [--backlog N]
    [--reuseport] [--handler-dir DIR]
--reuseport shares the port with other processes (SO_REUSEPORT);
--handler-dir imports `work` from DIR/cpu_work.py instead of echoing
(benches/processes.rs). Prints "ready" once listening.
"""

import asyncio
import struct
import sys


def echo(data: bytes) -> bytes:
    return data


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = bytearray()
        try:
            import socket

            transport.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )
        except Exception:
            pass

    def data_received(self, data):
        buf = self.buf
        buf += data
        out = []
        while len(buf) >= 4:
            (n,) = struct.unpack_from(">I", buf)
            if len(buf) < 4 + n:
                break
            msg = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            reply = echo(msg)
            out.append(struct.pack(">I", len(reply)))
            out.append(reply)
        if out:
            self.transport.writelines(out)


async def main(port):
    loop = asyncio.get_running_loop()
    # The same listen backlog as the pyipcd server beside it (not asyncio's 100).
    server = await loop.create_server(
        Echo, "127.0.0.1", port, backlog=BACKLOG, reuse_port=REUSEPORT
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


BACKLOG = 4096  # --backlog N
REUSEPORT = False  # --reuseport


if __name__ == "__main__":
    port = int(sys.argv[1])
    if "--backlog" in sys.argv:
        BACKLOG = int(sys.argv[sys.argv.index("--backlog") + 1])
    REUSEPORT = "--reuseport" in sys.argv
    if "--handler-dir" in sys.argv:
        sys.path.insert(0, sys.argv[sys.argv.index("--handler-dir") + 1])
        from cpu_work import work as echo  # noqa: F811
    if "--uvloop" in sys.argv:
        import uvloop

        uvloop.install()
    asyncio.run(main(port))
