"""Projected analysis time of 70B- and 405B-parameter LLaMA models on 1-8 GPUs of one machine,
from the measured spectrum time of each distinct matrix shape and the measured read bandwidth.

Model (stated in every table): the matrices are placed on the GPUs by longest-processing-time
first with their measured times (``busiest`` = the largest sum of one GPU); every matrix is
read once from the safetensors files on one disk that all the GPUs of the machine share, so
reading takes ``bytes / bandwidth`` whatever the number of GPUs. Reading overlaps computing
(each GPU computes one matrix while the next is read, as the streaming path reads lazily):
``overlapped = max(read, busiest)``; ``serial = read + busiest`` is the bound without overlap.

    python benchmarks/projection.py [--small] [--device cpu] [--read-mib 2048] [--json FILE]
    python benchmarks/projection.py --estimate-from benchmarks/results/gpu_check.json   # no GPU here

``--small``: the shapes divided by 32 (a CPU smoke test; its times say nothing of a GPU).
``--estimate-from``: ESTIMATED times of the real shapes (``fitted_seconds``) from the shapes an
earlier GPU run of gpu_check measured, with the read bandwidth measured here.
``benchmarks/gpu_check.py`` runs ``measure`` as its projection stage on the GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.models import MatrixInfo  # noqa: E402
from core.spectra import compute_spectra  # noqa: E402

#: blocks, hidden, intermediate, key/value rows (kv heads x head dim) of the published configs
MODELS = {"LLaMA-2-70B": dict(blocks=80, hidden=8192, inter=28672, kv=1024),
          "LLaMA-3.1-405B": dict(blocks=126, hidden=16384, inter=53248, kv=1024)}
SCALE = 32
SMALL_MODELS = {f"{name} / {SCALE}": {k: v if k == "blocks" else v // SCALE for k, v in dims.items()}
                for name, dims in MODELS.items()}
GPUS = (1, 2, 4, 8)
BYTES_PER_WEIGHT = 2        # bfloat16 / float16 checkpoints


def block_shapes(hidden: int, inter: int, kv: int) -> list[tuple[int, int]]:
    """(rows, cols) of one block's matrices: q, k, v, o, gate, up, down (rows = out features)."""
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
            (hidden, inter)]


def shape_counts(dims: dict) -> Counter:
    """How many matrices of each shape the model has."""
    return Counter({s: n * dims["blocks"] for s, n in Counter(block_shapes(dims["hidden"], dims["inter"],
                                                                           dims["kv"])).items()})


def key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def busiest(counts: Counter, seconds: dict[tuple[int, int], float], gpus: int) -> float:
    """The largest sum of one GPU's matrix times, longest first onto the least loaded GPU."""
    loads = [0.0] * gpus
    for shape in sorted(counts, key=lambda s: -seconds[s]):
        for _ in range(counts[shape]):
            i = min(range(gpus), key=lambda k: (loads[k], k))
            loads[i] += seconds[shape]
    return max(loads)


def project(counts: Counter, seconds: dict[tuple[int, int], float], bandwidth: float, gpus: int,
            bytes_per_weight: int = BYTES_PER_WEIGHT) -> dict:
    """Seconds to compute, to read and in all (overlapped and serial) on ``gpus`` GPUs of one
    machine reading at ``bandwidth`` bytes/s; ``seconds[shape]``: one matrix's spectrum time."""
    compute = busiest(counts, seconds, gpus)
    read_bytes = bytes_per_weight * sum(r * c * n for (r, c), n in counts.items())
    read = read_bytes / bandwidth
    return {"gpus": gpus, "matrices": sum(counts.values()), "read_gb": read_bytes / 1e9, "compute_s": compute,
            "read_s": read, "overlapped_s": max(compute, read), "serial_s": compute + read}


def time_shapes(shapes: list[tuple[int, int]], device: str, count: int = 1) -> dict[tuple[int, int], float]:
    """Seconds of one matrix's spectrum (``compute_spectra``, the path in use) by shape: ``count``
    random matrices of the shape generated on ``device``, timed together, divided by ``count``;
    one small matrix first warms the device up."""
    cuda = str(device).startswith("cuda")

    def run(r: int, c: int, n: int) -> float:
        g = torch.Generator(device=device).manual_seed(r * 7 + c)
        items = [(MatrixInfo(f"m{k}", 0, "x", r, c), torch.randn(r, c, generator=g, device=device) / c ** 0.5)
                 for k in range(n)]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        compute_spectra(items, total=n, device=device)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / n
        del items
        if cuda:
            torch.cuda.empty_cache()
        return seconds

    run(64, 64, 1)
    return {s: run(*s, count) for s in shapes}


def read_bandwidth(folder: str | os.PathLike | None = None, nbytes: int = 2 << 30, chunk: int = 64 << 20
                   ) -> tuple[float, str]:
    """Bytes/s of reading a new ``nbytes`` file in ``folder`` whose pages were dropped from the
    page cache (written, fsync'ed, ``posix_fadvise(DONTNEED)``), and how it was measured."""
    with tempfile.TemporaryDirectory(dir=folder, prefix="spectrascope-read-") as tmp:
        path = Path(tmp) / "weights.bin"
        block = os.urandom(chunk)
        with open(path, "wb") as f:
            for _ in range(max(1, nbytes // chunk)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            buf = bytearray(chunk)
            start = time.perf_counter()
            while os.readv(fd, [buf]):
                pass
            seconds = time.perf_counter() - start
        finally:
            os.close(fd)
    how = (f"{size / 2**20:.0f} MiB file in {Path(folder or tempfile.gettempdir())}, written, fsync'ed and dropped "
           "from the page cache with posix_fadvise(DONTNEED), read in 64 MiB chunks (a virtual disk's host cache, "
           "if any, is not dropped)")
    return size / seconds, how


def measure(small: bool, device: str, read_bytes: int, folder: str | None = None) -> dict:
    """Per-shape spectrum times on ``device``, the read bandwidth here, and the projection."""
    models = SMALL_MODELS if small else MODELS
    counts = {name: shape_counts(dims) for name, dims in models.items()}
    shapes = sorted({s for c in counts.values() for s in c})
    seconds = time_shapes(shapes, device, count=2 if small else 1)
    bandwidth, how = read_bandwidth(folder, read_bytes)
    rows = [{"model": name, **project(c, seconds, bandwidth, g)} for name, c in counts.items() for g in GPUS]
    return {"device": device, "small": small, "per_shape_ms": {key(s): t * 1000 for s, t in seconds.items()},
            "read_gb_per_s": bandwidth / 1e9, "read_method": how, "projection": rows,
            "model": "overlapped = max(read, busiest GPU's compute); serial = read + compute; one shared disk"}


def fitted_seconds(measured_ms: dict[str, float], shapes: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """ESTIMATED seconds of ``shapes`` from spectrum times measured on other shapes (``"RxC": ms``):
    ``t = a m n^2 + b n^3`` (Gram product and eigen-solver, ``n = min``, ``m = max``) fitted by
    least squares, or, from one shape or a negative coefficient, ``t`` proportional to
    ``core.devices.matrix_cost`` through the largest measured shape."""
    import numpy as np

    from core.devices import matrix_cost

    pts = [(tuple(int(x) for x in k.split("x")), ms / 1000) for k, ms in measured_ms.items()]

    def feats(r: int, c: int) -> list[float]:
        n, m = min(r, c), max(r, c)
        return [float(m) * n * n, float(n) ** 3]

    coef = None
    if len({tuple(feats(*s)) for s, _ in pts}) >= 2:
        coef, *_ = np.linalg.lstsq(np.array([feats(*s) for s, _ in pts]), np.array([t for _, t in pts]), rcond=None)
    if coef is not None and min(coef) >= 0:
        return {s: float(np.dot(coef, feats(*s))) for s in shapes}
    ref, t = max(pts, key=lambda p: matrix_cost(*p[0]))
    return {s: t * matrix_cost(*s) / matrix_cost(*ref) for s in shapes}


def estimated(measured_ms: dict[str, float], bandwidth: float, how: str) -> dict:
    """``measure``'s result for the real shapes with ESTIMATED spectrum times (``fitted_seconds``
    of the times measured on other shapes) and the read bandwidth as given."""
    counts = {name: shape_counts(dims) for name, dims in MODELS.items()}
    shapes = sorted({s for c in counts.values() for s in c})
    seconds = fitted_seconds(measured_ms, shapes)
    rows = [{"model": name, **project(c, seconds, bandwidth, g)} for name, c in counts.items() for g in GPUS]
    return {"device": "GPU", "estimated": True, "small": False,
            "per_shape_ms": {key(s): t * 1000 for s, t in seconds.items()},
            "read_gb_per_s": bandwidth / 1e9, "read_method": how, "projection": rows,
            "model": "overlapped = max(read, busiest GPU's compute); serial = read + compute; one shared disk"}


def fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def table(res: dict, label: str = "") -> str:
    """The Markdown table of ``measure``'s result (``label``: how the times were obtained)."""
    lines = [f"Per-shape spectrum times on {res['device']}{label}: "
             + ", ".join(f"{k} {v:.1f} ms" for k, v in res["per_shape_ms"].items()),
             f"Read bandwidth {res['read_gb_per_s']:.2f} GB/s: {res['read_method']}.",
             f"Model: {res['model']}.", "",
             "| model | GPUs | matrices | weights read | compute (busiest GPU) | read time "
             "| projected (overlapped) | serial |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["projection"]:
        lines.append(f"| {r['model']} | {r['gpus']} | {r['matrices']} | {r['read_gb']:.0f} GB | {fmt(r['compute_s'])} "
                     f"| {fmt(r['read_s'])} | {fmt(r['overlapped_s'])} | {fmt(r['serial_s'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help=f"shapes divided by {SCALE} (a CPU smoke test)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--read-mib", type=int, default=2048, help="size of the read-bandwidth file (MiB, default 2048)")
    p.add_argument("--dir", help="folder of the read-bandwidth file (default the temporary folder)")
    p.add_argument("--estimate-from", metavar="GPU_CHECK_JSON",
                   help="ESTIMATE from the per-shape times of a GPU run of gpu_check instead of measuring")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if args.estimate_from:
        run = json.loads(Path(args.estimate_from).read_text())
        if not str(run.get("device", "")).startswith("cuda") or not run.get("per_matrix_ms"):
            print(f"projection: {args.estimate_from} is not a GPU run of gpu_check with per-shape times",
                  file=sys.stderr)
            return 2
        bandwidth, how = read_bandwidth(args.dir, args.read_mib << 20)
        res = estimated(run["per_matrix_ms"], bandwidth, how)
        print(table(res, f": ESTIMATED from {', '.join(f'{k} {v:.0f} ms' for k, v in run['per_matrix_ms'].items())} "
                         f"measured on {run.get('device_name')} ({run.get('date')}), fitted as a m n^2 + b n^3"))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("projection: no CUDA GPU visible; run with --device cpu --small for the smoke test", file=sys.stderr)
        return 2
    res = measure(args.small, args.device, args.read_mib << 20, args.dir)
    print(table(res, " (shapes / 32: a smoke test, ESTIMATES nothing about a GPU)" if args.small else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
