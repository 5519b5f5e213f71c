"""Whole analysis of the demo model against the bare eigen-solver floor, WeightWatcher and powerlaw.

    .venv/bin/python benchmarks/bench_analysis.py [--powerlaw-sample 30]

Prints each timing and the ratios the issue asks for: engine / floor (target <= 1.3),
WeightWatcher / engine (target >= 3), powerlaw.Fit / our full fit on the same spectra.
Everything runs in this one process on the same matrices; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import core  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from common import best_time
from core.analysis import analyze
from core.fit import fit_power_law
from core.models import load_model


def bare_eig(w: torch.Tensor) -> np.ndarray:
    a = w.detach().double().numpy()
    return np.linalg.eigvalsh(a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--powerlaw-sample", type=int, default=30, help="spectra fitted by powerlaw.Fit (~1 s each)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    demo = load_model("demo", device="cpu", tokenizer=False)
    weights = [demo.weight(i.name) for i in demo.matrices]
    print(f"demo model: {len(weights)} matrices, torch {torch.__version__}, {os.cpu_count()} CPUs")

    t_seq, _ = best_time(lambda: [bare_eig(w) for w in weights], args.repeat)
    with threadpool_limits(1):
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            t_par, _ = best_time(lambda: list(pool.map(bare_eig, weights)), args.repeat)
    floor = min(t_seq, t_par)
    print(f"floor, bare Gram+eigvalsh float64, one after another : {t_seq:7.2f} s")
    print(f"floor, bare Gram+eigvalsh float64, {os.cpu_count()} threads        : {t_par:7.2f} s")
    t_peak, res = best_time(lambda: analyze(demo, xmin="peak", device="cpu", use_cache=False), args.repeat)
    t_full, res_full = best_time(lambda: analyze(demo, xmin="full", device="cpu", use_cache=False), 1)
    print(f"engine analyze(xmin=peak): eigenvalues+fits+metrics : {t_peak:7.2f} s  ({t_peak / floor:.2f}x floor)")
    print(f"engine analyze(xmin=full)                           : {t_full:7.2f} s  ({t_full / floor:.2f}x floor)")

    try:
        import weightwatcher as ww
        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        t_ww, details = best_time(lambda: ww.WeightWatcher(model=demo.model).analyze(), 1)
        print(f"WeightWatcher {ww.__version__} analyze() defaults ({len(details)} layers): {t_ww:7.2f} s  "
              f"-> engine(peak) is {t_ww / t_peak:.1f}x faster, engine(full) {t_ww / t_full:.1f}x")
    except ImportError:
        print("WeightWatcher not installed (pip install -e '.[bench]')")

    import powerlaw
    names = list(res_full.table["name"])
    sample = names[:: max(1, len(names) // args.powerlaw_sample)][: args.powerlaw_sample]
    spectra = [res_full.eigs[n] for n in sample]
    t_pl, _ = best_time(lambda: [powerlaw.Fit(e, parameter_ranges={"alpha": [1, 1000]}, verbose=False)
                             for e in spectra], 1)
    t_ours, _ = best_time(lambda: [fit_power_law(e, xmin="full") for e in spectra], args.repeat)
    print(f"powerlaw.Fit on {len(spectra)} demo spectra: {t_pl:7.2f} s; our full fit: {t_ours:.3f} s "
          f"({t_pl / t_ours:.0f}x faster)")

    rng = np.random.default_rng(0)
    big = np.sort(rng.pareto(2.5, 4096) + 1.0)
    fit_power_law(big, xmin="full")
    t_4096, _ = best_time(lambda: fit_power_law(big, xmin="full"), 5)
    print(f"full fit of a 4096-value pure Pareto sample (the worst case for candidate pruning; "
          f"bench_fit.py times a realistic bulk + tail spectrum): {t_4096 * 1e3:.1f} ms (target < 50 ms)")


if __name__ == "__main__":
    main()
