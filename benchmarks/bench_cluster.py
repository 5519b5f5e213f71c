"""Scaling of the Ray analysis (1 vs 2 workers, the same run) and a projection of 70B and
405B analyses on 8 and 64 GPUs from per-matrix costs.

Measured: the spectra of the demo model (SmolLM2-135M, 210 matrices) on Ray
(``core.executor.OnRay``, one actor per CPU, each reading its own tensors from the converted
safetensors folder) on a local instance with 1 and then 2 worker CPUs (start-up excluded;
best of ``--repeat``).
Projected: each matrix's time is a reference time scaled by ``core.devices.matrix_cost``;
the matrices are placed with ``plan_devices`` and the busiest GPU's sum is the wall time.
The reference is the 4096x4096 spectrum time of ``benchmarks/results/gpu_check.json`` when a
GPU run left one, otherwise an ESTIMATE (``--gpu-ms``, default 500 ms for 4096x4096 in
float64 on one H200-class GPU: unmeasured until gpu_check runs).

    .venv/bin/python benchmarks/bench_cluster.py [--repeat 2] [--json FILE]
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
from core.devices import matrix_cost, plan_loads  # noqa: E402
from core.executor import OnRay  # noqa: E402
from core.cluster import connect  # noqa: E402
from core.models import gguf_to_folder, resolve_source  # noqa: E402

#: (blocks, hidden, intermediate, key/value width) of LLaMA-shaped models.
MODELS = {"LLaMA-7B": (32, 4096, 11008, 4096), "LLaMA-70B": (80, 8192, 28672, 1024),
          "LLaMA-405B": (126, 16384, 53248, 1024)}


def shapes(blocks: int, h: int, f: int, kv: int) -> list[tuple[int, int]]:
    one = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]
    return one * blocks


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


def projection(ref_ms: float, gpus: list[int]) -> list[dict]:
    ref = matrix_cost(4096, 4096)
    out = []
    for name, dims in MODELS.items():
        s = shapes(*dims)
        for g in gpus:
            loads = plan_loads(s, [f"cuda:{i}" for i in range(g)])
            out.append({"model": name, "matrices": len(s), "gpus": g,
                        "minutes": max(loads.values()) / ref * ref_ms / 1000 / 60})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--gpu-ms", type=float, default=500.0, help="ESTIMATED 4096x4096 float64 spectrum time (ms)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    one, two = ray_seconds(1, args.repeat), ray_seconds(2, args.repeat)
    check = ROOT / "benchmarks" / "results" / "gpu_check.json"
    measured = json.loads(check.read_text()).get("per_matrix_ms", {}).get("4096x4096") if check.is_file() else None
    ref_ms = measured or args.gpu_ms
    proj = projection(ref_ms, [1, 8, 64])
    print("| Ray workers (local, CPU) | demo analysis spectra (210 matrices) | speed-up |\n|---|---|---|")
    print(f"| 1 | {one:.1f} s | 1.00 |\n| 2 | {two:.1f} s | {one / two:.2f} |\n")
    print(f"4096x4096 spectrum on one GPU: {ref_ms:.0f} ms ({'measured by gpu_check' if measured else 'ESTIMATE'})\n")
    print("| model | matrices | GPUs | projected analysis (spectra) |\n|---|---|---|---|")
    for r in proj:
        m = r["minutes"]
        print(f"| {r['model']} | {r['matrices']} | {r['gpus']} | {f'{m * 60:.0f} s' if m < 2 else f'{m:.0f} min'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"ray_1_worker_s": one, "ray_2_workers_s": two, "ref_ms": ref_ms,
                                               "ref_measured": bool(measured), "projection": proj}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
