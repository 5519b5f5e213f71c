"""SparseGPT's linear algebra: the Hessian of a matrix's inputs, its damped reversed Cholesky
factor, the rows of the inverse factor one block at a time, and the walk over the columns
that prunes each one and spreads its error over the columns not yet reached (OBS update).

``H = mean x x^T`` (+1% of its mean diagonal); columns in blocks of ``SPARSEGPT_BLOCKSIZE``,
per block the fraction r with the lowest ``w^2 / [H^-1]_jj`` is zeroed (N:M: per group of M
columns when reached) and the error is spread over the later columns, lazily across blocks.
Matrices with the same input (q, k, v; gate, up) share one Hessian and one walk.
"""
from __future__ import annotations

import itertools
import logging
from typing import Sequence

import torch

from .selection import lowest_in_groups, mask_lowest

log = logging.getLogger(__name__)

SPARSEGPT_BLOCKSIZE = 128
SPARSEGPT_DAMP = 0.01
HESSIAN_PANEL = 384


class HessianCollector:
    """SparseGPT's statistics: ``H = (1/n) sum x x^T`` in float32 (a running sum, divided when read).

    Only the upper triangle is accumulated, as panels of about ``HESSIAN_PANEL`` rows
    (``x[:, a:b]^T x[:, a:]``): 60-75% of the full product's work for the same result."""

    def __init__(self, cols: int, device: torch.device) -> None:
        self.cols, self.device, self.tokens = cols, device, 0
        self.sum = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        k = min(8, -(-cols // HESSIAN_PANEL))
        self.edges = [round(i * cols / k) for i in range(k + 1)]

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` (tokens x cols)."""
        x = x.float()
        for a, b in zip(self.edges[:-1], self.edges[1:]):
            self.sum[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])
        self.tokens += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        upper = torch.triu(self.sum)
        return (upper + torch.triu(self.sum, 1).t()) / max(self.tokens, 1)


def prune_sparsegpt(W: torch.Tensor | Sequence[torch.Tensor], H: torch.Tensor, ratio: float | Sequence[float], *,
                    nm: tuple[int, int] | None = None, blocksize: int = SPARSEGPT_BLOCKSIZE,
                    damp: float = SPARSEGPT_DAMP) -> None:
    """OBS pruning with reconstruction (SparseGPT); every matrix is updated in place.

    ``W``: one matrix (out x in) or several that receive the same input (q, k and v; gate
    and up), with one ``ratio`` for all or one each. Rows never interact, so the matrices
    are stacked and share one walk over the columns. ``U`` is the upper Cholesky factor of
    H^-1: row i of U from column i on is the update that compensates removing column i
    once columns < i are fixed, and ``U[i, i]^2`` is ``[H^-1]_ii`` in the saliency
    ``w^2 / [H^-1]_ii``. With ``nm``, ``blocksize`` must be a multiple of M.
    """
    Ws = [W] if isinstance(W, torch.Tensor) else list(W)
    ratios = [float(ratio)] * len(Ws) if isinstance(ratio, (int, float)) else [float(r) for r in ratio]
    if len(ratios) != len(Ws):
        raise ValueError(f"prune_sparsegpt: {len(Ws)} matrices but {len(ratios)} ratios")
    cols = Ws[0].shape[1]
    with _few_threads(H.device):
        L, dead = _reversed_cholesky(H.to(torch.float32), damp)
        # transposed and stacked: column j of every matrix is row j of Wt (contiguous)
        Wt = torch.cat([w.t().to(L.device, torch.float32) for w in Ws], dim=1)
        Wt[dead] = 0
        bounds = list(itertools.accumulate((w.shape[0] for w in Ws), initial=0))
        segments = list(zip(bounds[:-1], bounds[1:], ratios))
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            U = _inverse_rows(L, i1, i2)                                # (i2 - i1) x (cols - i1)
            err = _obs_columns(Wt[i1:i2], U[:, :i2 - i1], segments, nm)
            if i2 < cols:
                Wt[i2:].addmm_(U[:, i2 - i1:].t(), err, alpha=-1.0)   # lazy update of later columns
    for w, (a, b, _) in zip(Ws, segments):
        w.copy_(Wt[:, a:b].t())


def _reversed_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, dead)`` for SparseGPT: ``L`` is the Cholesky factor of the damped H with its index
    order reversed (``J H J = L L^T``, J the reversal) and ``dead`` marks the inputs that were
    never active (zero diagonal, set to 1 before damping). Damping starts at ``damp`` times
    the mean diagonal and grows tenfold while H is not positive definite.

    The upper Cholesky factor of H^-1 that SparseGPT walks through is then
    ``U = J L^-1 J``; ``_inverse_rows`` computes it one block of rows at a time."""
    n = H.shape[0]
    dead = torch.diagonal(H) == 0
    flipped = H.flip(0, 1)                                   # a copy: H itself is left as it is
    flipped.diagonal()[dead.flip(0)] = 1.0
    mean_diag = max(float(flipped.diagonal().mean()), 1e-8)
    for attempt in range(6):
        damped = flipped.clone()
        damped.diagonal().add_(damp * (10 ** attempt) * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            if attempt:
                log.info("SparseGPT: Hessian needed %gx the damping", 10 ** attempt)
            return L, dead
    raise ValueError(f"SparseGPT: the {n}x{n} Hessian is not positive definite even with heavy damping; "
                     "use more calibration samples")


def _inverse_rows(L: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
    """Rows ``i1:i2`` of ``U = J L^-1 J`` from column ``i1`` on (left of it U is 0).

    They are rows ``n-i2 : n-i1`` of ``L^-1``, which depend only on the leading
    ``(n-i1) x (n-i1)`` part of ``L``: one triangular solve with ``i2 - i1`` right-hand sides,
    so the whole walk costs n^3/3, a third of inverting ``L`` at once."""
    n = L.shape[0]
    r0, r1 = n - i2, n - i1
    rhs = torch.zeros(i2 - i1, r1, dtype=L.dtype, device=L.device)
    rhs[:, r0:].fill_diagonal_(1.0)
    X = torch.linalg.solve_triangular(L[:r1, :r1], rhs, upper=False, left=False)   # X L = I rows
    return X.flip(0, 1)


def _obs_columns(Wt: torch.Tensor, U: torch.Tensor, segments: list[tuple[int, int, float]],
                 nm: tuple[int, int] | None, step: int = 16) -> torch.Tensor:
    """One block of columns (rows of ``Wt``, block x rows) pruned in order, in place; returns
    the errors ``(w - q) / U_ii`` (block x rows) for the update of the later columns.

    Unstructured: the mask of the whole block is chosen first (per matrix, the fraction r of
    lowest ``w^2 / U_ii^2``). N:M: each group of M columns is chosen when reached. Column i
    then gives ``err_i = w_i * mask_i / U_ii`` and every later column j moves by
    ``-U_ij err_i``: applied at once within a sub-block of ``step`` columns (the whole
    sub-block is updated: ``U_ij = 0`` for j < i, and column i itself becomes ~0 where
    masked and is zeroed exactly at the end), and by one product for the rest of the block.
    """
    n = Wt.shape[0]
    d = torch.diagonal(U).unsqueeze(1)
    mask = torch.zeros_like(Wt, dtype=torch.bool)
    if nm is None:
        score = Wt ** 2 / d ** 2
        for a, b, r in segments:
            mask[:, a:b] = mask_lowest(score[:, a:b], r)
    else:
        step = nm[1] * max(1, step // nm[1])          # groups never straddle a sub-block
    scale = mask.to(Wt.dtype) / d
    err = torch.empty_like(Wt)
    w_rows, s_rows, e_rows = Wt.unbind(0), scale.unbind(0), err.unbind(0)
    for j1 in range(0, n, step):
        j2 = min(j1 + step, n)
        sub = Wt[j1:j2]
        u_rows = U[j1:j2, j1:j2].unsqueeze(2).unbind(0)          # row i of U as a column
        for i in range(j1, j2):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                score = (Wt[g] ** 2 / d[g] ** 2).t()                  # rows x M: one group
                mask[g].t().scatter_(1, lowest_in_groups(score, *nm), True)
                scale[g] = mask[g].to(Wt.dtype) / d[g]
            torch.mul(w_rows[i], s_rows[i], out=e_rows[i])
            sub.addcmul_(u_rows[i - j1], e_rows[i], value=-1.0)
        if j2 < n:
            Wt[j2:].addmm_(U[j1:j2, j2:].t(), err[j1:j2], alpha=-1.0)
    Wt.masked_fill_(mask, 0.0)
    return err


class _few_threads:
    """One intra-op thread on CPU for SparseGPT's factorisations and column loop: these many
    small operations run many times faster without OpenMP hand-offs (measured 30-40x on a
    busy 2-core machine; the inverse of a 576 x 576 Hessian: 0.37 s with 2 threads, 0.013 s
    with one)."""

    def __init__(self, device: torch.device) -> None:
        self.active = device.type == "cpu"

    def __enter__(self) -> None:
        if self.active:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.active:
            torch.set_num_threads(self.saved)
