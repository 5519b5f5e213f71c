"""Deployment: what a pruned model gains at run time, and the one route that pays today.

A pruned model saved with ``--save`` is a dense checkpoint full of zeros, as the reference
code writes it: no smaller on disk and, on a dense runtime, no faster. There is no maintained
sparse checkpoint format that transformers loads. What does pay is 2:4 semi-structured
sparsity on a GPU with sparse tensor cores (NVIDIA compute capability 8.0 or later, float16 or
bfloat16): ``to_semi_structured`` swaps each 2:4 weight of a loaded model for PyTorch's
``SparseSemiStructuredTensor`` (``torch.sparse.to_sparse_semi_structured``), whose matmuls
run on those kernels. ``benchmarks/gpu_check.py`` measures what it buys (each matrix shape's
matmul and end-to-end generation against dense).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from core.models import LoadedModel

log = logging.getLogger(__name__)

#: the dtypes PyTorch's semi-structured sparse kernels take for float weights
SPARSE_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class Conversion:
    """What ``to_semi_structured`` did: the matrices converted and, for each one left dense, why."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def is_2of4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of each output row has at most 2 non-zeros
    (the pattern ``prune --nm 2:4`` writes and the sparse kernels need)."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def unsupported(device: str | torch.device, dtype: torch.dtype) -> str | None:
    """Why semi-structured sparse kernels cannot run here, or None when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"semi-structured sparse kernels need a CUDA GPU; the model is on {device}"
    if not torch.cuda.is_available():
        return "semi-structured sparse kernels need a CUDA GPU; none is visible"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"semi-structured sparse kernels need compute capability 8.0 or later; "
                f"{torch.cuda.get_device_name(device)} has {major}.{minor}")
    if dtype not in SPARSE_DTYPES:
        return f"semi-structured sparse kernels take float16 or bfloat16 weights; the model is {dtype}"
    return None


def to_semi_structured(loaded: LoadedModel) -> Conversion:
    """Swap every 2:4 matrix of ``loaded`` for a ``SparseSemiStructuredTensor``, in place.

    Refuses (ValueError, before touching anything) where the kernels cannot run or when no
    matrix is 2:4; a matrix that is not 2:4, or whose shape the kernels reject, stays dense
    and is named in ``Conversion.skipped`` with the reason."""
    from torch.sparse import to_sparse_semi_structured

    first = loaded.module(loaded.matrices[0].name).weight
    reason = unsupported(first.device, first.dtype)
    if reason:
        raise ValueError(reason)
    if loaded.family.transposed:
        raise ValueError(f"{loaded.family.name} stores its matrices transposed (Conv1D); "
                         "semi-structured conversion supports nn.Linear layers only")
    out = Conversion()
    for info in loaded.matrices:
        mod = loaded.module(info.name)
        if not is_2of4(mod.weight.data):
            out.skipped[info.name] = "not 2:4 (prune with --nm 2:4)"
            continue
        try:
            sparse = to_sparse_semi_structured(mod.weight.data)
        except (RuntimeError, ValueError) as exc:    # a shape or dtype the kernels reject
            out.skipped[info.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            continue
        mod.weight = torch.nn.Parameter(sparse, requires_grad=False)
        out.converted.append(info.name)
    if not out.converted:
        raise ValueError(f"no matrix of {loaded.source} was converted: "
                         f"{next(iter(out.skipped.values()), 'no matrices')}")
    if out.skipped:
        log.warning("%d of %d matrices stay dense (first: %s: %s)", len(out.skipped), len(loaded.matrices),
                    *next(iter(out.skipped.items())))
    return out
