"""Many devices: their names, and which device (or Ray slot) computes which matrix. Only
planning lives here; ``core.executor`` runs the work.

``plan_devices`` balances matrices over devices by their estimated eigen-solver cost
(longest first onto the least loaded device), so each device gets same-shaped batches.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .config import resolve_device


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
