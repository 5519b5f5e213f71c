"""Fast tuning of AlphaPruning's allocation (``tune --fast`` and ``--epsilon auto``).

``core.tuning.tune`` prunes the model block by block with the real method for every candidate
(epsilon x xmin method x metric column) and scores each on held-out calibration text. Here:

1. one pass of the DENSE model over the calibration windows collects Wanda's statistics of
   every matrix's inputs (magnitude needs none);
2. every candidate's masks are the method's rule on the dense weights with those statistics
   (SparseGPT's candidates are ranked by Wanda's masks: its weight updates need the
   block-sequential pass), written into the model, scored by perplexity on the held-out
   windows, and the dense weights restored. Magnitude's masks are exactly the full protocol's;
3. the best candidate and uniform (epsilon 0) are confirmed with the full protocol
   (``tune``'s own scoring) and the better of the two is chosen: uniform when no epsilon > 0
   beats it, said in one line.

The evaluation text is never read: held-out windows come from the calibration text
(``core.calibration.holdout_split``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from .analysis import Analysis
from .calibration import Calibration
from .checks import whole
from .choices import DEFAULT_EPSILONS, DEFAULT_METRIC_COLUMNS
from .config import atomic_file, home, resolve_device
from .evaluation import perplexity
from .prepare import choose_allocation, load_for
from .models import LoadedModel
from .progress import Progress, check_cancel, report, within
from .pruning.engine import BlockPipeline
from .pruning.methods import NormCollector, get_method
from .pruning.streaming import block_source
from .spec import PruneSpec
from .calibration import holdout_split
from .tuning import TUNE_COLUMNS, Tuning, grid_tables, tune

log = logging.getLogger(__name__)

#: held-out windows each candidate is scored on (the confirmation uses ``tune``'s default)
FAST_WINDOWS = 8


@dataclass
class FastTuning(Tuning):
    """``Tuning`` whose ``table`` scores every candidate with dense-statistics masks (its
    ``perplexity`` column) and the confirmed ones with the full protocol (``confirmed``);
    ``best`` is the choice, ``reason`` says why in one line."""

    reason: str = ""
    seconds: float = 0.0
    proxy: str = ""
    confirmed: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "reason": self.reason, "seconds": self.seconds, "proxy": self.proxy,
                "confirmed": self.confirmed}

    def summary(self) -> str:
        return f"{self.reason}\n{super().summary()}"


def dense_statistics(loaded: LoadedModel, calibration: Calibration, device: torch.device,
                     progress: Progress = None, cancel: object = None) -> dict[str, NormCollector]:
    """Wanda's statistics (``sum x_j^2``) of every matrix's inputs in the dense model, one pass."""
    pipeline = BlockPipeline(loaded, calibration.input_ids, collector=NormCollector, device=device,
                             progress=progress, cancel=cancel, label="dense statistics", source=block_source(loaded))
    stats: dict[str, NormCollector] = {}
    for block in pipeline.run(lambda b, s: dict(s), forward_after=False):
        stats.update(block)
    return stats


class _Masks:
    """The dense weights of every matrix, kept to restore the model after each candidate."""

    def __init__(self, loaded: LoadedModel, stats: dict[str, NormCollector] | None) -> None:
        self.loaded, self.stats = loaded, stats
        self.rule = get_method("wanda" if stats is not None else "magnitude").rule
        self.dense = {m.name: loaded.weight(m.name).detach().clone() for m in loaded.matrices}

    @torch.no_grad()
    def apply(self, ratios: dict[str, float]) -> None:
        for name, dense in self.dense.items():
            W = dense.to(torch.float32, copy=True)          # the rule works in place
            if ratios[name] > 0:
                self.rule([W], self.stats.get(name) if self.stats else None, [ratios[name]], None)
            self.loaded.weight(name).copy_(W)

    @torch.no_grad()
    def restore(self) -> None:
        for name, dense in self.dense.items():
            self.loaded.weight(name).copy_(dense)


def fast_tune(base: PruneSpec, *, epsilons: Sequence[float] | None = None, xmins: Sequence[str] | None = None,
              metric_columns: Sequence[str] = DEFAULT_METRIC_COLUMNS, holdout: float = 0.1,
              holdout_windows: int | None = FAST_WINDOWS, confirm_windows: int | None = 16,
              loaded: LoadedModel | None = None, analysis: Analysis | None = None, progress: Progress = None,
              cancel: object = None) -> FastTuning:
    """Choose AlphaPruning's allocation for ``base`` quickly (see the module): every candidate
    scored with masks from one statistics pass, the best and uniform confirmed with the full
    protocol, uniform chosen unless an epsilon > 0 beats it. The same grid as ``tune``."""
    whole("holdout_windows (--holdout-windows)", holdout_windows, 1, optional=True)
    if not (0.0 < holdout < 0.5):
        raise ValueError(f"holdout={holdout!r}: give the held-out share of the calibration text, e.g. 0.1")
    start = time.perf_counter()
    epsilons = sorted(set(float(e) for e in (epsilons or DEFAULT_EPSILONS)) | {0.0})
    loaded = loaded if loaded is not None else load_for(base, progress)
    base.check_reachable(loaded.matrices)     # an allocation the model cannot have, before any work
    tables = grid_tables(base, loaded, xmins, metric_columns, analysis=analysis, progress=progress)
    calib, held = holdout_split(base, loaded, holdout)
    device = resolve_device(base.device)
    stats = dense_statistics(loaded, calib, device, progress, cancel) if base.needs_calibration else None
    candidates: dict[tuple, dict[str, float]] = {}
    keys = []
    for xmin, table in tables.items():
        for metric in metric_columns:
            for eps in epsilons:
                spec = replace(base, allocation="alpha", epsilon=eps, metric=metric, nm=None, ratios_file=None)
                ratios = choose_allocation(spec, loaded, metrics=table).ratio_by_name()
                same = tuple(sorted((k, round(v, 12)) for k, v in ratios.items()))
                candidates.setdefault(same, ratios)
                keys.append((eps, xmin, metric, same))
    masks = _Masks(loaded, stats)
    scores: dict[tuple, float] = {}
    try:
        for k, (same, ratios) in enumerate(candidates.items()):
            check_cancel(cancel, f"at candidate {k + 1}")
            masks.apply(ratios)
            ppl = perplexity(loaded, ids=held, seqlen=calib.seqlen, max_windows=holdout_windows, device=device,
                             bos=calib.bos)
            scores[same] = ppl.perplexity
            report(progress, k + 1, len(candidates), f"fast tuning: candidate {k + 1}/{len(candidates)}")
    finally:
        masks.restore()                  # perplexity() moves the model back itself
    rows = [{"epsilon": e, "xmin": x, "metric": m, "perplexity": scores[s], "achieved": float("nan")}
            for e, x, m, s in keys]
    table = pd.DataFrame(rows, columns=TUNE_COLUMNS)
    lead = table.loc[table["perplexity"].idxmin()].to_dict()
    check = tune(base, epsilons=sorted({0.0, float(lead["epsilon"])}), xmins=[lead["xmin"]] if base.metrics_file
                 is None else None, metric_columns=[lead["metric"]], holdout=holdout, holdout_windows=confirm_windows,
                 loaded=loaded, analysis=analysis, progress=within(progress, "confirming against uniform: "),
                 cancel=cancel)
    full = {float(r["epsilon"]): (float(r["perplexity"]), float(r["achieved"])) for r in check.table.to_dict("records")}
    table["confirmed"] = [full[e][0] if x == lead["xmin"] and m == lead["metric"] and e in full else float("nan")
                          for e, x, m in zip(table["epsilon"], table["xmin"], table["metric"])]
    uniform, winner = full[0.0], full[float(lead["epsilon"])]
    if lead["epsilon"] > 0 and winner[0] < uniform[0]:
        best = {**lead, "perplexity": winner[0], "achieved": winner[1]}
        reason = (f"epsilon {lead['epsilon']:g} (xmin {lead['xmin']}, {lead['metric']}) beats uniform on this model "
                  f"at S={base.sparsity:g}: held-out perplexity {winner[0]:.3f} vs {uniform[0]:.3f}")
    else:
        best = {**lead, "epsilon": 0.0, "perplexity": uniform[0], "achieved": uniform[1]}
        why = ("no epsilon > 0 scored better" if lead["epsilon"] == 0 else
               f"the best, epsilon {lead['epsilon']:g}, gave held-out perplexity {winner[0]:.3f} vs {uniform[0]:.3f}")
        reason = f"uniform is best on this model at S={base.sparsity:g}: epsilon 0 ({why})"
    log.info(reason)
    proxy = {"magnitude": "exact (magnitude masks need no data)",
             "wanda": "Wanda masks from the dense model's statistics",
             "sparsegpt": "Wanda masks from the dense model's statistics (SparseGPT's updates need the full pass)"
             }[base.method]
    return FastTuning(table, best, base.method, base.sparsity, check.calibration, check.holdout_tokens, check.key,
                      reason=reason, seconds=time.perf_counter() - start, proxy=proxy,
                      confirmed={"epsilon": float(lead["epsilon"]), "xmin": lead["xmin"], "metric": lead["metric"],
                                 "perplexity": winner[0], "uniform": uniform[0]})


# --- --epsilon auto ------------------------------------------------------------------------

#: the grid ``--epsilon auto`` tunes: the default epsilons, the fits of xmin peak and full
AUTO_XMINS = ("peak", "full")


def _file_stamp(path: Path | None) -> list:
    """A file's path, size and modification time (a changed metrics file is tuned again)."""
    if path is None:
        return []
    st = Path(path).stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _auto_key(spec: PruneSpec, loaded: LoadedModel) -> str:
    from .analysis import ENGINE_VERSION

    what = {"model": loaded.identity, "method": spec.method, "sparsity": spec.sparsity, "mapping": spec.mapping,
            "metric": spec.metric, "r_max": spec.r_max, "dense_kinds": list(spec.dense_kinds or ()),
            "reverse": spec.reverse, "metrics_file": _file_stamp(spec.metrics_file),
            "calibration": spec.calibration.__dict__, "grid": [list(DEFAULT_EPSILONS), list(AUTO_XMINS)],
            "windows": [FAST_WINDOWS, 16], "engine": ENGINE_VERSION}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def auto_epsilon(spec: PruneSpec, loaded: LoadedModel, *, progress: Progress = None,
                 cancel: object = None) -> tuple[PruneSpec, dict]:
    """``spec`` (``allocation="alpha"``, ``epsilon="auto"``) with the epsilon, xmin and metric
    that fast tuning chooses on held-out calibration text, and the record of that choice
    (``reason``, the choice, the confirmed perplexities, the grid's settings). The choice is
    kept under ``$SPECTRASCOPE_HOME/tunings`` for the same model, method, sparsity, allocation
    settings and calibration, so a second run does not tune again."""
    if loaded.tokenizer is None:
        raise ValueError(f"epsilon='auto': tuning scores held-out calibration text, and {loaded.source} has no "
                         "tokenizer; give a number (--epsilon 0.3 is the paper's)")
    key = _auto_key(spec, loaded)
    path = home() / "tunings" / f"{key}.json"
    record = None
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            float(record["epsilon"]), str(record["xmin"]), str(record["metric"]), str(record["reason"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring the damaged tuning record %s; tuning again", path)
            record = None
    if record is None:
        tuned = fast_tune(spec, xmins=AUTO_XMINS if spec.metrics_file is None else None,
                          metric_columns=[spec.metric], loaded=loaded, progress=progress, cancel=cancel)
        record = {"epsilon": float(tuned.best["epsilon"]), "xmin": str(tuned.best["xmin"]),
                  "metric": str(tuned.best["metric"]), "reason": tuned.reason, "confirmed": tuned.confirmed,
                  "seconds": round(tuned.seconds, 1), "settings": tuned.key.settings, "proxy": tuned.proxy}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_file(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)), overwrite=True)
        except OSError as exc:
            log.warning("could not keep the tuning in %s: %s", path, exc)
    else:
        log.info("epsilon auto: the tuning of an earlier run (%s)", path)
    xmin = record["xmin"] if record["xmin"] in AUTO_XMINS else spec.xmin
    return replace(spec, epsilon=record["epsilon"], xmin=xmin, metric=record["metric"]), {**record, "cached": path.name}
