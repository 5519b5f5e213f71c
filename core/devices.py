"""Many devices on one machine: which device computes which matrix, and which GPU runs which
sweep run. Only scheduling lives here; the work itself is ``compute_spectra`` and the runs.

``plan_devices`` balances matrices over devices by their estimated eigen-solver cost
(longest first onto the least loaded device), so each device gets same-shaped batches;
``map_on_devices`` runs one job at a time per device from a shared queue (sweeps: one run
per GPU).
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from .config import resolve_device
from .models import MatrixInfo
from .progress import Progress, report

T = TypeVar("T")
R = TypeVar("R")


def parse_devices(text: str | Sequence[str] | None) -> list[str]:
    """``"0,1"`` / ``"cuda:0,cuda:1"`` / ``"cuda"`` (every visible GPU) / ``"cpu"`` -> device names.

    Numbers mean CUDA devices. Names are not checked against the machine here
    (``check_devices`` does), so plans can be made for fake device lists."""
    items = text if isinstance(text, (list, tuple)) else [x.strip() for x in str(text or "").split(",")]
    out: list[str] = []
    for item in (str(x).strip().lower() for x in items if str(x).strip()):
        if item.isdigit():
            out.append(f"cuda:{item}")
        elif item == "cuda":
            count = torch.cuda.device_count()
            if count == 0:
                raise ValueError("--devices cuda: no CUDA GPU is visible; use --device cpu or auto")
            out += [f"cuda:{i}" for i in range(count)]
        elif item in ("cpu", "mps") or (item.startswith("cuda:") and item[5:].isdigit()):
            out.append(item)
        else:
            raise ValueError(f"--devices {text!r}: {item!r} is not a device; give GPU numbers (0,1) or names "
                             "(cuda:0,cuda:1, cuda for all, cpu)")
    if not out:
        raise ValueError(f"--devices {text!r}: give at least one device, e.g. 0,1 or cuda")
    if len(set(out)) != len(out):
        raise ValueError(f"--devices {text!r}: a device is named twice")
    return out


def devices_of(device: str, devices: str | None) -> list[str] | None:
    """The device list of the ``--device``/``--devices`` options: ``--devices`` when given,
    every visible GPU for ``--device cuda`` on a machine with several, else ``None`` (one device)."""
    if devices:
        return parse_devices(devices)
    if str(device).strip().lower() == "cuda" and torch.cuda.device_count() > 1:
        return parse_devices("cuda")
    return None


def check_devices(devices: Sequence[str]) -> list[torch.device]:
    """The devices as torch devices; a device this machine lacks is a clear error."""
    return [resolve_device(d) for d in devices]


def matrix_cost(rows: int, cols: int) -> float:
    """Estimated cost of one spectrum: the Gram product (``m n^2``) plus the symmetric
    eigen-solver (about ``n^3``), ``n = min(rows, cols)``."""
    n, m = min(rows, cols), max(rows, cols)
    return float(m) * n * n + float(n) ** 3


def plan_devices(shapes: Sequence[tuple[int, int]], devices: Sequence[str]) -> list[str]:
    """The device of each matrix (``shapes[i]`` -> result ``[i]``), balancing the estimated cost.

    Greedy longest-processing-time: matrices by falling cost (ties: input order) each go to
    the device with the least work so far (ties: the first device). Deterministic."""
    if not devices:
        raise ValueError("plan_devices: give at least one device")
    load = [0.0] * len(devices)
    out = [""] * len(shapes)
    order = sorted(range(len(shapes)), key=lambda i: (-matrix_cost(*shapes[i]), i))
    for i in order:
        d = min(range(len(devices)), key=lambda k: (load[k], k))
        load[d] += matrix_cost(*shapes[i])
        out[i] = devices[d]
    return out


def plan_loads(shapes: Sequence[tuple[int, int]], devices: Sequence[str]) -> dict[str, float]:
    """The estimated cost each device gets under ``plan_devices`` (for reports and tests)."""
    loads = dict.fromkeys(devices, 0.0)
    for shape, dev in zip(shapes, plan_devices(shapes, devices)):
        loads[dev] += matrix_cost(*shape)
    return loads


def map_on_devices(fn: Callable[[T, str], R], items: Iterable[T], devices: Sequence[str]
                   ) -> Iterator[tuple[int, R | BaseException]]:
    """Run ``fn(item, device)`` for every item, one item at a time per device, items taken in
    order from a shared queue by whichever device is free. Yields ``(index, result)`` as runs
    finish (``result`` is the exception when ``fn`` raised). Closing the iterator early stops
    the devices after their current item."""
    todo: queue.Queue = queue.Queue()
    for i, item in enumerate(items):
        todo.put((i, item))
    done: queue.Queue = queue.Queue()
    stop = threading.Event()
    n = todo.qsize()

    def worker(device: str) -> None:
        while not stop.is_set():
            try:
                i, item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((i, fn(item, device)))
            except BaseException as exc:   # handed to the caller, who decides
                done.put((i, exc))

    threads = [threading.Thread(target=worker, args=(d,), daemon=True, name=f"device-{d}") for d in devices]
    for t in threads:
        t.start()
    try:
        for _ in range(n):
            yield done.get()
    finally:
        stop.set()
        for t in threads:
            t.join()


def spectra_on_devices(items: Iterable[tuple[MatrixInfo, torch.Tensor]], devices: Sequence[str], *,
                       compute: Callable[..., list], infos: Sequence[MatrixInfo] | None = None,
                       budget_bytes: int = 1 << 30, progress: Progress = None, **options: object) -> list:
    """``compute(items_of_device, device=..., total=..., budget_bytes=..., progress=...)``
    (``compute_spectra``) on each device with the matrices ``plan_devices`` gives it, in
    parallel; the results in input order.

    ``items`` is read lazily, in order, while the devices work (``infos``, the matrices in the
    same order, make the plan before any read; without them ``items`` is read first): each
    weight goes to its device's queue, at most ``budget_bytes`` of weights wait in the queues
    and each device batches at most ``budget_bytes / len(devices)`` (float64). ``progress``
    gets the matrices done on all devices together."""
    if infos is None:
        items = list(items)
        infos = [i for i, _ in items]
    slots = [str(n) for n in range(len(devices))]          # by position: a device may be named twice
    plan = plan_devices([(i.rows, i.cols) for i in infos], slots)
    per = {d: [k for k, p in enumerate(plan) if p == d] for d in slots}
    jobs = [d for d in slots if per[d]]
    queues = {d: queue.Queue() for d in jobs}
    waiting = _Budget(budget_bytes)
    stop = threading.Event()
    done_by: dict[str, int] = dict.fromkeys(jobs, 0)
    lock = threading.Lock()
    report(progress, 0, len(infos), "eigenvalues")

    def feed() -> None:              # the reader: one pass over ``items``, each weight to its device
        try:
            for k, item in enumerate(items):
                size = item[1].numel() * 8 if hasattr(item[1], "numel") else 0
                if not waiting.take(size, stop) or k >= len(plan):
                    return
                queues[plan[k]].put((item, size))
        except BaseException as exc:   # a read failed: every device stops with it
            halt(exc)

    def halt(exc: BaseException) -> None:
        stop.set()
        for q in queues.values():
            q.put(exc)

    def own(device: str) -> Iterator:
        for _ in per[device]:
            got = queues[device].get()
            if isinstance(got, BaseException):
                raise got
            item, size = got
            waiting.give(size)
            yield item

    def counted(device: str) -> Callable[[int, int, str], None]:
        def tell(n: int, _total: int, _message: str = "") -> None:
            with lock:
                done_by[device] = n
                report(progress, sum(done_by.values()), len(infos), "eigenvalues")
        return tell

    def run(device: str, _: str) -> list:     # device: the slot (position in ``devices``)
        try:
            return compute(own(device), device=devices[int(device)], total=len(per[device]),
                           budget_bytes=max(1, budget_bytes // len(jobs)), progress=counted(device), **options)
        except BaseException as exc:   # the other devices stop too (the reader would wait on this one)
            halt(exc)
            raise

    reader = threading.Thread(target=feed, daemon=True, name="device-reader")
    reader.start()
    out: list = [None] * len(infos)
    try:
        for j, result in map_on_devices(run, jobs, jobs):
            if isinstance(result, BaseException):
                raise result
            for k, spec in zip(per[jobs[j]], result):
                out[k] = spec
    finally:
        stop.set()
        waiting.give(0)
        reader.join()
    return out


class _Budget:
    """Bytes of weights read but not yet taken by a device: the reader waits while it is spent
    (one weight larger than the budget passes alone)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def take(self, size: int, stop: threading.Event) -> bool:
        with self.cond:
            while self.used and self.used + size > self.limit and not stop.is_set():
                self.cond.wait(0.5)
            self.used += size
            return not stop.is_set()

    def give(self, size: int) -> None:
        with self.cond:
            self.used -= size
            self.cond.notify_all()
