"""Shape metrics of one eigenvalue spectrum, WeightWatcher conventions (primer section 3).

Conventions
-----------
* ``eigs`` are the eigenvalues of ``W^T W`` (or ``W W^T``, the smaller side) of a
  ``rows x cols`` matrix, WITHOUT the 1/N normalisation: ``lambda_i = sigma_i**2``.
  Alpha does not depend on that scale; the norm metrics and the Marchenko-Pastur (MP)
  edges do, so the MP quantities here are in the same un-normalised units.
* MP: with ``N = max(rows, cols)``, ``M = min(rows, cols)`` and element variance
  ``s2 = w_var``, the bulk of an iid matrix lies in
  ``[s2 (sqrt(N) - sqrt(M))**2, s2 (sqrt(N) + sqrt(M))**2]`` (N times the normalised
  edges ``s2 (1 -/+ 1/sqrt(Q))**2``, ``Q = N/M``), with density
  ``sqrt((l+ - l)(l - l-)) / (2 pi s2 M l)`` over the M eigenvalues of the smaller side.
* Only positive eigenvalues enter sums and logs (the exact zeros of a null space carry no
  norm). ``entropy`` divides by ``ln(n)`` with ``n`` the number of eigenvalues given
  (zeros included), so a matrix of lower rank cannot reach 1.
* Metrics that need a power-law fit are ``nan`` without one; norm metrics exist whenever
  one eigenvalue is positive; counts are ints, ``status`` is a string. A spectrum with a
  non-finite value has no meaningful norm: all its norm metrics are ``nan`` and its
  counts 0 (its fit says why).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp

from .fit import PowerLawFit, _as_array

__all__ = ["ALPHA_LOW", "ALPHA_HIGH", "spectral_metrics", "status", "no_fit_status", "log_histogram",
           "mp_bulk_edges", "mp_density"]

#: alpha below ALPHA_LOW: very heavy tailed ("over-trained"); above ALPHA_HIGH: "under-trained"
ALPHA_LOW, ALPHA_HIGH = 2.0, 6.0

_NAN = float("nan")


def _shape(rows: int, cols: int, w_var: float, *, positive_var: bool = False) -> tuple[int, int, float]:
    """Validated (N, M, s2)."""
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        s2 = float(w_var)
    except (TypeError, ValueError):
        raise ValueError(f"w_var must be a number, got {w_var!r}") from None
    if not math.isfinite(s2) or s2 < 0 or (positive_var and s2 == 0):
        need = "> 0" if positive_var else ">= 0"
        raise ValueError(f"w_var must be finite and {need}, got {w_var!r}")
    return max(int(rows), int(cols)), min(int(rows), int(cols)), s2


def mp_bulk_edges(*, rows: int, cols: int, w_var: float) -> tuple[float, float]:
    """(lambda_minus, lambda_plus) of the MP bulk in the un-normalised units of ``eigs``."""
    N, M, s2 = _shape(rows, cols, w_var)
    return s2 * (math.sqrt(N) - math.sqrt(M)) ** 2, s2 * (math.sqrt(N) + math.sqrt(M)) ** 2


def mp_density(lam: object, *, rows: int, cols: int, w_var: float) -> np.ndarray:
    """MP density at ``lam`` (un-normalised units); integrates to 1 over the bulk, 0 outside
    it (and at lam <= 0, where it diverges for a square matrix)."""
    N, M, s2 = _shape(rows, cols, w_var, positive_var=True)
    lam = np.asarray(lam, dtype=np.float64)
    lo, hi = mp_bulk_edges(rows=rows, cols=cols, w_var=w_var)
    inside = (lam >= lo) & (lam <= hi) & (lam > 0)
    safe = np.where(inside, lam, 1.0)
    rho = np.sqrt(np.clip((hi - safe) * (safe - lo), 0.0, None)) / (2.0 * math.pi * s2 * M * safe)
    return np.where(inside, rho, 0.0)


def no_fit_status(reason: str) -> str:
    """The status of a matrix without a fit: "no fit: " and why."""
    return f"no fit: {reason}"


def status(fit: PowerLawFit) -> str:
    """"ok" (2 <= alpha <= 6), "over-trained" (< 2), "under-trained" (> 6), or "no fit: why"."""
    if not isinstance(fit, PowerLawFit):
        raise ValueError(f"fit must be a PowerLawFit, got {type(fit).__name__}")
    if not fit.ok:
        return no_fit_status(fit.reason or "alpha is not finite")
    if fit.alpha < ALPHA_LOW:
        return "over-trained"
    if fit.alpha > ALPHA_HIGH:
        return "under-trained"
    return "ok"


def log_histogram(eigs: object, *, bins: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Log-spaced bin edges over the positive eigenvalues and the density
    ``counts / (n * width)`` (n positive eigenvalues; integrates to 1), for log-log ESD
    plots. Empty arrays when no eigenvalue is positive and finite."""
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    arr = _as_array(eigs, "eigs")
    x = arr[np.isfinite(arr) & (arr > 0)]
    if x.size == 0:
        return np.empty(0), np.empty(0)
    lo, hi = math.log10(x.min()), math.log10(x.max())
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.logspace(lo, hi, int(bins) + 1)
    if x.min() < x.max():
        edges[0], edges[-1] = x.min(), x.max()   # exact ends: no value falls outside by rounding
    counts, _ = np.histogram(x, bins=edges)
    return edges, counts / (x.size * np.diff(edges))


def spectral_metrics(eigs: object, fit: PowerLawFit, *, rows: int, cols: int,
                     w_var: float) -> dict[str, float | int | str]:
    """All shape metrics of one matrix (keys and definitions in the module docstring and
    primer section 3). ``fit`` is the power-law fit of the same ``eigs``; ``w_var`` the
    element variance of the matrix (for the MP edge)."""
    if not isinstance(fit, PowerLawFit):
        raise ValueError(f"fit must be a PowerLawFit, got {type(fit).__name__}")
    arr = _as_array(eigs, "eigs")
    lambda_plus = mp_bulk_edges(rows=rows, cols=cols, w_var=w_var)[1]
    finite = bool(np.all(np.isfinite(arr)))
    x = arr[arr > 0] if finite else np.empty(0)
    fitted = fit.ok

    if x.size:
        total = float(x.sum())
        lmax = float(x.max())
        log_norm = math.log10(total)
        log_spectral_norm = math.log10(lmax)
        stable_rank = total / lmax
        p = x / total
        entropy = float(-np.sum(p * np.log(p)) / math.log(arr.size)) if arr.size > 1 else _NAN
        mp_softrank = lambda_plus / lmax
    else:
        log_norm = log_spectral_norm = stable_rank = entropy = mp_softrank = _NAN

    alpha = float(fit.alpha) if fitted else _NAN
    if fitted and x.size:
        alpha_hat = alpha * log_spectral_norm
        log_alpha_norm = float(logsumexp(alpha * np.log(x))) / math.log(10.0)
    else:
        alpha_hat = log_alpha_norm = _NAN

    return {
        "alpha": alpha,
        "xmin": float(fit.xmin) if fitted else _NAN,
        "D": float(fit.D) if fitted else _NAN,
        "sigma": float(fit.sigma) if fitted else _NAN,
        "n_tail": int(fit.n_tail) if fitted else 0,
        "alpha_hat": alpha_hat,
        "log_norm": log_norm,
        "log_spectral_norm": log_spectral_norm,
        "log_alpha_norm": log_alpha_norm,
        "stable_rank": stable_rank,
        "entropy": entropy,
        "lambda_plus": float(lambda_plus),
        "num_spikes": int(np.sum(x > lambda_plus)),
        "mp_softrank": mp_softrank,
        "rank": int(x.size),
        "status": status(fit),
    }
