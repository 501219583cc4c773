"""Handlers for the shipped configs: `bytes -> bytes | None`, plain Python."""


def echo(data: bytes) -> bytes:
    """Returns the message unchanged."""
    return data


def upper(data: bytes) -> bytes:
    """Returns the message in upper case."""
    return data.upper()


async def echo_async(data: bytes) -> bytes:
    """An `async def` handler: runs on the daemon's asyncio loop."""
    return data
