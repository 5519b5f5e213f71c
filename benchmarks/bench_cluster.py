"""Scaling of the Ray analysis (1 vs 2 workers, the same run) and the projection of 70B and
405B analyses on 1-8 GPUs (``benchmarks/projection.py``).

Measured: the spectra of the demo model (SmolLM2-135M, 210 matrices) on Ray
(``core.executor.OnRay``, one actor per CPU, each reading its own tensors from the converted
safetensors folder) on a local instance with 1 and then 2 worker CPUs (start-up excluded;
best of ``--repeat``).
Projected: the per-shape spectrum times and read bandwidth of the projection stage of a GPU
run of ``gpu_check.py`` (``benchmarks/results/gpu_check.json``) when there is one; otherwise
ESTIMATED times (``--gpu-ms`` for 4096x4096, default 500 ms, scaled by
``core.devices.matrix_cost``) with the read bandwidth measured here (``--read-mib``).

    .venv/bin/python benchmarks/bench_cluster.py [--repeat 2] [--read-mib 2048] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.analysis import Weights, spectra_on  # noqa: E402
from core.cluster import connect  # noqa: E402
from core.executor import OnRay  # noqa: E402
from core.models import gguf_to_folder, resolve_source  # noqa: E402

import projection  # noqa: E402  (benchmarks/projection.py)


def ray_seconds(workers: int, repeat: int) -> float:
    ray = connect(True, num_cpus=workers)
    src = resolve_source("demo")
    folder = gguf_to_folder(src.path)
    executor = OnRay(True, "cpu")

    def weights() -> Weights:
        return Weights.of_checkpoint(folder, label=src.label, identity=src.identity())

    spectra_on(executor, weights())                         # warm up (imports, first read)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        spectra_on(executor, weights())
        best = min(best, time.perf_counter() - start)
    ray.shutdown()
    return best


def projected(check: Path, gpu_ms: float, read_mib: int) -> tuple[dict, str]:
    """The projection stage of a GPU run of gpu_check (per-shape times measured on the real
    shapes), else ESTIMATED from the shapes it measured (or ``gpu_ms`` at 4096x4096) with the
    read bandwidth measured here."""
    res = json.loads(check.read_text()) if check.is_file() else {}
    stage = res.get("projection", {})
    gpu = str(res.get("device", "")).startswith("cuda") and not res.get("small")
    if gpu and stage.get("per_shape_ms"):
        return stage, f" (measured by gpu_check on {res.get('device_name')}, {res.get('date')})"
    measured = res.get("per_matrix_ms") if gpu and "error" not in res.get("per_matrix_ms", {}) else None
    bandwidth, how = projection.read_bandwidth(nbytes=read_mib << 20)
    est = projection.estimated(measured or {"4096x4096": gpu_ms}, bandwidth, how)
    source = (f"the {', '.join(measured)} times gpu_check measured on {res.get('device_name')} ({res.get('date')})"
              if measured else f"--gpu-ms {gpu_ms:.0f} at 4096x4096")
    return est, f": ESTIMATED from {source}, fitted as a m n^2 + b n^3; read bandwidth measured here"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--gpu-ms", type=float, default=500.0, help="ESTIMATED 4096x4096 float64 spectrum time (ms)")
    p.add_argument("--read-mib", type=int, default=2048, help="read-bandwidth file without a GPU run (MiB)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    one, two = ray_seconds(1, args.repeat), ray_seconds(2, args.repeat)
    proj, label = projected(ROOT / "benchmarks" / "results" / "gpu_check.json", args.gpu_ms, args.read_mib)
    print("| Ray workers (local, CPU) | demo analysis spectra (210 matrices) | speed-up |\n|---|---|---|")
    print(f"| 1 | {one:.1f} s | 1.00 |\n| 2 | {two:.1f} s | {one / two:.2f} |\n")
    print(projection.table(proj, label))
    if args.json:
        Path(args.json).write_text(json.dumps({"ray_1_worker_s": one, "ray_2_workers_s": two, "projection": proj},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
