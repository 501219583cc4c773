"""Controls for the `pyipcd` stand-in in unit tests (not in the daemon).

- ``sent``: every ``(role, data)`` passed to ``pyipcd.send``, in order;
- ``roles``: ``None`` (every role accepts ``send``) or the names that do;
- ``set_stopping(True)``: makes ``pyipcd.stopping()`` return ``True``;
- ``reset()``: back to the initial state.
"""

from __future__ import annotations

from typing import List, Optional, Set, Tuple

__all__ = ["sent", "roles", "set_stopping", "reset"]

sent: List[Tuple[str, bytes]] = []
roles: Optional[Set[str]] = None
_stopping = False


def set_stopping(value: bool = True) -> None:
    """Makes ``pyipcd.stopping()`` return ``value``."""
    global _stopping
    _stopping = value


def reset() -> None:
    """Clears ``sent``, accepts every role again and clears the stop flag."""
    global roles, _stopping
    sent.clear()
    roles = None
    _stopping = False
