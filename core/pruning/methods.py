"""The pruning methods, one class each: the statistics it collects from a matrix's inputs
(its collector, or none) and its rule, which zeroes entries of the block's matrices.
``METHODS`` names them; ``parse_nm`` and ``check_nm`` read and check an N:M pattern.

- ``magnitude``: no statistics; zero the fraction r of smallest ``|W|`` in the whole matrix.
- ``wanda``: ``s_j = sum x_j^2`` over all calibration tokens; score ``|W_ij| sqrt(s_j)``;
  in each output row zero the fraction r with the lowest score.
- ``sparsegpt``: the Hessian of the inputs, then an OBS walk over the columns that spreads
  each pruned weight's error over the later columns (``sparsegpt.py``); matrices with the
  same input (q, k, v; gate, up) share one Hessian and one walk.

N:M (``nm=(2, 4)``): in every group of M consecutive inputs of a row keep the N with the
highest score; the ratios are then ignored (every matrix gets 1 - N/M).
"""
from __future__ import annotations

import math
from typing import ClassVar, Mapping, Sequence

import torch

from ..choices import PRUNE_METHODS
from ..models import LoadedModel, MatrixInfo
from .engine import Collector
from .selection import lowest_in_groups, lowest_in_rows, mask_lowest
from .sparsegpt import SPARSEGPT_BLOCKSIZE, HessianCollector, prune_sparsegpt


def parse_nm(nm: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``None``/``""`` -> ``None``. N must be in 1..M-1."""
    if nm is None or nm == "":
        return None
    if isinstance(nm, str):
        try:
            n, m = (int(p) for p in nm.split(":"))
        except ValueError:
            raise ValueError(f"--nm {nm}: write N:M (keep N of every M consecutive inputs), e.g. 2:4 or 4:8") \
                from None
    else:
        n, m = (int(p) for p in nm)
    if not (m >= 2 and 1 <= n < m):
        raise ValueError(f"--nm {n}:{m}: N of every M consecutive inputs are kept, so 1 <= N < M; "
                         "e.g. 2:4 or 4:8")
    return n, m


def check_nm(nm: tuple[int, int], method: Method, matrices: Sequence[MatrixInfo]) -> None:
    """Raise unless M divides every matrix's input size (and the method's blocks of columns),
    so that groups of M consecutive inputs tile them; the message lists the M that would."""
    n, m = nm
    sizes = sorted({info.cols for info in matrices})
    common = math.gcd(*sizes, method.column_block or 0)
    if common % m == 0:
        return
    why = f"the input size of every matrix ({', '.join(map(str, sizes))})"
    if method.column_block:
        why += f" and {method.name}'s blocks of {method.column_block} columns"
    choices = [k for k in range(2, common + 1) if common % k == 0]
    if not choices:
        raise ValueError(f"--nm {n}:{m}: M must divide {why}, and no M >= 2 does; prune this model "
                         "without --nm")
    example = "2:4" if 4 in choices else f"1:{choices[0]}"
    raise ValueError(f"--nm {n}:{m}: M must divide {why}, so M can be "
                     f"{', '.join(map(str, choices))} (with any N < M), e.g. --nm {example}")


class NormCollector:
    """Wanda's statistics: ``sq[j] = sum over tokens of x_j^2`` (float32)."""

    def __init__(self, cols: int, device: torch.device) -> None:
        self.cols, self.device, self.tokens = cols, device, 0
        self.sq = torch.zeros(cols, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` (tokens x cols)."""
        x = x.float()
        self.sq += (x * x).sum(0)
        self.tokens += x.shape[0]


def prune_magnitude(W: torch.Tensor, ratio: float, *, nm: tuple[int, int] | None = None) -> None:
    """Zero the fraction ``ratio`` of smallest ``|W|`` (N:M: in every group), in place."""
    score = W.abs()
    if nm:
        W.scatter_(1, lowest_in_groups(score, *nm), 0.0)
    else:
        W.masked_fill_(mask_lowest(score, ratio), 0.0)


def prune_wanda(W: torch.Tensor, sq: torch.Tensor, ratio: float, *, nm: tuple[int, int] | None = None) -> None:
    """Zero, in each row (N:M: in every group), the fraction ``ratio`` of lowest
    ``|W_ij| sqrt(sq_j)``, in place."""
    score = W.abs().mul_(sq.sqrt().unsqueeze(0))
    W.scatter_(1, lowest_in_groups(score, *nm) if nm else lowest_in_rows(score, ratio), 0.0)


class Method:
    """A pruning method: ``collector`` (the statistics class, None for none) and ``rule``.

    ``rule(Ws, stats, ratios, nm)`` zeroes entries of the float32 matrices ``Ws`` (out x in)
    in place; it gets one matrix at a time, or with ``joint`` all the matrices of a block
    that are fed the same input (they share one collector). ``column_block``: groups of M
    must also tile blocks of this many columns (N:M)."""

    name: ClassVar[str]
    collector: ClassVar[type | None] = None
    joint: ClassVar[bool] = False
    column_block: ClassVar[int | None] = None

    def rule(self, Ws: list[torch.Tensor], stats: Collector | None, ratios: list[float],
             nm: tuple[int, int] | None) -> None:
        raise NotImplementedError

    def prune_block(self, loaded: LoadedModel, block: int, stats: Mapping[str, Collector], *,
                    ratios: Mapping[str, float], nm: tuple[int, int] | None, device: torch.device) -> None:
        """Apply the rule to every matrix of ``block`` with a ratio above 0 (all with ``nm``),
        working in float32 on ``device`` and writing the result into the model."""
        todo = [info for info in loaded.matrices
                if info.block == block and (nm is not None or ratios[info.name] > 0.0)]
        groups: dict[int, list[MatrixInfo]] = {}
        for info in todo:
            key = id(stats[info.name]) if self.joint else id(info)
            groups.setdefault(key, []).append(info)
        for infos in groups.values():
            views = [loaded.weight(info.name) for info in infos]        # out x in (transposed view for Conv1D)
            Ws = [v.detach().to(device, torch.float32) for v in views]  # the weight itself if float32 on device
            self.rule(Ws, stats.get(infos[0].name), [ratios[info.name] for info in infos], nm)
            for view, W in zip(views, Ws):
                if W.data_ptr() != view.data_ptr() or W.device != view.device:
                    view.copy_(W)


class Magnitude(Method):
    """Zero the fraction r of smallest ``|W|`` in the whole matrix; no calibration data."""

    name = "magnitude"

    def rule(self, Ws, stats, ratios, nm) -> None:
        for W, ratio in zip(Ws, ratios):
            prune_magnitude(W, ratio, nm=nm)


class Wanda(Method):
    """Zero, per output row, the fraction r with the lowest ``|W_ij| sqrt(sum x_j^2)``."""

    name = "wanda"
    collector = NormCollector

    def rule(self, Ws, stats, ratios, nm) -> None:
        for W, ratio in zip(Ws, ratios):
            prune_wanda(W, stats.sq, ratio, nm=nm)


class SparseGPT(Method):
    """OBS pruning with reconstruction from the inputs' Hessian; matrices with one input
    share one walk over the columns."""

    name = "sparsegpt"
    collector = HessianCollector
    joint = True
    column_block = SPARSEGPT_BLOCKSIZE

    def rule(self, Ws, stats, ratios, nm) -> None:
        # the Hessian is made in the statistics' memory and becomes the Cholesky factor there:
        # one n x n matrix per group, freed when its walk ends
        prune_sparsegpt(Ws, stats.take_hessian(), ratios, nm=nm, blocksize=self.column_block, overwrite_H=True)


_REGISTRY: dict[str, Method] = {m.name: m for m in (Magnitude(), Wanda(), SparseGPT())}
METHODS: tuple[str, ...] = PRUNE_METHODS   # the CLI's choices, read without torch: the same names
assert tuple(_REGISTRY) == METHODS, "core.choices.PRUNE_METHODS must name the registered methods"
#: the N:M patterns the dashboard offers (any valid N:M works through ``parse_nm``)
NM_PATTERNS: tuple[str, ...] = ("2:4", "4:8")


def get_method(name: str) -> Method:
    """The method called ``name`` (one of ``METHODS``)."""
    if name not in _REGISTRY:
        raise ValueError(f"method={name!r} is unknown; use one of {', '.join(METHODS)}")
    return _REGISTRY[name]
