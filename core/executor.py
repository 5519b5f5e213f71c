"""Where work runs: one ``map()`` over this thread, several local devices or Ray.

``Executor.map(fn, items, shared=..., cancel=...)`` calls ``fn(item, device)`` (or
``fn(item, device, shared=shared)``) for every item and yields ``(index, result)`` as items
finish; ``result`` is the exception when ``fn`` raised (after ``ATTEMPTS`` tries on Ray).
Cancelling (a cancel flag, Ctrl-C, ``Cancelled`` raised by ``fn``) raises in the caller. Each
slot resolves its device once through ``resolve_device``:

- ``Local(device)``: one slot, in this thread, items in order.
- ``Devices(devices)``: one thread per device, one item at a time per device, items taken in
  order by whichever device is free.
- ``OnRay(address, device)``: one Ray actor per slot (a GPU each where the cluster has GPUs,
  else a CPU each); an actor is one worker process that runs its items in turn, so what a
  ``fn`` keeps in its process (a loaded model) serves every later item of that slot. ``shared``
  is put in the object store once. A failed or lost item is tried again (``ATTEMPTS``).

``executor_for`` builds one from the ``--device``/``--devices``/``--ray`` options; a wrong Ray
address fails there, before any work.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence

from .config import resolve_device
from .progress import Cancelled, is_cancelled

log = logging.getLogger(__name__)

#: An item on Ray is tried this many times (a failed or lost item is retried once).
ATTEMPTS = 2


def _call(fn: Callable, item: object, device: str, shared: object) -> object:
    return fn(item, device) if shared is None else fn(item, device, shared=shared)


def _stops(exc: BaseException) -> bool:
    return isinstance(exc, (Cancelled, KeyboardInterrupt))


class Executor:
    """Runs ``fn(item, device)`` over items on its ``slots`` (one device name each)."""

    #: items run in other processes (``fn``, items and results are pickled)
    remote: bool = False
    #: tries of an item before its exception is the result
    attempts: int = 1
    slots: list[str]

    @property
    def in_thread(self) -> bool:
        """One slot, in the caller's thread (progress and cancel reach inside the work)."""
        return not self.remote and len(self.slots) == 1

    def map(self, fn: Callable, items: Iterable, *, shared: object = None,
            cancel: object = None) -> Iterator[tuple[int, object]]:
        raise NotImplementedError

    def failure(self, exc: BaseException) -> str:
        """One line for an item that failed: its error, and the tries when more than one."""
        lines = str(exc).strip().splitlines()
        tries = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        return f"{type(exc).__name__}: {lines[-1] if lines else ''}{tries}"


class Local(Executor):
    """One device, in this thread."""

    def __init__(self, device: str = "auto") -> None:
        self.slots = [str(resolve_device(device))]

    def map(self, fn, items, *, shared=None, cancel=None):
        for i, item in enumerate(items):
            if is_cancelled(cancel):
                raise Cancelled("cancelled")
            try:
                result = _call(fn, item, self.slots[0], shared)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, who decides
                if _stops(exc):
                    raise
                result = exc
            yield i, result


class Devices(Executor):
    """Several devices of this machine: one thread each, one item at a time per device."""

    def __init__(self, devices: Sequence[str]) -> None:
        self.slots = [str(resolve_device(d)) for d in devices]

    def map(self, fn, items, *, shared=None, cancel=None):
        todo = iter(enumerate(items))
        take = threading.Lock()
        done: queue.Queue = queue.Queue()
        stop = threading.Event()

        def worker(device: str) -> None:
            while not stop.is_set():
                with take:
                    got = next(todo, None)
                if got is None:
                    break
                try:
                    done.put((got[0], _call(fn, got[1], device, shared)))
                except BaseException as exc:   # noqa: BLE001 - handed to the caller
                    done.put((got[0], exc))
            done.put(None)                     # this device has finished

        threads = [threading.Thread(target=worker, args=(d,), daemon=True, name=f"slot-{k}-{d}")
                   for k, d in enumerate(self.slots)]
        for t in threads:
            t.start()
        running = len(threads)
        try:
            while running:
                if is_cancelled(cancel):
                    raise Cancelled("cancelled")
                try:
                    got = done.get(timeout=0.5)
                except queue.Empty:
                    continue
                if got is None:
                    running -= 1
                    continue
                if isinstance(got[1], BaseException) and _stops(got[1]):
                    raise got[1]
                yield got
        finally:
            stop.set()                 # the devices stop after their current item
            for t in threads:
                t.join()


class _Slot:
    """A Ray actor: one worker process with its device resolved once."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" \
            else str(resolve_device(device))

    def run(self, fn: Callable, item: object, shared: object) -> object:
        return _call(fn, item, self.device, shared)


class OnRay(Executor):
    """Ray: one actor per slot (``slots`` GPUs where the cluster has GPUs and ``device`` is not
    cpu, else CPUs), connected now (``core.cluster.connect``)."""

    remote = True
    attempts = ATTEMPTS

    def __init__(self, address: str | bool | None = True, device: str = "auto", slots: int | None = None) -> None:
        from .cluster import cluster_cpus, cluster_gpus, connect

        self.ray = connect(address)
        self.gpus = cluster_gpus(self.ray) if str(device).lower() != "cpu" else 0
        kind = "cpu" if str(device).lower() == "cpu" else ("auto" if self.gpus else "cpu")
        self.device = kind
        self.slots = [kind] * (slots or self.gpus or cluster_cpus(self.ray))

    @property
    def device_kind(self) -> str:
        """``cuda`` or ``cpu``: what every slot computes on."""
        return "cuda" if self.device == "auto" else "cpu"

    def map(self, fn, items, *, shared=None, cancel=None):
        ray = self.ray
        # a lost worker restarts and Ray runs its item again there (max_task_retries); an item that
        # raised is tried again here, on the next free slot
        actor = ray.remote(num_gpus=1 if self.gpus else 0, num_cpus=0 if self.gpus else 1, max_restarts=-1,
                           max_task_retries=self.attempts - 1)(_Slot)
        actors = [actor.remote(d) for d in self.slots]
        shared_ref = ray.put(shared) if shared is not None else None
        fn_ref = ray.put(fn)
        todo = iter(enumerate(items))
        again: list[tuple[int, object, int]] = []
        idle = list(actors)
        pending: dict = {}
        try:
            while True:
                while idle:
                    got = again.pop(0) if again else next(((i, it, 1) for i, it in todo), None)
                    if got is None:
                        break
                    slot = idle.pop(0)
                    pending[slot.run.remote(fn_ref, got[1], shared_ref)] = (*got, slot)
                if not pending:
                    return
                if is_cancelled(cancel):
                    raise Cancelled("cancelled: the driver stopped the Ray work")
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    i, item, tried, slot = pending.pop(ref)
                    idle.append(slot)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:      # the item raised
                        result = _cause(exc)
                        if _stops(result):
                            raise result from None
                        if tried < self.attempts:
                            log.info("Ray: item %d failed (%s); trying it again", i, result)
                            again.append((i, item, tried + 1))
                            continue
                    except ray.exceptions.RayError as exc:          # lost after Ray's own retries
                        result = _cause(exc)
                    yield i, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            for a in actors:
                ray.kill(a)


def _cause(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def executor_for(device: str = "auto", devices: Sequence[str] | None = None,
                 ray: str | bool | None = None) -> Executor:
    """The executor of the ``--device``, ``--devices`` and ``--ray`` options: Ray when ``ray``
    (connected now: a wrong address fails before any work), several devices when ``devices``
    names more than one, else one device in this thread."""
    if ray:
        return OnRay(ray, device)
    if devices and len(devices) > 1:
        return Devices(devices)
    return Local(devices[0] if devices else device)
