"""Power-law fit of the tail of an eigenvalue spectrum (the ESD), HT-SR style.

Conventions
-----------
* Input: the eigenvalues of one weight matrix's correlation matrix (``W^T W``, no 1/N),
  a 1-D array (numpy, list or torch tensor). Only strictly positive finite values are data,
  as in ``powerlaw``, which throws out values <= 0: the exact zeros of a null space (and
  the tiny negative rounding noise of ``eigvalsh``) are dropped. The data are sorted here,
  so the order of the input does not matter.
* Model: density proportional to ``lambda**-alpha`` for ``lambda >= xmin`` (continuous).
  For a candidate ``xmin`` with ``n_t`` data ``>= xmin``, ``alpha`` is the Hill maximum
  likelihood estimate ``1 + n_t / sum ln(lambda / xmin)``, ``sigma = (alpha - 1) /
  sqrt(n_t)``, and ``D`` the Kolmogorov-Smirnov distance between the fitted CDF
  ``1 - (lambda / xmin)**(1 - alpha)`` and the empirical CDF of the tail.
* ``xmin`` methods (``XMIN_METHODS``):

  - ``full``: reproduces ``powerlaw.Fit(eigs, parameter_ranges={'alpha': [1, 1000]})``
    (powerlaw 2.0.0): alpha, xmin and D. Candidates are the unique data values below the
    second largest one (powerlaw keeps values ``< max`` and then also drops the largest
    of those, so the two largest distinct values are never candidates). D is taken over
    the tail's unique values with the empirical CDF of the whole data re-normalised to
    the tail: ``(k/n - i/n) / (1 - i/n)``, ``i`` and ``k`` the first positions of
    ``xmin`` and of the value. A candidate is valid when ``alpha`` is inside (1, 1000)
    and at least 0.01 away from both bounds (powerlaw's range and noise checks); the
    valid candidate with the smallest D wins, the smaller ``xmin`` on ties. When no
    candidate is valid, the smallest D overall is returned (as powerlaw does) and a
    warning is logged.
  - ``peak`` (default; the AlphaPruning window as intended): ``p = 10**e`` with ``e``
    the left edge of the fullest of 100 equal bins of ``log10(lambda)``; only the
    ``full`` candidates with ``0.95 p <= xmin <= 1.5 p`` compete (same alpha, D and
    validity). An empty window falls back to ``full``.
  - ``peak-compat``: the published AlphaPruning code (``fix_fingers='xmin_peak'``), its
    bug included: the lower bound of the window is ``log10(0.95 p)``, a log value
    compared with linear eigenvalues. Candidates are the sorted positions ``0..n-2``
    (duplicates not merged) and ``D_i = max_k |1 - (x_{i+k}/x_i)**(1-alpha_i) - k/m|``
    over all ``m = n - i`` tail positions, plain argmin (first on ties). An empty window
    falls back to ``full`` (the published loop would return its placeholder alpha 0 there).
    Only positive eigenvalues are data here too; the published code may keep or threshold
    tiny eigenvalues differently and works in float32.
  - ``mid``: ``xmin = x[n // 2]`` of the ascending data; one Hill fit and its
    (powerlaw-style) D, no scan.

* Input problems never raise and never give a silent number: the fit carries a
  ``reason`` (non-finite values, all zeros, fewer than 10 positive values, no candidate
  xmin) and ``nan`` values. Wrong argument types or shapes raise ``ValueError``.

Speed: one batch per group of spectra with the same number of positive eigenvalues and the
same kind of scan; the batched Hill alphas and KS distances (and how they are chunked and
pruned) are in ``core.fit_kernels``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .choices import XMIN_METHODS
from .config import resolve_device
from .fit_kernels import SpectrumBatch, ks_distances, ks_exact, pad_rows

log = logging.getLogger(__name__)

__all__ = ["XMIN_METHODS", "MIN_EIGENVALUES", "PowerLawFit", "fit_power_law", "fit_power_laws", "xmin_scan"]

#: fewer positive eigenvalues than this give no fit
MIN_EIGENVALUES = 10

# powerlaw's parameter range for alpha (as we pass it) and its "noise" margin near the bounds
_ALPHA_LO, _ALPHA_HI, _ALPHA_EPS = 1.0, 1000.0, 1e-2
_PEAK_BINS = 100
_PEAK_LO, _PEAK_HI = 0.95, 1.5
# plans with more candidates than this are batched apart from short windows (padding cost)
_FEW_ROWS = 64


@dataclass(frozen=True)
class PowerLawFit:
    """One spectrum's power-law fit; ``reason`` says why there is none (then values are nan)."""

    alpha: float
    xmin: float
    D: float
    sigma: float
    n_tail: int
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.reason == "" and math.isfinite(self.alpha)


def _no_fit(reason: str) -> PowerLawFit:
    nan = float("nan")
    return PowerLawFit(alpha=nan, xmin=nan, D=nan, sigma=nan, n_tail=0, reason=reason)


# --- input ------------------------------------------------------------------------------

def _as_array(eigs: object, name: str) -> np.ndarray:
    if isinstance(eigs, torch.Tensor):
        eigs = eigs.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(eigs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D array of numbers") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _data_problem(arr: np.ndarray, x: np.ndarray) -> str:
    """Why the data ``arr`` (its sorted positive values ``x``) cannot be fitted, or ""."""
    if not np.all(np.isfinite(arr)):
        return "non-finite eigenvalues"
    if x.size == 0:
        return "no eigenvalues" if arr.size == 0 else "all eigenvalues are zero"
    if x.size < MIN_EIGENVALUES:
        return f"fewer than {MIN_EIGENVALUES} positive eigenvalues"
    return ""


def _check_method(xmin: str) -> str:
    if not isinstance(xmin, str) or xmin not in XMIN_METHODS:
        raise ValueError(f"xmin={xmin!r} is not a method; use one of {', '.join(XMIN_METHODS)}")
    return xmin


# --- per-spectrum pieces (numpy, O(n)) -----------------------------------------------------

def _full_candidates(x: np.ndarray) -> np.ndarray:
    """Positions of powerlaw's candidate xmins: first occurrences of the unique values
    strictly below the second largest unique value."""
    first = np.empty(x.size, dtype=bool)
    first[0] = True
    np.not_equal(x[1:], x[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    if starts.size < 2:
        return starts[:0]
    second = x[starts[-2]]
    return starts[x[starts] < second]



def _peak(x: np.ndarray) -> float:
    """p = 10**(left edge of the fullest of 100 bins of log10(x))."""
    counts, edges = np.histogram(np.log10(x), bins=_PEAK_BINS)
    return float(10.0 ** edges[int(np.argmax(counts))])


def _powerlaw_alpha(alpha: np.ndarray) -> np.ndarray:
    """powerlaw refines the Hill estimate inside its parameter range (1, 1000): the estimate
    is returned unchanged except above 1000, where the optimiser stops at the bound."""
    return np.minimum(alpha, _ALPHA_HI)


def _valid(alpha: np.ndarray) -> np.ndarray:
    """powerlaw: in_range (strictly inside the bounds) and no noise flag (0.01 from them)."""
    return ((alpha > _ALPHA_LO) & (alpha < _ALPHA_HI)
            & ~(alpha - _ALPHA_EPS < _ALPHA_LO) & ~(alpha + _ALPHA_EPS > _ALPHA_HI))


# --- planning: which candidates each spectrum tries -----------------------------------------

@dataclass(frozen=True)
class _Plan:
    """How one spectrum is fitted, or (``reason`` not empty) why it is not."""

    x: np.ndarray                  # sorted positive eigenvalues
    rows: np.ndarray               # candidate xmin positions in x, ascending
    compat: bool = False           # the published AlphaPruning code's KS distance
    powerlaw_rule: bool = True     # alpha capped at 1000, powerlaw's validity rule picks; else plain argmin
    reason: str = ""

    @classmethod
    def no_fit(cls, x: np.ndarray, reason: str) -> _Plan:
        return cls(x, np.empty(0, dtype=np.int64), reason=reason)


def _plan(eigs: object, method: str, name: str = "eigs") -> _Plan:
    """The candidates the xmin ``method`` gives the spectrum ``eigs`` (module docstring)."""
    arr = _as_array(eigs, name)
    x = np.sort(arr[arr > 0]) if np.all(np.isfinite(arr)) else np.empty(0)
    problem = _data_problem(arr, x)
    if problem:
        return _Plan.no_fit(x, problem)
    full = _full_candidates(x)
    if full.size < 2:
        return _Plan.no_fit(x, "no candidate xmin")
    if method == "full":
        return _Plan(x, full)
    if method == "mid":
        i = int(np.searchsorted(x, x[x.size // 2], side="left"))
        if x[i] >= x[-1]:
            return _Plan.no_fit(x, "no candidate xmin")
        return _Plan(x, np.array([i]), powerlaw_rule=False)
    p = _peak(x)
    if method == "peak":
        xs = x[full]
        rows = full[(xs >= _PEAK_LO * p) & (xs <= _PEAK_HI * p)]
        if rows.size:
            return _Plan(x, rows)
    else:  # peak-compat: the lower bound is a log value compared with eigenvalues
        pos = np.arange(x.size - 1)
        xs = x[:-1]
        rows = pos[(xs >= math.log10(_PEAK_LO * p)) & (xs <= _PEAK_HI * p)]
        if rows.size:
            return _Plan(x, rows, compat=True, powerlaw_rule=False)
    log.info("xmin=%r: no candidate in the peak window [%.4g, %.4g]; falling back to 'full'",
             method, (_PEAK_LO * p) if method == "peak" else math.log10(_PEAK_LO * p), _PEAK_HI * p)
    return _Plan(x, full)


# --- one batch of equal-length spectra ----------------------------------------------------

def _competitors(alpha: np.ndarray, mask: np.ndarray, powerlaw_rule: np.ndarray) -> np.ndarray:
    """Candidates (B, R) the winner is chosen from: under powerlaw's rule the valid ones when
    there are any, otherwise all (``mask``: the real, unpadded candidates)."""
    valid = mask & _valid(alpha)
    return np.where(powerlaw_rule[:, None] & valid.any(axis=1, keepdims=True), valid, mask)


def _pick(plan: _Plan, D: np.ndarray, alpha: np.ndarray, pool: np.ndarray) -> PowerLawFit:
    """The fit of the candidate with the smallest D in ``pool`` (first on ties)."""
    j = int(np.argmin(np.where(pool, D, np.inf)))
    if plan.powerlaw_rule and not _valid(alpha).any():
        log.warning("no candidate xmin gives alpha inside [1.01, 999.99]; returning the "
                    "smallest D (alpha=%.6g), as powerlaw does", alpha[j])
    x, i = plan.x, int(plan.rows[j])
    n_tail = x.size - (i if plan.compat else int(np.searchsorted(x, x[i], side="left")))
    al = float(alpha[j])
    return PowerLawFit(alpha=al, xmin=float(x[i]), D=float(D[j]),
                       sigma=(al - 1.0) / math.sqrt(n_tail), n_tail=n_tail)


def _fit_batch(plans: list[_Plan], device: torch.device) -> list[PowerLawFit]:
    """Fit spectra of one length and one kernel (``compat``) together, in order."""
    compat = plans[0].compat
    g = SpectrumBatch.build(np.stack([p.x for p in plans]), compat=compat, device=device)
    rows, mask = pad_rows([p.rows for p in plans])
    rule = np.array([p.powerlaw_rule for p in plans])
    alpha = np.take_along_axis(g.alpha, rows, axis=1)
    alpha = np.where(rule[:, None], _powerlaw_alpha(alpha), alpha)
    pool = _competitors(alpha, mask, rule)
    D = ks_distances(g, rows, pool, alpha)
    if compat:
        D = np.where(alpha > 1.0, D, 1.0)
    return [_pick(p, D[b][mask[b]], alpha[b][mask[b]], pool[b][mask[b]]) for b, p in enumerate(plans)]


# --- public API ---------------------------------------------------------------------------

def fit_power_laws(spectra: Sequence[object], *, xmin: str = "peak",
                   device: str | torch.device = "cpu") -> list[PowerLawFit]:
    """Fit many spectra; those with the same number of positive eigenvalues (and the same
    kind of candidate scan) share one tensor computation. Returns fits in input order."""
    method = _check_method(xmin)
    if isinstance(spectra, (np.ndarray, torch.Tensor)) and spectra.ndim == 1:
        raise ValueError("spectra must be a sequence of 1-D arrays; for one spectrum use fit_power_law")
    dev = resolve_device(device)
    out: list[PowerLawFit | None] = [None] * len(spectra)
    plans = [_plan(eigs, method, name=f"spectra[{idx}]") for idx, eigs in enumerate(spectra)]
    # batch key (n, compat, many rows): a full scan and a short window in the same batch
    # would pad the window to n rows
    batches: dict[tuple[int, bool, bool], list[int]] = {}
    for idx, plan in enumerate(plans):
        if plan.reason:
            out[idx] = _no_fit(plan.reason)
        else:
            batches.setdefault((plan.x.size, plan.compat, plan.rows.size > _FEW_ROWS), []).append(idx)
    for members in batches.values():
        for idx, fit in zip(members, _fit_batch([plans[i] for i in members], dev)):
            out[idx] = fit
    return out  # type: ignore[return-value]


def fit_power_law(eigs: object, *, xmin: str = "peak", device: str | torch.device = "cpu") -> PowerLawFit:
    """Power-law fit of one spectrum's tail; see the module docstring for the methods."""
    _check_method(xmin)
    _as_array(eigs, "eigs")
    return fit_power_laws([eigs], xmin=xmin, device=device)[0]


def xmin_scan(eigs: object, *, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Every candidate of the ``full`` method: columns xmin, alpha, D, valid (for a plot
    of D and alpha against xmin). Empty when the spectrum has no fit."""
    plan = _plan(eigs, "full")
    if plan.reason:
        return pd.DataFrame({c: pd.Series(dtype=bool if c == "valid" else float)
                             for c in ["xmin", "alpha", "D", "valid"]})
    g = SpectrumBatch.build(plan.x[None, :], compat=False, device=resolve_device(device))
    rows = plan.rows
    alpha = _powerlaw_alpha(g.alpha[:, rows])
    D = ks_exact(g, rows[None, :], alpha)
    return pd.DataFrame({"xmin": plan.x[rows], "alpha": alpha[0], "D": D[0], "valid": _valid(alpha[0])})
