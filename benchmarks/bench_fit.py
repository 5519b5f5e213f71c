"""Power-law fits: core.fit against powerlaw.Fit, and batched fits of a model-sized set.

    .venv/bin/python benchmarks/bench_fit.py [--repeat 7] [--no-powerlaw-4096]

Spectra (synthetic, seeded, so the script needs no model):
* n=576: eigenvalues of W^T W for a 1536 x 576 matrix of Student-t(4) entries;
* n=4096: a 4096 x 4096 Gaussian (Wishart) spectrum drawn from its bidiagonal model
  (Dumitriu-Edelman: same eigenvalue law as W^T W, O(n^2) instead of O(n^3)), whose
  top 10% are replaced by a Pareto tail (alpha 2.5) above the bulk edge, like a trained
  layer's bulk + heavy tail;
* a SmolLM2-135M-sized set: 150 spectra of n=576 and 60 of n=192 (Student-t matrices).

Prints the best-of-``repeat`` time of ``fit_power_law(xmin="full")`` and of one
``powerlaw.Fit(parameter_ranges={'alpha': [1, 1000]})`` per spectrum, their ratio and
whether alpha, xmin and D agree; then the batched ``fit_power_laws`` times per method.
torch uses its default thread count. Timings on a shared machine vary a lot: run it on a
quiet one. Exits 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import warnings

import numpy as np
import torch

from common import best_time
from core.fit import fit_power_law, fit_power_laws


def student_eigs(rows: int, cols: int, rng: np.random.Generator, df: float = 4.0) -> np.ndarray:
    w = rng.standard_t(df, size=(rows, cols))
    return np.linalg.eigvalsh(w.T @ w if rows >= cols else w @ w.T)


def wishart_tail_eigs(n: int, rng: np.random.Generator, tail: float = 0.1, alpha: float = 2.5) -> np.ndarray:
    """Eigenvalues of W^T W, W n x n Gaussian, from the bidiagonal model, plus a Pareto tail."""
    from scipy.linalg import eigvalsh_tridiagonal

    a = np.sqrt(rng.chisquare(np.arange(n, 0, -1)))            # diagonal: chi_n ... chi_1
    b = np.sqrt(rng.chisquare(np.arange(n - 1, 0, -1)))        # sub-diagonal: chi_{n-1} ... chi_1
    diag = a**2 + np.r_[b**2, 0.0]                             # B^T B of the lower bidiagonal B
    off = b * a[1:]
    eigs = np.sort(eigvalsh_tridiagonal(diag, off))
    k = int(tail * n)
    edge = 4.0 * n                                             # (sqrt(N) + sqrt(M))^2 with N = M = n
    eigs[-k:] = np.sort(edge * (rng.pareto(alpha - 1.0, size=k) + 1.0))
    return np.sort(eigs)


def powerlaw_fit(x: np.ndarray):
    import powerlaw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(x[x > 0], parameter_ranges={"alpha": [1, 1000]}, verbose=False)


def compare(name: str, eigs: np.ndarray, repeat: int, with_powerlaw: bool) -> None:
    fit_power_law(eigs, xmin="full")                            # warm-up
    t_ours, fit = best_time(lambda: fit_power_law(eigs, xmin="full"), repeat)
    line = f"{name:>7}  ours {t_ours * 1e3:8.1f} ms"
    if with_powerlaw:
        t_pl, ref = best_time(lambda: powerlaw_fit(eigs), 1)
        same = (fit.xmin == ref.xmin and abs(fit.alpha / ref.alpha - 1) < 1e-6
                and abs(fit.D / ref.D - 1) < 1e-6)
        line += (f"  powerlaw {t_pl:7.2f} s  ratio {t_pl / t_ours:7.0f}x  "
                 f"alpha {fit.alpha:.6g} vs {ref.alpha:.6g}, same fit: {same}")
    else:
        line += f"  (powerlaw skipped)  alpha {fit.alpha:.6g}, xmin {fit.xmin:.6g}"
    print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7, help="runs of our fit; the best counts")
    ap.add_argument("--no-powerlaw-4096", action="store_true", help="skip powerlaw at n=4096 (~8 s)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    print("fit_power_law(xmin='full') vs powerlaw.Fit, one spectrum:")
    compare("n=576", student_eigs(1536, 576, rng), args.repeat, True)
    compare("n=4096", wishart_tail_eigs(4096, rng), args.repeat, not args.no_powerlaw_4096)

    spectra = [student_eigs(1536, 576, rng) for _ in range(150)] + [student_eigs(576, 192, rng) for _ in range(60)]
    print(f"fit_power_laws on {len(spectra)} spectra (150 x n=576, 60 x n=192), cpu:")
    for method in ("peak", "full", "peak-compat", "mid"):
        fit_power_laws(spectra[:4], xmin=method)
        t, fits = best_time(lambda: fit_power_laws(spectra, xmin=method), max(1, args.repeat // 2))
        print(f"  {method:<12} {t * 1e3:8.1f} ms  ({sum(f.ok for f in fits)} fitted)")
    if torch.cuda.is_available():
        print("same on cuda:")
        for method in ("peak", "full"):
            fit_power_laws(spectra, xmin=method, device="cuda")
            t, _ = best_time(lambda: fit_power_laws(spectra, xmin=method, device="cuda"), 3)
            print(f"  {method:<12} {t * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
