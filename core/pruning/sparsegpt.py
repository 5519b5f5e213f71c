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
    """SparseGPT's statistics: ``H = (1/n) sum x x^T`` in float32 (a running sum, divided when read:
    ``take_hessian`` turns the sum itself into H, ``H`` makes a copy).

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
        """A new matrix H (the running sum is left as it is)."""
        return symmetrised_hessian(self.sum.clone(), self.tokens)

    def take_hessian(self) -> torch.Tensor:
        """H built in the running sum's own memory (no copy); the collector is spent after it."""
        if self.sum is None:
            raise ValueError("HessianCollector.take_hessian: the Hessian was already taken; take it once per pass")
        H, self.sum = symmetrised_hessian(self.sum, self.tokens), None
        return H


def symmetrised_hessian(upper_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    """``H`` from a running sum whose upper triangle holds ``sum x x^T``, in ``upper_sum`` itself.

    The strict lower triangle becomes the mirror of the upper, panel by panel (the temporaries
    are one panel), then ``(s + 0) / tokens``: elementwise exactly ``(triu(s) + triu(s, 1)^T) / tokens``
    (adding +0 maps -0 to +0 as that sum does)."""
    n = upper_sum.shape[0]
    for a in range(0, n, HESSIAN_PANEL):
        b = min(a + HESSIAN_PANEL, n)
        upper_sum[a:b, :a].copy_(upper_sum[:a, a:b].t())                 # rows below the diagonal panel
        diag = upper_sum[a:b, a:b]
        diag.copy_(torch.triu(diag) + torch.triu(diag, 1).t())
    return upper_sum.add_(0.0).div_(max(tokens, 1))


def prune_sparsegpt(W: torch.Tensor | Sequence[torch.Tensor], H: torch.Tensor, ratio: float | Sequence[float], *,
                    nm: tuple[int, int] | None = None, blocksize: int = SPARSEGPT_BLOCKSIZE,
                    damp: float = SPARSEGPT_DAMP, overwrite_H: bool = False) -> None:
    """OBS pruning with reconstruction (SparseGPT); every matrix is updated in place.

    ``W``: one matrix (out x in) or several that receive the same input (q, k and v; gate
    and up), with one ``ratio`` for all or one each. Rows never interact, so the matrices
    are stacked and share one walk over the columns. ``U`` is the upper Cholesky factor of
    H^-1: row i of U from column i on is the update that compensates removing column i
    once columns < i are fixed, and ``U[i, i]^2`` is ``[H^-1]_ii`` in the saliency
    ``w^2 / [H^-1]_ii``. With ``nm``, ``blocksize`` must be a multiple of M.
    ``overwrite_H``: a float32 ``H`` becomes the Cholesky factor in its own memory (its
    content is lost); otherwise the factor is made in one copy of ``H``.
    """
    Ws = [W] if isinstance(W, torch.Tensor) else list(W)
    ratios = [float(ratio)] * len(Ws) if isinstance(ratio, (int, float)) else [float(r) for r in ratio]
    if len(ratios) != len(Ws):
        raise ValueError(f"prune_sparsegpt: {len(Ws)} matrices but {len(ratios)} ratios")
    cols = Ws[0].shape[1]
    with _few_threads(H.device):
        own = overwrite_H and H.dtype == torch.float32 and H.is_contiguous()
        L, dead = _reversed_cholesky(H if own else H.to(torch.float32, memory_format=torch.contiguous_format,
                                                         copy=True), damp)
        # transposed and stacked: column j of every matrix is row j of Wt (contiguous)
        Wt = torch.cat([w.t().to(L.device, torch.float32) for w in Ws], dim=1)
        Wt[dead] = 0
        bounds = list(itertools.accumulate((w.shape[0] for w in Ws), initial=0))
        segments = list(zip(bounds[:-1], bounds[1:], ratios))
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            L = _leading_in_place(L, cols - i1)                         # what is left of the factor
            U = _inverse_rows(L, i2 - i1)                               # (i2 - i1) x (cols - i1)
            err = _obs_columns(Wt[i1:i2], U[:, :i2 - i1], segments, nm)
            if i2 < cols:
                Wt[i2:].addmm_(U[:, i2 - i1:].t(), err, alpha=-1.0)   # lazy update of later columns
            del U, err                                                 # before the next block's
    for w, (a, b, _) in zip(Ws, segments):
        w.copy_(Wt[:, a:b].t())


def _reversed_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, dead)`` for SparseGPT, in ``H``'s own memory (H, symmetric, is overwritten): ``L``
    is the Cholesky factor of the damped H with its index order reversed (``J H J = L L^T``,
    J the reversal) and ``dead`` marks the inputs that were never active (zero diagonal, set
    to 1 before damping). Damping starts at ``damp`` times the mean diagonal and grows
    tenfold while H is not positive definite.

    ``J H J`` is H's storage reversed; the factor is computed in place of its transpose
    (column-major, as LAPACK returns it). Only the upper triangle is read, and a failed
    attempt destroys it: a packed copy of it (half of H) lives until the factor exists.
    The upper Cholesky factor of H^-1 that SparseGPT walks through is then
    ``U = J L^-1 J``; ``_inverse_rows`` computes it one block of rows at a time."""
    n = H.shape[0]
    dead = torch.diagonal(H) == 0
    _reverse_storage(H)
    H.diagonal()[dead.flip(0)] = 1.0
    mean_diag = max(float(H.diagonal().mean()), 1e-8)
    upper = _PackedUpper(H)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(6):
        if attempt:
            upper.restore(H)
        H.diagonal().add_(damp * (10 ** attempt) * mean_diag)
        L, info = torch.linalg.cholesky_ex(H.mT, out=(H.mT, info))   # symmetric: H^T is H
        if int(info) == 0:
            if attempt:
                log.info("SparseGPT: Hessian needed %gx the damping", 10 ** attempt)
            return L, dead
    raise ValueError(f"SparseGPT: the {n}x{n} Hessian is not positive definite even with heavy damping; "
                     "use more calibration samples")


def _reverse_storage(A: torch.Tensor, rows: int = 64) -> None:
    """``A`` (a contiguous matrix) := its elements in reverse order (``A.flip(0, 1)``), in place,
    ``rows`` rows' worth of elements at a time from both ends."""
    flat = A.view(-1)
    m, chunk = flat.numel(), rows * A.shape[-1]
    for a in range(0, m // 2, chunk):
        b = min(a + chunk, m // 2)
        front, back = flat[a:b], flat[m - b:m - a]
        saved = front.clone()
        front.copy_(back.flip(0))
        back.copy_(saved.flip(0))


class _PackedUpper:
    """The upper triangle (with the diagonal) of a square matrix, rows packed one after the
    other in one vector of ``n (n + 1) / 2`` elements."""

    def __init__(self, A: torch.Tensor) -> None:
        n = A.shape[0]
        self.starts = [i * n - i * (i - 1) // 2 for i in range(n + 1)]
        self.data = torch.empty(self.starts[-1], dtype=A.dtype, device=A.device)
        for i in range(n):
            self.data[self.starts[i]:self.starts[i + 1]].copy_(A[i, i:])

    def restore(self, A: torch.Tensor) -> None:
        """Write the triangle back into ``A``."""
        for i in range(A.shape[0]):
            A[i, i:].copy_(self.data[self.starts[i]:self.starts[i + 1]])


def _inverse_rows(L: torch.Tensor, k: int) -> torch.Tensor:
    """Rows ``i1:i1+k`` of ``U = J L^-1 J`` from column ``i1`` on (left of it U is 0), ``L``
    being the leading ``(n-i1) x (n-i1)`` part of the factor.

    They are the last ``k`` rows of that part's inverse (``L^-1``'s leading part is the
    inverse of ``L``'s): one triangular solve with ``k`` right-hand sides, so the whole walk
    costs n^3/3, a third of inverting the factor at once."""
    r1 = L.shape[0]
    rhs = torch.zeros(k, r1, dtype=L.dtype, device=L.device)
    rhs[:, r1 - k:].fill_diagonal_(1.0)
    X = torch.linalg.solve_triangular(L, rhs, upper=False, left=False)   # X L = I rows
    return X.flip(0, 1)


def _leading_in_place(L: torch.Tensor, r: int, chunk: int = 64) -> torch.Tensor:
    """The leading ``r x r`` part of the column-major ``L``, moved to the start of ``L``'s memory
    as a column-major matrix of its own (``L`` is overwritten): the triangular solve then
    needs no copy of it. Columns move ``chunk`` at a time, each read before it is overwritten."""
    n = L.shape[0]
    if r == n:
        return L
    flat = L.mT.reshape(-1)                      # L's memory: column j at j * n (a view)
    for j0 in range(1, r, chunk):                # column 0 is in place already
        j1 = min(j0 + chunk, r)
        flat[j0 * r:j1 * r].view(j1 - j0, r).copy_(flat[j0 * n:j1 * n].view(j1 - j0, n)[:, :r].clone())
    return flat[:r * r].view(r, r).mT


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
