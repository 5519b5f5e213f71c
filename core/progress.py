"""Progress and cancellation: the two signals every long stage (loading, analysis,
pruning, evaluation) shares with its caller.

``progress(done, total, message)`` is called by long work; the CLI draws a bar (or writes
JSON lines), the dashboard an ``st.progress``; ``None`` means nobody listens. ``cancel`` is
a ``threading.Event`` or a callable returning True; stages check it between units of work
and raise ``Cancelled``. ``install_sigterm_handler`` makes SIGTERM stop work like Ctrl-C.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable, Optional

Progress = Optional[Callable[[int, int, str], None]]


class Cancelled(RuntimeError):
    """Raised between units of work when the caller's cancel flag is set."""


def report(progress: Progress, done: int, total: int, message: str = "") -> None:
    """Call ``progress`` if somebody listens (keeps call sites one line)."""
    if progress is not None:
        progress(done, total, message)


def within(progress: Progress, prefix: str) -> Progress:
    """``progress`` with every message prefixed (``"candidate 2 of 4 · "`` before ``"pruning block
    1/30"``), so that an inner stage that restarts its count says which outer step it is in."""
    if progress is None:
        return None
    return lambda done, total, message="": progress(done, total, f"{prefix}{message}")


def is_cancelled(cancel: object) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def check_cancel(cancel: object, where: str = "") -> None:
    """Raise ``Cancelled`` if ``cancel`` is set (``where`` ends up in the message)."""
    if is_cancelled(cancel):
        raise Cancelled(f"cancelled{' ' + where if where else ''}")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def install_sigterm_handler() -> bool:
    """Make SIGTERM raise ``KeyboardInterrupt`` in the main thread, like Ctrl-C, so that
    temporaries are removed on the way out. False (and nothing changed) outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _raise_interrupt)
    return True
