"""Typed stand-in for `pyipcd`, the module the pyipcd daemon embeds.

Inside the daemon, `import pyipcd` always gets the daemon's own module (it is
registered before any user code is imported), whatever is installed. This
package is what editors, type checkers and unit tests outside the daemon see,
with the same names, signatures and errors:

- ``log(*args, level="info")`` logs one line (here through `logging`, logger
  ``pyipcd.log``; in the daemon into its log, tagged with the caller's role);
- ``stopping()`` is ``False`` until the daemon shuts down (here: until
  ``pyipcd.testing.set_stopping()``);
- ``send(role, data)`` queues ``data`` on a client role or watched shm region
  (here: appends ``(role, data)`` to ``pyipcd.testing.sent``).
"""

from __future__ import annotations

import logging

from . import testing

__all__ = ["log", "send", "stopping"]
__version__ = "0.1.0"

_LEVELS = {
    "trace": 5,
    "debug": 10,
    "info": 20,
    "warn": 30,
    "warning": 30,
    "error": 40,
    "critical": 40,
}
_logger = logging.getLogger("pyipcd.log")


def log(*args: object, level: str = "info") -> None:
    """Logs ``args`` joined by spaces as one line at ``level``.

    ``level`` is one of trace, debug, info, warning (warn), error (critical);
    anything else raises ``ValueError``.
    """
    levelno = _LEVELS.get(level.lower())
    if levelno is None:
        raise ValueError(
            f"unknown level {level!r}; use debug, info, warning or error"
        )
    _logger.log(levelno, " ".join(str(a) for a in args))


def stopping() -> bool:
    """``True`` once the daemon is shutting down: long loops should return."""
    return testing._stopping


def send(role: str, data: bytes) -> None:
    """Queues ``data`` on the role named ``role``; waits while its queue is full.

    Raises ``TypeError`` unless ``data`` is ``bytes``, ``KeyError`` if no role
    of that name accepts messages (in tests: when ``testing.roles`` is set and
    does not name it).
    """
    if not isinstance(data, bytes):
        raise TypeError(f"send() data must be bytes, not {type(data).__name__}")
    if testing.roles is not None and role not in testing.roles:
        raise KeyError(
            f"no role named {role!r} accepts pyipcd.send "
            f"(roles that do: {sorted(testing.roles)!r})"
        )
    testing.sent.append((role, data))
