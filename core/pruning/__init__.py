"""Pruning: magnitude, Wanda and SparseGPT with any per-matrix ratios, plus N:M sparsity, and
OWL's outlier scores; the public entry points.

``prune`` runs one block-sequential engine (``engine.py``) with the method's statistics
collector and applies the method's rule (``methods.py``; SparseGPT's algebra in
``sparsegpt.py``) to every block in turn. ``owl_scores`` runs the same engine with Wanda's
statistics on the dense model. The model passed to ``prune`` is pruned in place;
``prune(..., copy=True)`` prunes a deep copy. A model larger than memory, loaded without
weights (``core.models.load_skeleton``), is pruned block by block from its checkpoint's shards
into a new checkpoint folder by ``prune_to_folder`` (``streaming.py``). ``devices`` places the
blocks across several devices of the machine (``placement.py``): each block is pruned on its
device, with the masks of one device.
"""
from __future__ import annotations

import copy as _copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch

from ..choices import OWL_M
from ..config import atomic_dir
from ..models import REPORT_NAME, LoadedModel, output_folder
from ..progress import Progress
from .engine import BlockPipeline, BlockSource, Collector
from .methods import METHODS, NM_PATTERNS, NormCollector, check_nm, get_method, parse_nm, prune_magnitude, prune_wanda
from .placement import placement
from .sparsegpt import HessianCollector, prune_sparsegpt
from .streaming import CheckpointWriter, ShardBlocks, block_source

__all__ = ["METHODS", "NM_PATTERNS", "OWL_M", "HessianCollector", "NormCollector", "PruneResult", "achieved_sparsity",
           "owl_scores", "parse_nm", "prune", "prune_magnitude", "prune_sparsegpt", "prune_to_folder", "prune_wanda"]

log = logging.getLogger(__name__)



@dataclass
class PruneResult:
    """What ``prune`` did: per matrix the requested ratio and the achieved fraction of zeros."""

    model: LoadedModel
    method: str
    nm: tuple[int, int] | None
    matrices: pd.DataFrame            # name, block, kind, params, ratio, achieved
    seconds: float
    device: str                       # one device, or the placement: cuda:0[blocks 0-15]+cuda:1[blocks 16-31]
    dtype: str
    calibration: dict = field(default_factory=dict)
    placement: dict | None = None     # with several devices: Placement.to_dict()

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


def prune(loaded: LoadedModel, ratios: Mapping[str, float] | float | None = None, *, method: str = "wanda",
          calibration: torch.Tensor | object | None = None, nm: str | tuple[int, int] | None = None,
          device: str | torch.device = "auto", copy: bool = False, progress: Progress = None,
          cancel: object = None, source: BlockSource | None = None,
          devices: Sequence[str] | None = None) -> PruneResult:
    """Prune every matrix of ``loaded`` to its ratio with ``method``; returns a ``PruneResult``.

    ``ratios``: ``{matrix name: fraction to prune}`` (missing names stay dense) or one float
    for all. ``calibration``: token ids ``nsamples x seqlen`` or a ``Calibration`` (needed by
    wanda and sparsegpt). ``nm``: ``"2:4"``/``"4:8"`` semi-structured (ratios ignored).
    ``device``: where each block is processed (the model may live elsewhere; it ends where it
    started). ``copy=True`` prunes a deep copy and leaves ``loaded`` untouched. ``cancel``: a
    ``threading.Event`` or a callable checked between blocks (raises ``Cancelled``).
    ``source``: where the blocks' weights come from (default: memory; for a skeleton its
    shards, and the pruned blocks are dropped: use ``prune_to_folder`` to keep them).
    ``devices``: instead of ``device``, the blocks placed across these devices (``placement``).
    """
    chosen = get_method(method)
    nm = parse_nm(nm)
    if nm is not None:
        check_nm(nm, chosen, loaded.matrices)
    ratios = _check_ratios(loaded, ratios, nm)
    place = placement(loaded, devices or device)
    ids, calib_info = _calibration_ids(calibration, method) if chosen.collector else (None, {})
    if copy and source is None:
        loaded = _copy_loaded(loaded)
    model = loaded.model
    dtype = next(model.parameters()).dtype
    start = time.perf_counter()
    pipeline = BlockPipeline(loaded, ids, collector=chosen.collector, device=place, progress=progress,
                             cancel=cancel, label=method, source=source or block_source(loaded))
    achieved: dict[str, float] = {}

    def on_block(b: int, stats: Mapping[str, Collector]) -> None:
        chosen.prune_block(loaded, b, stats, ratios=ratios, nm=nm, device=place[b])
        achieved.update(achieved_sparsity(loaded, b))

    was_training = model.training
    model.eval()
    try:
        pipeline.run(on_block, forward_after=True)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    table = pd.DataFrame([{"name": m.name, "block": m.block, "kind": m.kind, "params": m.params,
                           "ratio": ratios[m.name], "achieved": achieved[m.name]} for m in loaded.matrices])
    result = PruneResult(loaded, method, nm, table, seconds, place.describe(), str(dtype).replace("torch.", ""),
                         calib_info, place.to_dict() if place.spread else None)
    log.info(result.summary())
    return result


def achieved_sparsity(loaded: LoadedModel, block: int | None = None) -> dict[str, float]:
    """Fraction of exact zeros in every prunable matrix (of ``block`` only, if given)."""
    return {m.name: 1.0 - int(torch.count_nonzero(loaded.weight(m.name))) / m.params for m in loaded.matrices
            if block is None or m.block == block}


def prune_to_folder(loaded: LoadedModel, dest: str | Path, ratios: Mapping[str, float] | float | None = None, *,
                    method: str = "wanda", calibration: torch.Tensor | object | None = None,
                    nm: str | tuple[int, int] | None = None, device: str | torch.device = "auto",
                    report: Callable[[PruneResult, Path], dict] | None = None, progress: Progress = None,
                    cancel: object = None, along: Callable[[int], None] | None = None,
                    devices: Sequence[str] | None = None) -> PruneResult:
    """Prune a model larger than memory into the new checkpoint folder ``dest``.

    ``loaded`` comes from ``load_skeleton``: each block is read from the source's shards onto
    ``device``, pruned as by ``prune`` (same arguments, same result), written as one shard and
    freed; then the other tensors (copied one at a time), the index, config and tokenizer.
    ``report(result, folder)``, called once the weights are complete in the not yet published
    folder, returns the JSON written as ``spectrascope_report.json``. Written atomically: an
    interrupted run leaves nothing at ``dest``. The result's model stays without weights.
    ``along(b)`` is called with each pruned block ``b`` on the device (``ShardBlocks``).
    ``devices``: each block read onto and pruned on its device of the placement (``prune``).
    """
    dest = output_folder(dest, loaded)
    done: list[PruneResult] = []

    def write(tmp: Path) -> None:
        source = ShardBlocks(loaded, CheckpointWriter(tmp, len(loaded.blocks) + 1), along)
        result = prune(loaded, ratios, method=method, calibration=calibration, nm=nm, device=device,
                       progress=progress, cancel=cancel, source=source, devices=devices)
        source.write_rest()
        loaded.model.config.save_pretrained(tmp)
        if getattr(loaded.model, "generation_config", None) is not None and loaded.model.can_generate():
            loaded.model.generation_config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report(result, tmp), indent=2, sort_keys=True, default=str))
        done.append(result)

    atomic_dir(dest, write)
    log.info("pruned %s block by block into %s", loaded.source, dest)
    return done[0]


def owl_scores(loaded: LoadedModel, calibration: object, *, m: float = OWL_M, device: str | torch.device = "auto",
               progress: Progress = None, cancel: object = None, devices: Sequence[str] | None = None
               ) -> dict[int, float]:
    """Per block, the share D_l of Wanda scores ``|W_ij| ||X_j||`` above ``m`` times the block's
    mean score, with the inputs of the dense model (the model is not modified); ``devices`` as
    in ``prune``."""
    if not m > 0:
        raise ValueError(f"m={m!r}: the outlier threshold multiple must be positive (OWL uses 5)")
    ids, _ = _calibration_ids(calibration, "wanda")
    place = placement(loaded, devices or device)
    pipeline = BlockPipeline(loaded, ids, collector=NormCollector, device=place, progress=progress, cancel=cancel,
                             label="OWL statistics", source=block_source(loaded))
    shares = pipeline.run(lambda b, stats: _outlier_share(loaded, stats, m, place[b]), forward_after=False)
    return dict(enumerate(shares))


def _outlier_share(loaded: LoadedModel, stats: Mapping[str, Collector], m: float, device: torch.device) -> float:
    """The share of one block's Wanda scores above ``m`` times their mean."""
    scores = [(loaded.weight(name).detach().to(device, torch.float32).abs()
               * stats[name].sq.sqrt().unsqueeze(0)).reshape(-1) for name in stats]
    allscores = torch.cat(scores)
    return float((allscores > m * allscores.mean()).float().mean())


def _check_ratios(loaded: LoadedModel, ratios: Mapping[str, float] | float | None,
                  nm: tuple[int, int] | None) -> dict[str, float]:
    """Every matrix's ratio (1 - N/M for all with ``nm``); raises on names or values that do not fit."""
    names = [m.name for m in loaded.matrices]
    if nm is not None:
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


def _calibration_ids(calibration: object, method: str) -> tuple[torch.Tensor, dict]:
    """Token ids ``nsamples x seqlen`` and their settings from ids or a ``Calibration``."""
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
