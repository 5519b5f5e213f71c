"""Batched kernels of the power-law fit: Hill alphas and Kolmogorov-Smirnov distances of
candidate xmins for a batch of equal-length spectra, chunked to fit the device.

``core.fit`` decides which candidates each spectrum tries and picks the winner; this
module only computes. Conventions, for a candidate row ``i`` (``xmin = x_i``, ``m = n - i``
tail values) and a column ``k >= i`` of the sorted data ``x``:

* ``1 - T_ik = exp((1 - alpha_i) ln(x_k / x_i))`` (fitted CDF ``T``);
* ``C_ik = (kv_k - iv_i) / den_i`` (empirical CDF ``C``). powerlaw: ``kv_k`` = (first
  position of ``x_k``'s value) / n, ``iv_i = i / n``, ``den_i = 1 - i / n``; the published
  AlphaPruning code ("compat"): ``kv_k = k``, ``iv_i = i``, ``den_i = n - i``, i.e. ``C = k'/m``;
* ``D_i = max_{k >= i} |C_ik - T_ik|``; both ``T`` and ``C`` are non-decreasing in ``k``.

Speed: every candidate's alpha comes from one suffix sum over the sorted data (O(n), of
non-negative terms, so it agrees with the direct sum to ~1e-13); ``D`` for all candidates
is a masked max over a (batch x candidates x n) triangle in float64 with torch, chunked
into cache-sized pieces (2 MB per temporary, reused) on CPU and 1 GB pieces on a GPU.
Long scans are pruned first, exactly: bounds on every candidate's D from 65 tail points
(T and C are monotone, so the KS gap between two sampled points is bounded by their
values) discard the candidates that cannot reach the smallest D, and only the survivors
(typically 1-10% of the triangle) get the full scan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GPU_CHUNK_BYTES", "CPU_CHUNK_BYTES", "SpectrumBatch", "pad_rows", "ks_exact", "ks_distances"]

#: bytes of one float64 temporary (batch x rows x columns) in the KS kernel
GPU_CHUNK_BYTES = 1024 * 2**20
CPU_CHUNK_BYTES = 2 * 2**20

# candidate pruning before the exact KS scan (see ks_distances)
_PRUNE_MIN_ROWS = 96
_PRUNE_SAMPLES = 64
_PRUNE_SLACK = 1e-12


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


@dataclass
class SpectrumBatch:
    """Equal-length spectra of one kernel call: per-column terms on the device and the
    Hill alpha of every position."""

    L: torch.Tensor        # (B, n) ln(x / x_max)
    kv: torch.Tensor       # (B, n) empirical-CDF numerators per column
    L_np: np.ndarray       # L on the host
    alpha: np.ndarray      # (B, n) Hill alpha with xmin at each position
    compat: bool           # the published AlphaPruning code's empirical CDF
    device: torch.device

    @classmethod
    def build(cls, X: np.ndarray, *, compat: bool, device: torch.device) -> SpectrumBatch:
        """Batch of the sorted positive spectra X (B, n)."""
        B, n = X.shape
        L, alpha = _hill(X)
        if compat:
            kv = np.tile(np.arange(n, dtype=np.float64), (B, 1))
        else:
            kv = np.stack([np.searchsorted(x, x, side="left") for x in X]) / float(n)
        return cls(L=torch.as_tensor(L, device=device),
                   kv=torch.as_tensor(np.ascontiguousarray(kv), device=device),
                   L_np=L, alpha=alpha, compat=compat, device=device)

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
        """Elements of one float64 temporary on this device."""
        return (GPU_CHUNK_BYTES if self.device.type != "cpu" else CPU_CHUNK_BYTES) // 8


def pad_rows(rows_list: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged (non-empty) integer arrays -> (B, R) padded by repeating each last entry, mask."""
    R = max(r.size for r in rows_list)
    rows = np.empty((len(rows_list), R), dtype=np.int64)
    mask = np.zeros((len(rows_list), R), dtype=bool)
    for b, r in enumerate(rows_list):
        rows[b, : r.size] = r
        rows[b, r.size:] = r[-1]
        mask[b, : r.size] = True
    return rows, mask


def _batch_slices(B: int, per_spectrum: int, budget: int) -> list[slice]:
    """Consecutive slices of the batch, as many spectra per slice as ``budget`` allows."""
    step = max(1, min(B, budget // max(1, per_spectrum)))
    return [slice(b0, min(B, b0 + step)) for b0 in range(0, B, step)]


def ks_exact(g: SpectrumBatch, rows: np.ndarray, alpha: np.ndarray) -> np.ndarray:
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


def _ks_bounds(g: SpectrumBatch, rows: np.ndarray, alpha: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
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


def ks_distances(g: SpectrumBatch, rows: np.ndarray, pool: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """D of the candidate rows (B, R) that can still win; +inf for those proven unable to.

    ``pool`` (B, R) marks the candidates the winner is chosen from (padding excluded).
    Long scans are pruned first: a candidate whose lower bound exceeds the smallest upper
    bound in its pool cannot be the argmin (not even on a tie), so only the survivors get
    the exact O(n) scan.
    """
    B, R = rows.shape
    if R <= _PRUNE_MIN_ROWS or not np.all(np.isfinite(alpha)):
        return ks_exact(g, rows, alpha)
    lb, ub = _ks_bounds(g, rows, alpha, _PRUNE_SAMPLES)
    keep = [np.flatnonzero(pool[b] & (lb[b] <= ub[b][pool[b]].min() + _PRUNE_SLACK)) for b in range(B)]
    picks, _ = pad_rows(keep)
    exact = ks_exact(g, np.take_along_axis(rows, picks, axis=1), np.take_along_axis(alpha, picks, axis=1))
    D = np.full((B, R), np.inf)
    for b, k in enumerate(keep):
        D[b, k] = exact[b, : k.size]
    return D
