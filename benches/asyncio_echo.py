"""Baseline for benches/tcp_echo.rs: an asyncio Protocol speaking len32 framing
that calls the same Python echo function per message.

Usage: python3 benches/asyncio_echo.py PORT [--uvloop]
Prints "ready" once listening.
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
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=BACKLOG)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


BACKLOG = 4096  # --backlog N


if __name__ == "__main__":
    port = int(sys.argv[1])
    if "--backlog" in sys.argv:
        BACKLOG = int(sys.argv[sys.argv.index("--backlog") + 1])
    if "--uvloop" in sys.argv:
        import uvloop

        uvloop.install()
    asyncio.run(main(port))
