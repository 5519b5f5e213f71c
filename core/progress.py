"""Progress and cancellation: the two signals every long stage (loading, analysis,
pruning, evaluation) shares with its caller.

``progress(done, total, message)`` is called by long work; the CLI draws a bar (or writes
JSON lines), the dashboard an ``st.progress``; ``None`` means nobody listens. ``cancel`` is
a ``threading.Event`` or a callable returning True; stages check it between units of work
and raise ``Cancelled``. ``install_interrupt_handlers`` makes SIGTERM stop work like Ctrl-C.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

Progress = Optional[Callable[[int, int, str], None]]


class Cancelled(RuntimeError):
    """Raised between units of work when the caller's cancel flag is set."""


def report(progress: Progress, done: int, total: int, message: str = "") -> None:
    """Call ``progress`` if somebody listens (keeps call sites one line)."""
    if progress is not None:
        progress(done, total, message)


class Ticker:
    """The progress of work that reports nothing while it runs (a library call of a minute):
    ``done``/``total`` are elapsed/estimated seconds, reported by :func:`ticking` every ``every``
    seconds from a daemon thread and on each :meth:`step` (the step's name). Past the estimate the
    total grows with the elapsed time, so the bar never claims the work is done before it is."""

    def __init__(self, progress: Progress, seconds: float, phase: str, every: float = 1.0):
        self.progress, self.seconds, self.phase, self.every = progress, max(float(seconds), 1.0), phase, every
        self.step_name, self.start = "", time.monotonic()
        self._lock, self._stop = threading.Lock(), threading.Event()

    def step(self, name: str) -> None:
        """A new step of the work begins: report it now."""
        self.step_name = name
        self.tick()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def tick(self) -> None:
        elapsed = self.elapsed()
        over = elapsed >= self.seconds
        total = int(elapsed) + 1 if over else int(round(self.seconds))
        note = f"s; longer than the ~{self.seconds:.0f} s estimated" if over else f"s of ~{self.seconds:.0f} s"
        with self._lock:
            report(self.progress, int(elapsed), total, f"{self.phase}: {self.step_name} ({note})")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.tick()


@contextmanager
def ticking(progress: Progress, seconds: float, phase: str, every: float = 1.0) -> Iterator[Ticker]:
    """A :class:`Ticker` reporting ``phase`` against an estimate of ``seconds`` while the block
    runs (nothing, and no thread, when nobody listens). The callback is then also called from
    the ticker's thread."""
    ticker = Ticker(progress, seconds, phase, every)
    thread = None
    if progress is not None:
        thread = threading.Thread(target=ticker._run, name=f"progress-{phase}", daemon=True)
        thread.start()
    try:
        yield ticker
    finally:
        ticker._stop.set()
        if thread is not None:
            thread.join()


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


def install_interrupt_handlers() -> dict:
    """Make SIGTERM raise ``KeyboardInterrupt`` in the main thread, like Ctrl-C, so that
    temporaries are removed on the way out; and SIGINT too where this process inherited it
    ignored (a shell starts background commands, ``nohup ... &``, with SIGINT ignored, and the
    dashboard's Cancel is a SIGINT). Returns the handlers replaced, to restore (empty, and
    nothing changed, outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    replaced = {signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        replaced[signal.SIGINT] = signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return replaced


def restore_handlers(replaced: dict) -> None:
    """Put back the handlers ``install_interrupt_handlers`` replaced."""
    for signum, handler in replaced.items():
        signal.signal(signum, handler)
