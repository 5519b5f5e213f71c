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

Speed: every candidate's alpha comes from one suffix sum over the sorted data (O(n), of
non-negative terms, so it agrees with the direct sum to ~1e-13); ``D`` for all candidates
is a masked max over a (batch x candidates x n) triangle in float64 with torch, chunked
into cache-sized pieces (2 MB per temporary, reused) on CPU and 1 GB pieces on a GPU.
Long scans are pruned first, exactly: bounds on every candidate's D from 65 tail points
(T and C are monotone, so the KS gap between two sampled points is bounded by their
values) discard the candidates that cannot reach the smallest D, and only the survivors
(typically 1-10% of the triangle) get the full scan. ``fit_power_laws`` stacks spectra
with the same number of positive eigenvalues into one batch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .config import resolve_device

log = logging.getLogger(__name__)

__all__ = ["XMIN_METHODS", "MIN_EIGENVALUES", "PowerLawFit", "fit_power_law", "fit_power_laws", "xmin_scan"]

XMIN_METHODS = ("full", "peak", "peak-compat", "mid")

#: fewer positive eigenvalues than this give no fit
MIN_EIGENVALUES = 10

# powerlaw's parameter range for alpha (as we pass it) and its "noise" margin near the bounds
_ALPHA_LO, _ALPHA_HI, _ALPHA_EPS = 1.0, 1000.0, 1e-2
_PEAK_BINS = 100
_PEAK_LO, _PEAK_HI = 0.95, 1.5

# bytes of one float64 temporary (batch x rows x columns) in the KS kernel
_GPU_CHUNK_BYTES = 1024 * 2**20
_CPU_CHUNK_BYTES = 2 * 2**20

# candidate pruning before the exact KS scan (see _distances)
_PRUNE_MIN_ROWS = 96
_PRUNE_SAMPLES = 64
_PRUNE_SLACK = 1e-12


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


def _prepare(eigs: object, name: str = "eigs") -> tuple[np.ndarray, str]:
    """Sorted positive data and "" or (empty, reason)."""
    arr = _as_array(eigs, name)
    if not np.all(np.isfinite(arr)):
        return np.empty(0), "non-finite eigenvalues"
    x = np.sort(arr[arr > 0])
    if x.size == 0:
        return x, ("no eigenvalues" if arr.size == 0 else "all eigenvalues are zero")
    if x.size < MIN_EIGENVALUES:
        return x, f"fewer than {MIN_EIGENVALUES} positive eigenvalues"
    return x, ""


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


def _hill(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of sorted positive data (B, n) -> (ln(x / x_max), alpha at every position i).

    alpha_i = 1 + m / S_i with m = n - i and S_i = sum_{j >= i} ln(x_j / x_i). Written as
    S_i = sum_{t >= i} (n - 1 - t) ln(x_{t+1} / x_t), S is one suffix sum of non-negative
    terms: no cancellation, so even the last, shortest tails keep their digits.
    """
    n = x.shape[1]
    # ln(x_{t+1} / x_t) from the exact difference of neighbours: accurate even for near-ties
    steps = np.log1p(np.diff(x, axis=1) / x[:, :-1]) * np.arange(n - 1, 0, -1, dtype=np.float64)
    S = np.zeros(x.shape)
    S[:, :-1] = np.cumsum(steps[:, ::-1], axis=1)[:, ::-1]
    m = np.arange(n, 0, -1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        alpha = 1.0 + m / S
    return np.log(x / x[:, -1:]), alpha


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


# --- the KS kernels (torch, batched) -------------------------------------------------------
#
# For a candidate row i (xmin = x_i, m = n - i tail values) and a column k >= i:
#   1 - T_ik = exp((1 - alpha_i) ln(x_k / x_i))        (fitted CDF T)
#   C_ik     = (kv_k - iv_i) / den_i                     (empirical CDF)
# powerlaw: kv_k = (first position of x_k's value) / n, iv_i = i / n, den_i = 1 - i / n;
# published AlphaPruning code ("compat"): kv_k = k, iv_i = i, den_i = n - i, i.e. C = k'/m.
# D_i = max_{k >= i} |C_ik - T_ik|; both T and C are non-decreasing in k.


@dataclass
class _Group:
    """Equal-length spectra of one kernel call, on the device."""

    L: torch.Tensor        # (B, n) ln(x / x_max)
    kv: torch.Tensor       # (B, n) empirical-CDF numerators per column
    L_np: np.ndarray
    compat: bool
    device: torch.device

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.L.shape)  # type: ignore[return-value]

    def row_terms(self, rows: np.ndarray, alpha: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Per-row coefficients: exponent = L_k a1 + off, C - 1 = kv_k inv + coff."""
        n = self.L.shape[1]
        iv = rows.astype(np.float64) if self.compat else rows / float(n)
        den = (n - iv) if self.compat else (1.0 - iv)
        a1 = 1.0 - alpha
        inv = 1.0 / den
        off = -np.take_along_axis(self.L_np, rows, axis=1) * a1
        dev = self.device
        return (torch.as_tensor(a1, device=dev), torch.as_tensor(off, device=dev),
                torch.as_tensor(inv, device=dev), torch.as_tensor(-(iv * inv) - 1.0, device=dev))

    def budget(self) -> int:
        return (_GPU_CHUNK_BYTES if self.device.type != "cpu" else _CPU_CHUNK_BYTES) // 8


def _batch_slices(B: int, per_spectrum: int, budget: int) -> list[slice]:
    """Consecutive slices of the batch, as many spectra per slice as ``budget`` allows."""
    step = max(1, min(B, budget // max(1, per_spectrum)))
    return [slice(b0, min(B, b0 + step)) for b0 in range(0, B, step)]


def _ks_exact(g: _Group, rows: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """D for candidate rows (B, R) (ascending per spectrum; padding repeats a real row):
    a masked max over the triangle k >= i, in chunks of spectra x rows x columns."""
    B, n = g.shape
    R = rows.shape[1]
    dev = g.device
    trows = torch.as_tensor(rows, device=dev)
    a1, off, inv, coff = g.row_terms(rows, alpha)
    fix_inf = not bool(np.all(np.isfinite(alpha)))
    cols = torch.arange(n, device=dev)
    out = torch.empty((B, R), dtype=torch.float64, device=dev)
    budget = g.budget()
    # two flat scratch buffers reused by every chunk (allocating large temporaries costs
    # more than the arithmetic on CPU)
    size = max(n, min(budget, B * R * n))
    buf_t = torch.empty(size, dtype=torch.float64, device=dev)
    buf_c = torch.empty(size, dtype=torch.float64, device=dev)
    for bs in _batch_slices(B, n, size):
        nb = bs.stop - bs.start
        start = 0
        while start < R:
            # columns needed by this chunk start at the smallest candidate position in it
            c0 = int(rows[bs, start].min())
            width = n - c0
            stop = start + max(1, min(R - start, size // (nb * width)))
            sl = slice(start, stop)
            shape = (nb, stop - start, width)
            count = nb * (stop - start) * width
            t = buf_t[:count].view(shape)
            c = buf_c[:count].view(shape)
            Lk = g.L[bs, None, c0:]
            if fix_inf:
                # alpha = inf where x_k == x_i (ties at the top): (x_k/x_i)**(1 - alpha) is 1 there
                torch.sub(Lk, g.L[bs].gather(1, trows[bs, sl])[:, :, None], out=t)
                t.mul_(a1[bs, sl, None]).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
            else:
                torch.addcmul(off[bs, sl, None], Lk, a1[bs, sl, None], out=t)
            t.exp_()                                                              # 1 - T
            torch.addcmul(coff[bs, sl, None], g.kv[bs, None, c0:], inv[bs, sl, None], out=c)  # C - 1
            t.add_(c)                                                             # C - T
            # columns below a row's own position are not in its tail
            c1 = int(rows[bs, sl].max())
            if c1 > c0:
                below = cols[None, None, c0:c1] < trows[bs, sl, None]
                t[:, :, : c1 - c0].masked_fill_(below, 0.0)
            lo, hi = torch.aminmax(t, dim=2)
            out[bs, sl] = torch.maximum(hi, lo.neg_())
            start = stop
    return out.cpu().numpy()


def _ks_bounds(g: _Group, rows: np.ndarray, alpha: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of D from q + 1 tail columns per row (both ends included).

    LB: the largest |C - T| at the sampled columns. UB: between sampled columns s < s',
    monotonicity gives C - T <= C(s') - T(s) and T - C <= T(s') - C(s).
    """
    B, n = g.shape
    R = rows.shape[1]
    dev = g.device
    trows = torch.as_tensor(rows, device=dev)
    a1, off, inv, coff = g.row_terms(rows, alpha)
    # sampled offsets floor(j/q * span), j = 0..q: any non-decreasing choice that includes
    # both ends of the tail gives valid bounds, so float rounding does no harm
    frac = torch.arange(q + 1, device=dev, dtype=torch.float64) / q
    lb = torch.empty((B, R), dtype=torch.float64, device=dev)
    ub = torch.empty((B, R), dtype=torch.float64, device=dev)
    budget = g.budget()
    for bs in _batch_slices(B, q + 1, budget):
        nb = bs.stop - bs.start
        rc = max(1, budget // (nb * (q + 1)))
        for start in range(0, R, rc):
            sl = slice(start, min(R, start + rc))
            r = trows[bs, sl]
            span = ((n - 1) - r).to(torch.float64)
            idx = r[:, :, None] + (frac * span[:, :, None]).long()
            flat = idx.reshape(nb, -1)
            e = torch.addcmul(off[bs, sl, None], g.L[bs].gather(1, flat).view(idx.shape), a1[bs, sl, None]).exp_()
            c = torch.addcmul(coff[bs, sl, None], g.kv[bs].gather(1, flat).view(idx.shape), inv[bs, sl, None])
            d = (c + e).abs_().amax(dim=2)
            up = (c[:, :, 1:] + e[:, :, :-1]).amax(dim=2)
            down = (c[:, :, :-1] + e[:, :, 1:]).amin(dim=2).neg_()
            lb[bs, sl] = d
            ub[bs, sl] = torch.maximum(torch.maximum(up, down), d)
    return lb.cpu().numpy(), ub.cpu().numpy()


# --- one group of equal-length spectra --------------------------------------------------

@dataclass
class _Job:
    """Candidate rows of one spectrum for one kernel call."""

    index: int            # position in the caller's list
    rows: np.ndarray      # candidate positions, ascending
    select: str           # "valid" (powerlaw's rule), "min" (plain argmin), "single"


def _pad(rows_list: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged (non-empty) integer arrays -> (B, R) padded by repeating each last entry, mask."""
    R = max(r.size for r in rows_list)
    rows = np.empty((len(rows_list), R), dtype=np.int64)
    mask = np.zeros((len(rows_list), R), dtype=bool)
    for b, r in enumerate(rows_list):
        rows[b, : r.size] = r
        rows[b, r.size:] = r[-1]
        mask[b, : r.size] = True
    return rows, mask


def _distances(g: _Group, jobs: list[_Job], rows: np.ndarray, mask: np.ndarray,
               alpha: np.ndarray) -> np.ndarray:
    """D for every candidate that can still win; +inf for those proven unable to.

    Long scans are pruned first: a candidate whose lower bound exceeds the smallest upper
    bound among the candidates that count cannot be the argmin (not even on a tie), so
    only the survivors get the exact O(n) scan.
    """
    B, R = rows.shape
    if R <= _PRUNE_MIN_ROWS or not np.all(np.isfinite(alpha)):
        return _ks_exact(g, rows, alpha)
    lb, ub = _ks_bounds(g, rows, alpha, _PRUNE_SAMPLES)
    keep = []
    for b, job in enumerate(jobs):
        count = mask[b]
        valid = count & _valid(alpha[b]) if job.select == "valid" else count
        pool = valid if valid.any() else count
        threshold = ub[b][pool].min() + _PRUNE_SLACK
        keep.append(np.flatnonzero(pool & (lb[b] <= threshold)))
    picks, _ = _pad(keep)
    exact = _ks_exact(g, np.take_along_axis(rows, picks, axis=1), np.take_along_axis(alpha, picks, axis=1))
    D = np.full((B, R), np.inf)
    for b, k in enumerate(keep):
        D[b, k] = exact[b, : k.size]
    return D


def _run_group(X: np.ndarray, jobs: list[_Job], compat: bool, device: torch.device,
               out: list[PowerLawFit | None]) -> None:
    """Fit the spectra X (B, n) (one job each) together and fill ``out``."""
    B, n = X.shape
    L, alpha_all = _hill(X)
    if compat:
        kv = np.tile(np.arange(n, dtype=np.float64), (B, 1))
    else:
        kv = np.stack([np.searchsorted(x, x, side="left") for x in X]) / float(n)
    g = _Group(L=torch.as_tensor(L, device=device),
               kv=torch.as_tensor(np.ascontiguousarray(kv), device=device),
               L_np=L, compat=compat, device=device)
    rows, mask = _pad([j.rows for j in jobs])
    alpha = np.take_along_axis(alpha_all, rows, axis=1)
    for b, job in enumerate(jobs):
        if job.select == "valid":
            alpha[b] = _powerlaw_alpha(alpha[b])
    D = _distances(g, jobs, rows, mask, alpha)
    if compat:
        D = np.where(alpha > 1.0, D, 1.0)
    for b, job in enumerate(jobs):
        x = X[b]
        d, a = D[b][mask[b]], alpha[b][mask[b]]
        if job.select == "valid":
            valid = _valid(a)
            if valid.any():
                j = int(np.argmin(np.where(valid, d, np.inf)))
            else:
                j = int(np.argmin(d))
                log.warning("no candidate xmin gives alpha inside [1.01, 999.99]; returning the "
                            "smallest D (alpha=%.6g), as powerlaw does", a[j])
        else:
            j = int(np.argmin(d))
        i = int(job.rows[j])
        n_tail = n - i if compat else n - int(np.searchsorted(x, x[i], side="left"))
        al = float(a[j])
        out[job.index] = PowerLawFit(alpha=al, xmin=float(x[i]), D=float(d[j]),
                                     sigma=(al - 1.0) / math.sqrt(n_tail), n_tail=n_tail)


def _plan(x: np.ndarray, method: str) -> tuple[str, np.ndarray, str] | str:
    """(kernel kind "pl"/"compat", rows, select) or a reason for no fit."""
    full = _full_candidates(x)
    if full.size < 2:
        return "no candidate xmin"
    if method == "full":
        return "pl", full, "valid"
    if method == "mid":
        i = int(np.searchsorted(x, x[x.size // 2], side="left"))
        if x[i] >= x[-1]:
            return "no candidate xmin"
        return "pl", np.array([i]), "single"
    p = _peak(x)
    if method == "peak":
        xs = x[full]
        rows = full[(xs >= _PEAK_LO * p) & (xs <= _PEAK_HI * p)]
        if rows.size:
            return "pl", rows, "valid"
    else:  # peak-compat: the lower bound is a log value compared with eigenvalues
        pos = np.arange(x.size - 1)
        xs = x[:-1]
        rows = pos[(xs >= math.log10(_PEAK_LO * p)) & (xs <= _PEAK_HI * p)]
        if rows.size:
            return "compat", rows, "min"
    log.info("xmin=%r: no candidate in the peak window [%.4g, %.4g]; falling back to 'full'",
             method, (_PEAK_LO * p) if method == "peak" else math.log10(_PEAK_LO * p), _PEAK_HI * p)
    return "pl", full, "valid"


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
    groups: dict[tuple[int, str], list[tuple[np.ndarray, _Job]]] = {}
    for idx, eigs in enumerate(spectra):
        x, reason = _prepare(eigs, name=f"spectra[{idx}]")
        if reason:
            out[idx] = _no_fit(reason)
            continue
        plan = _plan(x, method)
        if isinstance(plan, str):
            out[idx] = _no_fit(plan)
            continue
        kind, rows, select = plan
        # a full scan and a short window in the same batch would pad the window to n rows
        size = "all" if rows.size > 64 else "few"
        groups.setdefault((x.size, kind + size), []).append((x, _Job(idx, rows, select)))
    for (n, kind), members in groups.items():
        X = np.stack([m[0] for m in members])
        _run_group(X, [m[1] for m in members], kind.startswith("compat"), dev, out)
    return out  # type: ignore[return-value]


def fit_power_law(eigs: object, *, xmin: str = "peak", device: str | torch.device = "cpu") -> PowerLawFit:
    """Power-law fit of one spectrum's tail; see the module docstring for the methods."""
    _check_method(xmin)
    _as_array(eigs, "eigs")
    return fit_power_laws([eigs], xmin=xmin, device=device)[0]


def xmin_scan(eigs: object, *, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Every candidate of the ``full`` method: columns xmin, alpha, D, valid (for a plot
    of D and alpha against xmin). Empty when the spectrum has no fit."""
    x, reason = _prepare(eigs)
    columns = ["xmin", "alpha", "D", "valid"]
    rows = _full_candidates(x) if not reason else np.empty(0, dtype=np.int64)
    if rows.size < 2:
        return pd.DataFrame({c: pd.Series(dtype=bool if c == "valid" else float) for c in columns})
    X = x[None, :]
    L, alpha_all = _hill(X)
    alpha = _powerlaw_alpha(alpha_all[:, rows])
    kv = np.searchsorted(x, x, side="left")[None, :] / float(x.size)
    dev = resolve_device(device)
    g = _Group(L=torch.as_tensor(L, device=dev), kv=torch.as_tensor(kv, device=dev),
               L_np=L, compat=False, device=dev)
    D = _ks_exact(g, rows[None, :], alpha)
    return pd.DataFrame({"xmin": x[rows], "alpha": alpha[0], "D": D[0], "valid": _valid(alpha[0])})
