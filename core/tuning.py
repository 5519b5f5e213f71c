"""Tuning AlphaPruning's allocation on held-out calibration text: every epsilon x xmin method
x metric column pruned with the real method and scored (``tune``), the power laws of every
xmin method fit to one computation of the eigenvalues (``refit``). ``core.fasttune`` scores the
same grid faster and confirms its choice with ``tune``. The evaluation text is never read.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import pandas as pd

from .analysis import Analysis, analyze, build_table
from .calibration import holdout_split
from .checks import whole
from .choices import DEFAULT_EPSILONS, DEFAULT_METRIC_COLUMNS
from .evaluation import perplexity
from .executor import Executor
from .fit import XMIN_METHODS
from .markdown import to_markdown
from .metricsfile import read_metrics
from .models import LoadedModel, MatrixInfo
from .prepare import choose_allocation, load_for, metrics_for, on_device, worker_model
from .progress import Progress, report, within
from .pruning import prune
from .runkey import RunKey, run_key
from .spec import PruneSpec
from .spectra import Spectrum

log = logging.getLogger(__name__)

TUNE_COLUMNS = ["epsilon", "xmin", "metric", "perplexity", "achieved"]


def refit(analysis: Analysis, xmin: str, *, device: str = "cpu") -> pd.DataFrame:
    """``analysis.table`` with every power law fit again by the ``xmin`` method, from the
    analysis's eigenvalues (the spectra do not depend on the fit: nothing is recomputed)."""
    if xmin == analysis.xmin:
        return analysis.table
    spectra = []
    for r in analysis.table.itertuples(index=False):
        eigs = analysis.eigs[r.name]
        reason = "" if np.isfinite(eigs).all() else str(r.status).removeprefix("no fit: ")
        spectra.append(Spectrum(MatrixInfo(r.name, int(r.block), str(r.kind), int(r.rows), int(r.cols)), eigs,
                                float(r.w_var), reason))
    return build_table(spectra, xmin=xmin, device=device)


def xmin_tables(base: PruneSpec, loaded: LoadedModel, xmins: Sequence[str] | None = None, *,
                analysis: Analysis | None = None, progress: Progress = None) -> dict[str, pd.DataFrame]:
    """The metrics table per xmin method (default all of ``XMIN_METHODS``) from one analysis
    (``analysis``, or ``analyze`` once); ``{"file": table}`` when ``base`` names a metrics file."""
    if base.metrics_file is not None:
        return {"file": metrics_for(loaded, read_metrics(base.metrics_file), base.metrics_file)}
    xmins = list(dict.fromkeys(xmins)) if xmins else list(XMIN_METHODS)
    for x in xmins:
        if x not in XMIN_METHODS:
            raise ValueError(f"xmins: {x!r} is unknown; use {', '.join(XMIN_METHODS)}")
    if analysis is None:
        analysis = analyze(loaded, xmin=xmins[0], device=base.device, progress=progress)
    return {x: refit(analysis, x, device=base.device) for x in xmins}


def grid_tables(base: PruneSpec, loaded: LoadedModel, xmins: Sequence[str] | None, metric_columns: Sequence[str],
                *, analysis: Analysis | None = None, progress: Progress = None) -> dict[str, pd.DataFrame]:
    """``xmin_tables`` with every scored column checked to be a numeric column of each table."""
    tables = xmin_tables(base, loaded, xmins, analysis=analysis, progress=progress)
    for col in metric_columns:
        for x, t in tables.items():
            if col not in t.columns or not pd.api.types.is_numeric_dtype(t[col]):
                raise ValueError(f"metric_columns: {col!r} is not a numeric column of the {x} metrics table; "
                                 "use alpha, alpha_hat, log_norm, ...")
    return tables


@dataclass
class Tuning:
    """The scores of ``tune``: ``table`` (``TUNE_COLUMNS``, one row per epsilon x xmin x metric)
    by perplexity on held-out calibration text, ``best`` its lowest row, ``key`` the comparison
    key of the held-out scoring."""

    table: pd.DataFrame
    best: dict
    method: str
    sparsity: float
    calibration: dict
    holdout_tokens: int
    key: RunKey

    def spec(self, base: PruneSpec) -> PruneSpec:
        """``base`` with the winning allocation (alpha, epsilon, metric and xmin)."""
        xmin = self.best["xmin"] if self.best["xmin"] in XMIN_METHODS else base.xmin
        return replace(base, allocation="alpha", epsilon=float(self.best["epsilon"]), metric=self.best["metric"],
                       xmin=xmin, nm=None, ratios_file=None)

    def to_dict(self) -> dict:
        return {"best": self.best, "rows": self.table.to_dict(orient="records"), "method": self.method,
                "sparsity": self.sparsity, "calibration": self.calibration, "holdout_tokens": self.holdout_tokens,
                **self.key._asdict()}

    def summary(self) -> str:
        b = self.best
        lines = [f"{self.method} at sparsity {self.sparsity:g}: best epsilon {b['epsilon']:g}, xmin {b['xmin']}, "
                 f"metric {b['metric']} (perplexity {b['perplexity']:.3f} on held-out calibration text, "
                 f"{self.holdout_tokens} tokens; never the evaluation text)", f"settings: {self.key.settings}", ""]
        return "\n".join(lines) + to_markdown(self.table)


def tune(base: PruneSpec, *, epsilons: Sequence[float] | None = None, xmins: Sequence[str] | None = None,
         metric_columns: Sequence[str] = DEFAULT_METRIC_COLUMNS, holdout: float = 0.1,
         holdout_windows: int | None = 16, loaded: LoadedModel | None = None, analysis: Analysis | None = None,
         executor: Executor | None = None, ship_model: bool | None = None, progress: Progress = None,
         cancel: object = None) -> Tuning:
    """Choose AlphaPruning's allocation for ``base`` (its method, sparsity, mapping, ...): every
    epsilon x xmin method x metric column, pruned and scored by perplexity on held-out
    calibration text (``holdout_split``; at most ``holdout_windows`` windows). The evaluation
    text is never read. Grid points with equal ratios (e.g. every epsilon 0) are pruned once.

    ``executor`` (several devices, Ray): one epsilon per slot at a time, each refitting the
    driver's one analysis (on Ray each actor loads the model once, unless ``ship_model``);
    the same table, in the same order, and the same choice as in one thread."""
    whole("holdout_windows (--holdout-windows)", holdout_windows, 1, optional=True)
    epsilons = list(epsilons) if epsilons else list(DEFAULT_EPSILONS)
    if not metric_columns:
        raise ValueError("metric_columns: give at least one column, e.g. alpha,alpha_hat")
    if not (0.0 < holdout < 0.5):
        raise ValueError(f"holdout={holdout!r}: give the held-out share of the calibration text, e.g. 0.1")
    ship_model = loaded is not None if ship_model is None else ship_model
    loaded = loaded if loaded is not None else load_for(base, progress)
    base.check_reachable(loaded.matrices)     # an allocation the model cannot have, before any work
    if executor is not None and not executor.in_thread:
        grid = dict(xmins=xmins, metric_columns=metric_columns, holdout=holdout, holdout_windows=holdout_windows)
        if analysis is None and base.metrics_file is None:
            analysis = analyze(loaded, xmin=(xmins or XMIN_METHODS)[0], device=base.device, progress=progress)
        shared = (base, grid, analysis, loaded if ship_model or not executor.remote else None)
        parts: list[Tuning | None] = [None] * len(epsilons)
        for i, result in executor.map(_tune_one, epsilons, shared=shared, cancel=cancel):
            if isinstance(result, BaseException):
                raise RuntimeError(f"epsilon {epsilons[i]:g}: {executor.failure(result)}") from result
            parts[i] = result
            report(progress, sum(p is not None for p in parts), len(parts), "epsilons")
        table = pd.concat([p.table.assign(_eps=i) for i, p in enumerate(parts)], ignore_index=True)
        table["_row"] = table.groupby("_eps").cumcount()          # one thread: xmin, metric, then epsilon
        table = table.sort_values(["_row", "_eps"], kind="stable").drop(columns=["_row", "_eps"])
        table = table.reset_index(drop=True)
        return replace(parts[0], table=table, best=table.loc[table["perplexity"].idxmin()].to_dict())
    tables = grid_tables(base, loaded, xmins, metric_columns, analysis=analysis, progress=progress)
    calib, held = holdout_split(base, loaded, holdout)
    grid, candidates = [], {}        # every grid point's ratios first: the count of distinct prunings is known
    for xmin, table in tables.items():
        for metric in metric_columns:
            for eps in epsilons:
                spec = replace(base, allocation="alpha", epsilon=eps, metric=metric, nm=None, ratios_file=None,
                               save=None)
                ratios = choose_allocation(spec, loaded, metrics=table).ratio_by_name()
                same = tuple(sorted((k, round(v, 12)) for k, v in ratios.items()))
                candidates.setdefault(same, (spec, ratios, f"epsilon {eps:g}, xmin {xmin}, {metric}"))
                grid.append((eps, xmin, metric, same))
    scores: dict[tuple, tuple[float, float]] = {}
    ppl = None
    for k, (same, (spec, ratios, what)) in enumerate(candidates.items()):
        log.info("tune: %s", what)
        step = within(progress, f"candidate {k + 1} of {len(candidates)} ({what}) · ")
        pruned = prune(loaded, ratios, method=spec.method, device=spec.device, copy=True,
                       calibration=calib if spec.needs_calibration else None, progress=step, cancel=cancel)
        ppl = perplexity(pruned.model, ids=held, seqlen=calib.seqlen, max_windows=holdout_windows,
                         device=spec.device, bos=calib.bos, progress=step, cancel=cancel)
        scores[same] = (ppl.perplexity, pruned.sparsity)
        del pruned
    rows = [{"epsilon": float(eps), "xmin": xmin, "metric": metric, "perplexity": scores[same][0],
             "achieved": scores[same][1]} for eps, xmin, metric, same in grid]
    table = pd.DataFrame(rows, columns=TUNE_COLUMNS)
    best = table.loc[table["perplexity"].idxmin()].to_dict()
    key = run_key({"kind": "prune", "model_identity": loaded.identity, "eval_dataset": f"{calib.dataset} "
                   f"(held-out {holdout:g} of calib)", "eval_seqlen": ppl.seqlen, "eval_windows": ppl.windows,
                   "eval_bos": ppl.bos, "eval_bos_prepended": ppl.bos_prepended, "calibration": calib.settings()})
    return Tuning(table, best, base.method, base.sparsity, calib.settings(), ppl.windows * ppl.seqlen, key)


def _tune_one(epsilon: float, device: str, shared: tuple) -> Tuning:
    """One epsilon of ``tune`` on a slot (the model shipped, or this worker's own)."""
    base, grid, analysis, loaded = shared
    base = on_device(base, device)
    return tune(base, epsilons=[epsilon], analysis=analysis, loaded=loaded or worker_model(base), **grid)
