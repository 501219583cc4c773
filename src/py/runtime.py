"""pyipcd's Python-side runtime, executed once into the private `_pyipcd` module.

It redirects sys.stdout/sys.stderr and the logging module into the daemon's
log (each line tagged with the task or role that wrote it), and holds the small
helpers the Rust side calls: async handler wrapping and cancellation, stack
dumps of stuck threads, and SystemExit injection at shutdown.
User code never has to import any of this.
"""

import asyncio
import contextvars
import ctypes
import io
import logging
import sys
import threading
import traceback

_ROLE = contextvars.ContextVar("pyipcd_role", default=None)
_max_line = 64 * 1024


class _LogStream(io.TextIOBase):
    """A line-buffered text stream whose lines become log events."""

    def __init__(self, name, level):
        self._name = name
        self._level = level
        self._local = threading.local()

    @property
    def encoding(self):
        return "utf-8"

    @property
    def errors(self):
        return "replace"

    def writable(self):
        return True

    def isatty(self):
        return False

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        buf = getattr(self._local, "buf", "") + s
        if "\n" in buf:
            *lines, buf = buf.split("\n")
            for line in lines:
                _emit(self._level, self._name, _ROLE.get(), line)
        while len(buf) > _max_line:
            _emit(self._level, self._name, _ROLE.get(), buf[:_max_line])
            buf = buf[_max_line:]
        self._local.buf = buf
        return len(s)

    def flush(self):
        buf = getattr(self._local, "buf", "")
        if buf:
            self._local.buf = ""
            _emit(self._level, self._name, _ROLE.get(), buf)


class _LogHandler(logging.Handler):
    """Sends `logging` records to the daemon's log."""

    def emit(self, record):
        try:
            msg = self.format(record)
        except Exception:
            self.handleError(record)
            return
        _log_record(record.levelno, record.name, _ROLE.get(), msg)


def _install(level, max_line):
    global _max_line
    _max_line = max_line
    sys.stdout = _LogStream("stdout", 20)
    sys.stderr = _LogStream("stderr", 30)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_LogHandler())
    root.setLevel(level)
    if not getattr(sys, "argv", None):
        sys.argv = ["pyipcd"]


class _CancelHandle:
    """Lets Rust cancel an async handler's asyncio task from any thread."""

    __slots__ = ("task", "loop", "cancelled")

    def __init__(self):
        self.task = None
        self.loop = None
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        task, loop = self.task, self.loop
        if task is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)


async def _run_as(role, coro, handle):
    _ROLE.set(role)
    handle.task = asyncio.current_task()
    handle.loop = asyncio.get_running_loop()
    if handle.cancelled:
        coro.close()
        raise asyncio.CancelledError()
    return await coro


def _stack_of(ident):
    frame = sys._current_frames().get(ident)
    if frame is None:
        return "<thread not running Python code>"
    return "".join(traceback.format_stack(frame))


def _raise_in_thread(ident, exc=SystemExit):
    """Schedules `exc` in thread `ident`; it fires at its next Python bytecode."""
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc)
    )


def _signature_problem(fn, positional, context):
    """Why fn cannot be called with `positional` arguments, plus `peer` and
    `conn_id` by keyword when `context` and it declares them (None if it
    can, or if its signature cannot be read, as for some builtins)."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    keywords = {}
    if context:
        keywords = {k: None for k in ("peer", "conn_id") if k in sig.parameters}
    try:
        sig.bind(*([None] * positional), **keywords)
    except TypeError as e:
        return str(e)
    return None


def _wants_context(fn):
    """(peer, conn_id): which optional keyword parameters a handler declares."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return (False, False)
    return ("peer" in params, "conn_id" in params)
