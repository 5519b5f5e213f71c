"""Pruning: magnitude, Wanda and SparseGPT with any per-matrix ratios, plus N:M sparsity.

One block-sequential engine serves every method (primer section 5):

1. capture the inputs of block 0 for every calibration window (a pre-hook that stops the
   forward there) and the arguments each block receives (attention mask, position
   embeddings, ...) from one pass of the first window in which only block 0 computes;
2. for each block: move it to ``device``; run the windows through it (in batches of about
   ``BATCH_TOKENS`` tokens) with pre-hooks that feed the method's statistics ``Collector``
   and end each call once the last matrix has its input; prune each matrix with the
   method's rule; run the windows through the pruned block to form the next block's
   inputs; move it back.

Memory stays at one block plus two activation buffers (``nsamples x seqlen x hidden``).
The methods differ only in their collector and rule:

- ``magnitude``: no statistics; zero the fraction r of smallest ``|W|`` in the whole matrix.
- ``wanda``: ``s_j = sum x_j^2`` over all calibration tokens; score ``|W_ij| sqrt(s_j)``;
  in each output row zero the fraction r with the lowest score.
- ``sparsegpt``: ``H = mean x x^T`` (+1% of its mean diagonal); columns in blocks of 128,
  per block the fraction r with the lowest ``w^2 / [H^-1]_jj`` is zeroed and the error is
  spread over the not yet processed columns (OBS update, lazy across blocks). Matrices
  with the same input (q, k, v; gate, up) share one Hessian and one walk over the columns.

N:M (``nm=(2, 4)``): in every group of M consecutive inputs of a row keep the N with the
highest score; the ratios are then ignored (every matrix gets 1 - N/M).

``owl_scores`` / ``owl_ratios``: OWL allocation from the same Wanda statistics of the dense
model. The model passed in is pruned in place; ``prune(..., copy=True)`` prunes a deep copy.
"""
from __future__ import annotations

import copy as _copy
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from .config import BATCH_TOKENS, resolve_device, window_batches
from .progress import Cancelled, Progress, check_cancel, report
from .models import LoadedModel, get_attr

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
NM_PATTERNS = ("2:4", "4:8")
SPARSEGPT_BLOCKSIZE = 128
SPARSEGPT_DAMP = 0.01
HESSIAN_PANEL = 384
OWL_LAMBDA = 0.08
OWL_M = 5.0

def parse_nm(nm: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``None``/``""`` -> ``None``. N must be in 1..M-1."""
    if nm is None or nm == "":
        return None
    if isinstance(nm, str):
        try:
            n, m = (int(p) for p in nm.split(":"))
        except ValueError:
            raise ValueError(f"nm={nm!r}: write N:M, e.g. 2:4 or 4:8") from None
    else:
        n, m = (int(p) for p in nm)
    if not (m >= 2 and 1 <= n < m):
        raise ValueError(f"nm={nm!r}: need 1 <= N < M, e.g. 2:4 or 4:8")
    return n, m


# --- statistics collectors -------------------------------------------------------------

class Collector:
    """Statistics of one matrix's inputs, fed by a forward hook (``add(x)``, x: tokens x in)."""

    def __init__(self, cols: int, device: torch.device) -> None:
        self.cols, self.device, self.tokens = cols, device, 0

    def add(self, x: torch.Tensor) -> None:  # pragma: no cover - the magnitude collector
        self.tokens += x.shape[0]


class NormCollector(Collector):
    """Wanda: ``sq[j] = sum over tokens of x_j^2`` (float32)."""

    def __init__(self, cols: int, device: torch.device) -> None:
        super().__init__(cols, device)
        self.sq = torch.zeros(cols, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.sq += (x * x).sum(0)
        self.tokens += x.shape[0]


class HessianCollector(Collector):
    """SparseGPT: ``H = (1/n) sum x x^T`` in float32 (a running sum, divided when read).

    Only the upper triangle is accumulated, as panels of about ``HESSIAN_PANEL`` rows
    (``x[:, a:b]^T x[:, a:]``): 60-75% of the full product's work for the same result."""

    def __init__(self, cols: int, device: torch.device) -> None:
        super().__init__(cols, device)
        self.sum = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        k = min(8, -(-cols // HESSIAN_PANEL))
        self.edges = [round(i * cols / k) for i in range(k + 1)]

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        for a, b in zip(self.edges[:-1], self.edges[1:]):
            self.sum[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])
        self.tokens += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        upper = torch.triu(self.sum)
        return (upper + torch.triu(self.sum, 1).t()) / max(self.tokens, 1)


_COLLECTORS: dict[str, type[Collector] | None] = {"magnitude": None, "wanda": NormCollector,
                                                   "sparsegpt": HessianCollector}


# --- prune rules (W: out x in, float32, modified in place) ----------------------------

def _mask_lowest_flat(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of exactly round(ratio * numel) lowest entries of ``score``."""
    k = int(round(ratio * score.numel()))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask.index_fill_(0, torch.topk(score.reshape(-1), k, largest=False, sorted=False).indices, True)
    return mask.reshape(score.shape)


def _lowest_in_rows(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Column indices of the round(ratio * cols) lowest entries of every row."""
    k = int(round(ratio * score.shape[1]))
    return torch.topk(score, k, dim=1, largest=False, sorted=False).indices


def _lowest_in_groups(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Column indices of the ``m - n`` lowest entries of every group of ``m`` consecutive
    columns of each row (rows x cols/m*(m-n))."""
    rows, cols = score.shape
    idx = torch.topk(score.reshape(rows, cols // m, m), m - n, dim=2, largest=False, sorted=False).indices
    return (idx + torch.arange(0, cols, m, device=score.device).view(1, -1, 1)).reshape(rows, -1)


def prune_magnitude(W: torch.Tensor, ratio: float, *, nm: tuple[int, int] | None = None) -> None:
    score = W.abs()
    if nm:
        W.scatter_(1, _lowest_in_groups(score, *nm), 0.0)
    else:
        W.masked_fill_(_mask_lowest_flat(score, ratio), 0.0)


def prune_wanda(W: torch.Tensor, sq: torch.Tensor, ratio: float, *, nm: tuple[int, int] | None = None) -> None:
    score = W.abs().mul_(sq.sqrt().unsqueeze(0))
    W.scatter_(1, _lowest_in_groups(score, *nm) if nm else _lowest_in_rows(score, ratio), 0.0)


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


def prune_sparsegpt(W: torch.Tensor | Sequence[torch.Tensor], H: torch.Tensor, ratio: float | Sequence[float], *,
                    nm: tuple[int, int] | None = None, blocksize: int = SPARSEGPT_BLOCKSIZE,
                    damp: float = SPARSEGPT_DAMP) -> None:
    """OBS pruning with reconstruction (SparseGPT); every matrix is updated in place.

    ``W``: one matrix (out x in) or several that receive the same input (q, k and v; gate
    and up), with one ``ratio`` for all or one each. Rows never interact, so the matrices
    are stacked and share one walk over the columns. ``U`` is the upper Cholesky factor of
    H^-1: row i of U from column i on is the update that compensates removing column i
    once columns < i are fixed, and ``U[i, i]^2`` is ``[H^-1]_ii`` in the saliency
    ``w^2 / [H^-1]_ii``.
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
            mask[:, a:b] = _mask_lowest_flat(score[:, a:b], r)
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
                mask[g].t().scatter_(1, _lowest_in_groups(score, *nm), True)
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


# --- block-sequential engine -----------------------------------------------------------

class _Stop(Exception):
    """Raised by the block-0 pre-hook to end a capture forward early."""


@dataclass
class _Captured:
    inputs: torch.Tensor                       # nsamples x seqlen x hidden, on device
    args: list[tuple]                          # per block: positional args after hidden states
    kwargs: list[dict]                         # per block: keyword args (hidden states removed)


def _to(obj: object, device: torch.device) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _call_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _BlocksDetached:
    """Temporarily take the block list out of the model (to move the rest to a device)."""

    def __init__(self, loaded: LoadedModel) -> None:
        path = loaded.family.blocks
        parent_path, _, self.attr = path.rpartition(".")
        self.parent = get_attr(loaded.model, parent_path) if parent_path else loaded.model
        self.blocks = getattr(self.parent, self.attr)

    def __enter__(self) -> nn.ModuleList:
        setattr(self.parent, self.attr, nn.ModuleList())
        return self.blocks

    def __exit__(self, *exc: object) -> None:
        setattr(self.parent, self.attr, self.blocks)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _capture(loaded: LoadedModel, ids: torch.Tensor, device: torch.device, cancel: object) -> _Captured:
    """Block-0 inputs of every window, and every block's other arguments from window 0.

    Window 0 goes through the model's own forward so that pre-hooks record what every block
    receives (masks differ between sliding-window and global layers in some families), but
    only block 0 computes: the later blocks are stand-ins that pass the hidden states on
    (in the structure block 0 returned), and the pass ends at the last block. Later
    windows, in batches, stop at block 0. The arguments recorded for one window serve
    batches of windows too (they broadcast over the batch: rotary tables, causal masks).
    """
    model, blocks = loaded.model, loaded.blocks
    home_device = _model_device(model)
    with _BlocksDetached(loaded):
        model.to(device)                        # embeddings, rotary tables, final norm, head
    buf: dict[str, torch.Tensor] = {}
    per_block: list[tuple[tuple, dict] | None] = [None] * len(blocks)
    state: dict = {"rows": slice(0, 1), "full": True}
    first = blocks[0]
    first_home = _model_device(first)

    def pre_hook(b: int):
        def pre(module: nn.Module, args: tuple, kwargs: dict):
            hidden, rest, kw = _split_hidden(args, kwargs)
            if b == 0:
                if "inputs" not in buf:
                    buf["inputs"] = torch.empty((ids.shape[0],) + tuple(hidden.shape[1:]), dtype=hidden.dtype,
                                                device=device)
                buf["inputs"][state["rows"]] = hidden.to(device)
            if not state["full"]:
                raise _Stop
            per_block[b] = (rest, kw)
            if b == len(blocks) - 1:
                raise _Stop
            return None
        return pre

    def first_output(module: nn.Module, args: tuple, output: object) -> None:
        buf["template"] = output

    def stand_in(*args: object, **kwargs: object) -> object:
        hidden = _split_hidden(args, kwargs)[0]
        out = buf["template"]
        return hidden if isinstance(out, torch.Tensor) else type(out)((hidden, *out[1:]))

    handles = [blk.register_forward_pre_hook(pre_hook(b), with_kwargs=True) for b, blk in enumerate(blocks)]
    handles.append(first.register_forward_hook(first_output))
    for blk in blocks[1:]:
        blk.forward = stand_in                  # an instance attribute: hooks still run
    try:
        first.to(device)
        for rows in [slice(0, 1)] + window_batches(ids.shape[0], ids.shape[1], start=1):
            check_cancel(cancel, "while capturing calibration inputs")
            state["rows"], state["full"] = rows, rows.start == 0
            try:
                model(input_ids=ids[rows].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        for blk in blocks[1:]:
            blk.__dict__.pop("forward", None)
        first.to(first_home)
        if home_device != device:
            with _BlocksDetached(loaded):
                model.to(home_device)
    missing = [b for b, v in enumerate(per_block) if v is None]
    if missing:
        raise ValueError(f"blocks {missing[:5]} were never called in a forward pass; this architecture is "
                         "not supported by the pruning engine")
    return _Captured(buf["inputs"], [_to(a, device) for a, _ in per_block], [_to(k, device) for _, k in per_block])


def _rel_names(loaded: LoadedModel, block: int) -> list:
    return [m for m in loaded.matrices if m.block == block]


class _Rebatch(Exception):
    """The first batch of a pass failed; the pass starts again with one window per call."""


class _Windows:
    """Runs every window through one block, in batches (``window_batches``). If the first
    batch fails (a family whose recorded arguments do not broadcast over a batch, or a batch
    that does not fit in memory), it switches to one window per call for the rest of the
    run and raises ``_Rebatch`` so that the caller starts the pass again."""

    def __init__(self) -> None:
        self.tokens = BATCH_TOKENS

    def run(self, blk: nn.Module, inps: torch.Tensor, outs: torch.Tensor, args: tuple, kwargs: dict,
            before: Callable[[], None] | None = None, after: Callable[[], None] | None = None) -> None:
        for k, rows in enumerate(window_batches(inps.shape[0], inps.shape[1], tokens=self.tokens)):
            if before:
                before()
            try:
                outs[rows] = _call_block(blk, inps[rows], args, kwargs)
            except _Stop:
                pass
            except RuntimeError as exc:
                if k or rows.stop - rows.start == 1:
                    raise
                log.warning("windows go one at a time from now on: a batch of %d failed (%s)",
                            rows.stop - rows.start, str(exc).splitlines()[0][:200])
                self.tokens = 1
                raise _Rebatch from exc
            finally:
                if after:
                    after()

    def retry(self, fn: Callable[[], None]) -> None:
        """``fn()``, once more if the batch size had to change."""
        try:
            fn()
        except _Rebatch:
            fn()


@torch.no_grad()
def _run_engine(loaded: LoadedModel, ids: torch.Tensor | None, *, collector: type[Collector] | None,
                on_block: Callable[[int, dict[str, Collector]], None], forward_after: bool,
                device: torch.device, progress: Progress, cancel: object, label: str) -> None:
    """The shared loop: per block, collect statistics, call ``on_block``, forward again."""
    blocks = loaded.blocks
    n_blocks = len(blocks)
    if collector is None:
        # magnitude: no data flows; each block is handled where it is (moved if needed)
        for b, blk in enumerate(blocks):
            check_cancel(cancel, f"before block {b}")
            home_device = _model_device(blk)
            blk.to(device)
            try:
                on_block(b, {})
            finally:
                blk.to(home_device)
            report(progress, b + 1, n_blocks, f"{label} block {b + 1}/{n_blocks}")
        return
    report(progress, 0, n_blocks, f"{label}: capturing inputs")
    cap = _capture(loaded, ids, device, cancel)
    inps, outs = cap.inputs, torch.empty_like(cap.inputs)
    runner = _Windows()
    for b, blk in enumerate(blocks):
        check_cancel(cancel, f"before block {b}")
        home_device = _model_device(blk)
        blk.to(device)
        try:
            infos = _rel_names(loaded, b)
            # matrices fed the very same tensor (q, k, v; gate, up) share one collector:
            # found in the first window, where the first such matrix becomes the leader
            # (the tensors are held in ``owner`` until the call ends so that no address is reused).
            # When the block's output is not needed (it is computed again after pruning), a
            # call stops as soon as every matrix has seen its input: the last matrix
            # (down_proj, fc2, ...) is never multiplied in this pass.
            st: dict = {}

            def fresh() -> None:
                st.update(stats={m.name: collector(m.cols, device) for m in infos}, leader={}, owner={}, seen=set())

            def make_hook(name: str):
                def hook(module: nn.Module, args: tuple) -> None:
                    x, leader, seen = args[0].detach(), st["leader"], st["seen"]
                    if name not in leader:
                        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                        leader[name] = st["owner"].setdefault(key, (name, x))[0]
                    if leader[name] == name:
                        st["stats"][name].add(x.reshape(-1, x.shape[-1]))
                    seen.add(name)
                    if forward_after and len(seen) == len(infos):
                        raise _Stop
                return hook

            def collect() -> None:
                fresh()
                runner.run(blk, inps, outs, cap.args[b], cap.kwargs[b], before=lambda: st["seen"].clear(),
                           after=lambda: st["owner"].clear())

            handles = [loaded.module(m.name).register_forward_pre_hook(make_hook(m.name)) for m in infos]
            try:
                runner.retry(collect)
            finally:
                for h in handles:
                    h.remove()
            stats, leader = st.pop("stats"), st["leader"]
            on_block(b, {name: stats[leader.get(name, name)] for name in stats})
            del stats
            if forward_after and b + 1 < n_blocks:                # the last block's output is not used
                runner.retry(lambda: runner.run(blk, inps, outs, cap.args[b], cap.kwargs[b]))
        finally:
            blk.to(home_device)
        inps, outs = outs, inps
        report(progress, b + 1, n_blocks, f"{label} block {b + 1}/{n_blocks}")


# --- public API ------------------------------------------------------------------------

@dataclass
class PruneResult:
    """What ``prune`` did: per matrix the requested ratio and the achieved fraction of zeros."""

    model: LoadedModel
    method: str
    nm: tuple[int, int] | None
    matrices: pd.DataFrame            # name, block, kind, params, ratio, achieved
    seconds: float
    device: str
    dtype: str
    calibration: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Parameter-weighted achieved sparsity over the prunable matrices."""
        m = self.matrices
        return float((m["achieved"] * m["params"]).sum() / m["params"].sum())

    @property
    def requested(self) -> float:
        m = self.matrices
        return float((m["ratio"] * m["params"]).sum() / m["params"].sum())

    def summary(self) -> str:
        pattern = f" {self.nm[0]}:{self.nm[1]}" if self.nm else ""
        return (f"{self.method}{pattern} pruned {len(self.matrices)} matrices in {self.seconds:.1f} s on "
                f"{self.device} ({self.dtype}): requested {self.requested:.4f}, achieved {self.sparsity:.4f}")


def _check_ratios(loaded: LoadedModel, ratios: Mapping[str, float] | float | None,
                  nm: tuple[int, int] | None) -> dict[str, float]:
    names = [m.name for m in loaded.matrices]
    if nm is not None:
        bad = [m.name for m in loaded.matrices if m.cols % nm[1]]
        if bad:
            raise ValueError(f"nm={nm[0]}:{nm[1]}: {len(bad)} matrices have an input size that is not a multiple "
                             f"of {nm[1]}, e.g. {bad[0]}")
        return {n: 1.0 - nm[0] / nm[1] for n in names}
    if ratios is None:
        raise ValueError("ratios=None: give per-matrix ratios (a mapping name -> ratio) or one float, or nm")
    if isinstance(ratios, (int, float)):
        ratios = {n: float(ratios) for n in names}
    unknown = sorted(set(ratios) - set(names))
    if unknown:
        raise ValueError(f"ratios names {len(unknown)} matrices the model does not have, e.g. {unknown[0]!r}")
    out = {}
    for n in names:
        r = float(ratios.get(n, 0.0))
        if not (0.0 <= r < 1.0) or math.isnan(r):
            raise ValueError(f"ratios[{n!r}]={r!r}: a ratio must be in [0, 1)")
        out[n] = r
    return out


def achieved_sparsity(loaded: LoadedModel) -> dict[str, float]:
    """Fraction of exact zeros in every prunable matrix."""
    return {m.name: 1.0 - int(torch.count_nonzero(loaded.weight(m.name))) / m.params for m in loaded.matrices}


def prune(loaded: LoadedModel, ratios: Mapping[str, float] | float | None = None, *, method: str = "wanda",
          calibration: torch.Tensor | object | None = None, nm: str | tuple[int, int] | None = None,
          device: str | torch.device = "auto", copy: bool = False, blocksize: int = SPARSEGPT_BLOCKSIZE,
          damp: float = SPARSEGPT_DAMP, progress: Progress = None, cancel: object = None) -> PruneResult:
    """Prune every matrix of ``loaded`` to its ratio with ``method``; returns a ``PruneResult``.

    ``ratios``: ``{matrix name: fraction to prune}`` (missing names stay dense) or one float
    for all. ``calibration``: token ids ``nsamples x seqlen`` or a ``Calibration`` (needed by
    wanda and sparsegpt). ``nm``: ``"2:4"``/``"4:8"`` semi-structured (ratios ignored).
    ``device``: where each block is processed (the model may live elsewhere; it ends where it
    started). ``copy=True`` prunes a deep copy and leaves ``loaded`` untouched. ``cancel``: a
    ``threading.Event`` or a callable checked between blocks (raises ``Cancelled``).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")
    nm = parse_nm(nm)
    ratios = _check_ratios(loaded, ratios, nm)
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r}: give a positive whole number such as 128")
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize={blocksize}: must be a multiple of M={nm[1]} for N:M pruning")
    if not (0.0 <= damp < 1.0):
        raise ValueError(f"damp={damp!r}: give a fraction of the mean Hessian diagonal such as 0.01")
    dev = resolve_device(device)
    ids, calib_info = _calibration_ids(calibration, method)
    if copy:
        loaded = _copy_loaded(loaded)
    model = loaded.model
    dtype = next(model.parameters()).dtype
    start = time.perf_counter()

    def on_block(b: int, stats: dict[str, Collector]) -> None:
        todo = [info for info in _rel_names(loaded, b) if nm is not None or ratios[info.name] > 0.0]
        if method == "sparsegpt":
            groups: dict[int, list] = {}                     # q, k, v (and gate, up) share one input
            for info in todo:
                groups.setdefault(id(stats[info.name]), []).append(info)
            for infos in groups.values():
                col = stats[infos[0].name]
                views = [loaded.weight(info.name) for info in infos]
                Ws = [v.detach().to(dev, torch.float32) for v in views]
                prune_sparsegpt(Ws, col.H, [ratios[info.name] for info in infos], nm=nm, blocksize=blocksize,
                                damp=damp)
                for v, w in zip(views, Ws):
                    _write_back(v, w)
            return
        for info in todo:
            view = loaded.weight(info.name)          # out x in (transposed view for Conv1D)
            W = view.detach().to(dev, torch.float32)  # the weight itself when already float32 on dev
            if method == "magnitude":
                prune_magnitude(W, ratios[info.name], nm=nm)
            else:
                prune_wanda(W, stats[info.name].sq, ratios[info.name], nm=nm)
            _write_back(view, W)

    was_training = model.training
    model.eval()
    try:
        _run_engine(loaded, ids, collector=_COLLECTORS[method], on_block=on_block, forward_after=True,
                    device=dev, progress=progress, cancel=cancel, label=method)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    achieved = achieved_sparsity(loaded)
    table = pd.DataFrame([{"name": m.name, "block": m.block, "kind": m.kind, "params": m.params,
                           "ratio": ratios[m.name], "achieved": achieved[m.name]} for m in loaded.matrices])
    result = PruneResult(loaded, method, nm, table, seconds, str(dev), str(dtype).replace("torch.", ""),
                         calib_info)
    log.info(result.summary())
    return result


def _write_back(view: torch.Tensor, W: torch.Tensor) -> None:
    """Copy the pruned ``W`` into the model's weight unless ``W`` already is that memory."""
    if W.data_ptr() != view.data_ptr() or W.device != view.device:
        view.copy_(W)


def _calibration_ids(calibration: object, method: str) -> tuple[torch.Tensor | None, dict]:
    if method == "magnitude":
        return None, {}
    if calibration is None:
        raise ValueError(f"calibration=None: method {method!r} needs calibration token ids "
                         "(core.calibration.calibration_data)")
    if hasattr(calibration, "input_ids"):
        return calibration.input_ids, dict(calibration.settings())
    ids = torch.as_tensor(calibration)
    if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[1] < 2:
        raise ValueError(f"calibration: expected token ids of shape nsamples x seqlen, got {tuple(ids.shape)} "
                         f"{ids.dtype}")
    return ids.long(), {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1])}


def _copy_loaded(loaded: LoadedModel) -> LoadedModel:
    """A deep copy of the model (weights included); tokenizer and names shared."""
    return LoadedModel(_copy.deepcopy(loaded.model), loaded.tokenizer, loaded.family, loaded.source,
                       loaded.identity, list(loaded.matrices), loaded.path)


# --- OWL allocation --------------------------------------------------------------------

@torch.no_grad()
def owl_scores(loaded: LoadedModel, calibration: object, *, m: float = OWL_M, device: str | torch.device = "auto",
               progress: Progress = None, cancel: object = None) -> dict[int, float]:
    """Per block, the share D_l of Wanda scores ``|W_ij| ||X_j||`` above ``m`` times the block's
    mean score, with the inputs of the dense model (the model is not modified)."""
    if not m > 0:
        raise ValueError(f"m={m!r}: the outlier threshold multiple must be positive (OWL uses 5)")
    ids, _ = _calibration_ids(calibration, "wanda")
    dev = resolve_device(device)
    out: dict[int, float] = {}

    def on_block(b: int, stats: dict[str, Collector]) -> None:
        scores = [(loaded.weight(name).detach().to(dev, torch.float32).abs()
                   * stats[name].sq.sqrt().unsqueeze(0)).reshape(-1) for name in stats]
        allscores = torch.cat(scores)
        out[b] = float((allscores > m * allscores.mean()).float().mean())

    _run_engine(loaded, ids, collector=NormCollector, on_block=on_block, forward_after=False, device=dev,
                progress=progress, cancel=cancel, label="OWL statistics")
    return out


def owl_ratios(loaded: LoadedModel, scores: Mapping[int, float], *, sparsity: float,
               lam: float = OWL_LAMBDA) -> pd.DataFrame:
    """OWL per-matrix ratios: block sparsity ``S - (d_l - mean d)``, ``d_l = 2 lam (D_l - min D)/
    (max D - min D)``, mean weighted by parameters so the overall sparsity is exactly S.
    Returns a table name, block, kind, params, metric (D_l), ratio."""
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity={sparsity!r}: give a fraction in [0, 1), e.g. 0.7")
    if not (0.0 <= lam < 1.0):
        raise ValueError(f"lam={lam!r}: OWL's lambda must be in [0, 1) (0.08 by default)")
    rows = [{"name": m.name, "block": m.block, "kind": m.kind, "params": m.params, "metric": scores[m.block]}
            for m in loaded.matrices]
    t = pd.DataFrame(rows)
    D = t["metric"].to_numpy(dtype=float)
    span = D.max() - D.min()
    d = 2 * lam * (D - D.min()) / span if span > 0 else 0.0 * D
    n = t["params"].to_numpy(dtype=float)
    d = d - (d * n).sum() / n.sum()
    ratio = (sparsity - d).clip(0.0, 0.99)
    t["ratio"] = ratio
    return t
