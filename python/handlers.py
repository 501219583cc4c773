"""Handlers for the shipped configs: `bytes -> bytes | None`, plain Python.

Type-checked with `mypy --strict` against the installed `pyipcd` package
(`pip install ./python`), whose stand-in also lets these run in unit tests.
"""

from typing import Iterator

import pyipcd


def echo(data: bytes) -> bytes:
    """Returns the message unchanged."""
    return data


def upper(data: bytes) -> bytes:
    """Returns the message in upper case."""
    return data.upper()


async def echo_async(data: bytes) -> bytes:
    """An `async def` handler: runs on the daemon's asyncio loop."""
    return data


def echo_with_peer(data: bytes, peer: str, conn_id: int) -> bytes:
    """Shows the optional context parameters: declare `peer` and/or `conn_id`."""
    return f"{conn_id}@{peer}: ".encode() + data


def log_reply(data: bytes) -> None:
    """A client role's reply handler: print what came back (it lands in the log)."""
    print("Client read from Server", data.decode(errors="replace"))


def forward(data: bytes) -> bytes:
    """Passes the message on through the `ticker` client role and acknowledges it."""
    pyipcd.send("ticker", data)
    return b"queued"


def counter() -> Iterator[bytes]:
    """A producer: yields messages for a client role (a plain generator)."""
    n = 0
    while True:
        n += 1
        yield f"tick {n}".encode()


def on_connect(conn_id: int, peer: str) -> None:
    print(f"connection {conn_id} from {peer}")


def on_close(conn_id: int, peer: str) -> None:
    print(f"connection {conn_id} from {peer} closed")


def on_change(contents: bytes) -> None:
    """A watched region changed: log its text up to the first NUL byte."""
    text = contents.split(b"\0", 1)[0].decode(errors="replace")
    print("region now holds", repr(text))
