"""How long one allocation takes on the 560-matrix profiles (the dashboard's slider budget: 5 ms).

Times ``core.allocation.allocate`` (validation, NaN fill, block means, tau map, clipped
rescale, result table) against the bare published formula in plain numpy on arrays taken
out of the table beforehand (no checks, no clipping, no dense kinds, no result object),
median of many runs.

    .venv/bin/python benchmarks/bench_allocation.py [--runs 500]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np

from core.allocation import allocate
from core.profiles import load_profile

BUDGET_MS = 5.0
CASES = [  # (profile, options); the last three clip at r_max (water-filling)
    ("llama-65b-hf", {"sparsity": 0.7, "epsilon": 0.3}),
    ("llama-65b-hf", {"sparsity": 0.7, "epsilon": 0.3, "mapping": "matrix"}),
    ("llama2-70b-hf", {"sparsity": 0.7, "epsilon": 0.3}),
    ("llama-65b-hf", {"sparsity": 0.9, "epsilon": 0.3}),
    ("llama-65b-hf", {"sparsity": 0.8, "epsilon": 0.3, "dense_kinds": "k,v"}),
    ("llama2-70b-hf", {"sparsity": 0.8, "epsilon": 0.3, "dense_kinds": "k,v"}),
]


def reference(alpha: np.ndarray, params: np.ndarray, *, sparsity: float, epsilon: float,
              mapping: str = "block", **_: object) -> np.ndarray:
    """The published formula, nothing else: block means, min-max map, weighted rescale."""
    m = alpha.reshape(-1, 7).mean(axis=1).repeat(7) if mapping == "block" else alpha
    q = (1 - epsilon) + 2 * epsilon * (m - m.min()) / (m.max() - m.min())
    return q * sparsity * params.sum() / (params * q).sum()


def timings_ms(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(median, best) wall time of one call in ms; a best far below the median means a busy machine."""
    for _ in range(min(20, runs)):  # warm-up
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6, min(times) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500, help="timed runs per case (default 500)")
    args = parser.parse_args(argv)

    print(f"{'profile':<14} {'options':<46} {'rows':>4} {'clipped':>7} {'allocate ms':>11} {'(best)':>7} "
          f"{'reference ms':>12} {'ratio':>6}")
    worst = 0.0
    for name, options in CASES:
        table = load_profile(name)
        alpha = table["alpha"].to_numpy()
        params = table["params"].to_numpy(dtype=np.float64)
        result = allocate(table, **options)
        ours, best = timings_ms(lambda: allocate(table, **options), args.runs)
        ref, _ = timings_ms(lambda: reference(alpha, params, **options), args.runs)
        worst = max(worst, ours)
        described = ", ".join(f"{k}={v}" for k, v in options.items())
        print(f"{name:<14} {described:<46} {len(table):>4} {result.n_clipped:>7} {ours:>11.3f} {best:>7.3f} "
              f"{ref:>12.4f} {ours / ref:>5.0f}x")
    verdict = "within" if worst < BUDGET_MS else "OVER"
    print(f"slowest allocation {worst:.3f} ms (median of {args.runs}): {verdict} the {BUDGET_MS:g} ms slider budget")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
