"""Spectra: the eigenvalues of ``W^T W`` (or ``W W^T``, the smaller side) of every matrix.

Route (measured, see ``benchmarks/bench_analysis.py``): the float64 Gram matrix and a
symmetric eigen-solver, about twice as fast as an SVD and accurate to ~1e-14 relative for
the upper half of the spectrum. No 1/N normalisation (the reference tools' convention).

- CPU: NumPy/LAPACK, one matrix per worker thread with single-threaded BLAS (faster on
  few cores than one multi-threaded solver, whose tridiagonal reduction scales poorly).
- CUDA/MPS: torch, matrices of the same shape stacked into one batched call.

Eigenvalues below ``max(rows, cols) * eps * lambda_max`` are rounding noise of the Gram
route and are set to exactly 0 (they mark a rank-deficient matrix). A matrix with
NaN/Inf entries gets all-NaN eigenvalues and a ``reason``.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from .config import resolve_device
from .progress import Progress, report
from .models import MatrixInfo

log = logging.getLogger(__name__)

_EPS = np.finfo(np.float64).eps


@dataclass
class Spectrum:
    """Eigenvalues (ascending, float64, ``min(rows, cols)`` of them) of one matrix."""

    info: MatrixInfo
    eigs: np.ndarray
    w_var: float          # variance of the entries: the Marchenko-Pastur scale
    reason: str = ""      # why the spectrum is unusable ("" when fine)


def _unusable(info: MatrixInfo, n_eigs: int) -> Spectrum:
    """A matrix with NaN/Inf entries: all-NaN eigenvalues and the reason."""
    return Spectrum(info, np.full(n_eigs, np.nan), float("nan"), "non-finite weights (NaN/Inf)")


def _clean(eigs: np.ndarray, n_max: int) -> np.ndarray:
    eigs = np.sort(eigs)
    top = eigs[-1] if eigs.size else 0.0
    eigs[eigs < n_max * _EPS * max(top, 0.0)] = 0.0
    return eigs


def _cpu_one(info: MatrixInfo, w: torch.Tensor) -> Spectrum:
    a = w.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(a).all():
        return _unusable(info, min(a.shape))
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    return Spectrum(info, _clean(np.linalg.eigvalsh(gram), max(a.shape)), float(a.var()))


def _torch_group(items: list[tuple[MatrixInfo, torch.Tensor]], device: torch.device) -> list[Spectrum]:
    """Same-shaped matrices in one batched Gram + eigvalsh call on ``device``."""
    w = torch.stack([t.detach() for _, t in items]).to(device=device, dtype=torch.float64)
    finite = torch.isfinite(w).flatten(1).all(dim=1)
    w = torch.where(finite[:, None, None], w, torch.zeros((), dtype=w.dtype, device=device))
    gram = w.mT @ w if w.shape[1] >= w.shape[2] else w @ w.mT
    eigs = torch.linalg.eigvalsh(gram).cpu().numpy()
    var = w.flatten(1).var(dim=1, unbiased=False).cpu().numpy()
    out = []
    for (info, _), e, v, ok in zip(items, eigs, var, finite.cpu().tolist()):
        if ok:
            out.append(Spectrum(info, _clean(e, max(info.rows, info.cols)), float(v)))
        else:
            out.append(_unusable(info, e.size))
    return out


def _chunks(items: Iterable[tuple[MatrixInfo, torch.Tensor]], budget: int) -> Iterator[list]:
    """Consecutive items whose float64 copies fit in ``budget`` bytes (at least one)."""
    chunk, used = [], 0
    for info, w in items:
        size = info.params * 8
        if chunk and used + size > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append((info, w))
        used += size
    if chunk:
        yield chunk


def compute_spectra(items: Iterable[tuple[MatrixInfo, torch.Tensor]], *, total: int | None = None,
                    device: str | torch.device = "auto", workers: int | None = None,
                    budget_bytes: int = 1 << 30, progress: Progress = None) -> list[Spectrum]:
    """Eigenvalues of every ``(info, weight)`` pair, in input order.

    ``items`` may be a lazy iterator (the streaming path reads one tensor at a time):
    at most ``budget_bytes`` of float64 weights are held at once.
    """
    dev = resolve_device(device)
    out: list[Spectrum] = []
    report(progress, 0, total or 0, "eigenvalues")
    if dev.type == "cpu":
        from threadpoolctl import threadpool_limits

        workers = workers or min(os.cpu_count() or 1, 8)
        with threadpool_limits(1 if workers > 1 else None), ThreadPoolExecutor(workers) as pool:
            for chunk in _chunks(items, budget_bytes):
                for spec in pool.map(lambda it: _cpu_one(*it), chunk):
                    out.append(spec)
                    report(progress, len(out), total or len(out), "eigenvalues")
        return out
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        budget_bytes = min(budget_bytes * 8, free // 4)
    for chunk in _chunks(items, budget_bytes):
        groups: dict[tuple[int, int], list] = {}
        for it in chunk:
            groups.setdefault(tuple(it[1].shape), []).append(it)
        done: dict[str, Spectrum] = {}
        for group in groups.values():
            for spec in _torch_group(group, dev):
                done[spec.info.name] = spec
        out.extend(done[info.name] for info, _ in chunk)
        report(progress, len(out), total or len(out), "eigenvalues")
    return out


def eigenvalues(weight: torch.Tensor | np.ndarray, *, device: str = "cpu") -> np.ndarray:
    """Eigenvalues of one matrix (ascending float64): a convenience for notebooks and lessons."""
    w = torch.as_tensor(weight)
    info = MatrixInfo("matrix", 0, "matrix", int(w.shape[0]), int(w.shape[1]))
    return compute_spectra([(info, w)], total=1, device=device, workers=1)[0].eigs
