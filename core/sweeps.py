"""Many runs from one base ``PruneSpec``: a sweep over methods x allocations x sparsities
(x epsilons) into one comparison table with its Markdown report, and ``tune``: AlphaPruning's
allocation (epsilon x xmin method x metric) chosen on held-out calibration text.

Every table carries the comparison key of its runs (``core.registry.run_key``). ``tune``
fits the power laws of every xmin method to one computation of the eigenvalues (``refit``).
"""
from __future__ import annotations

import logging
import math
import os
import queue
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .allocation import METHODS as ALLOCATION_METHODS
from .analysis import Analysis, analyze, build_table
from .executor import Executor, Local
from .calibration import Calibration, bos_plan, cap_seqlen, sample_windows, tokenize
from .evaluation import perplexity
from .experiments import (alpha_metrics, calibration_for, choose_allocation, eval_run, load_for, metrics_for,
                          prune_and_eval, read_metrics)
from .spec import PruneSpec
from .checks import whole
from .choices import DEFAULT_EPSILONS, DEFAULT_METRIC_COLUMNS
from .fit import XMIN_METHODS
from .models import LoadedModel, MatrixInfo
from .progress import Cancelled, Progress, report
from .pruning import METHODS as PRUNE_METHODS
from .owlcache import owl_scores_for
from .pruning import prune
from .registry import Registry
from .runkey import RunKey, missing, run_key
from .spectra import Spectrum
from .texts import load_text

log = logging.getLogger(__name__)

SWEEP_COLUMNS = ["method", "allocation", "sparsity", "epsilon", "achieved", "perplexity", "prune_seconds",
                 "eval_seconds", "run_id", "key", "settings"]
TUNE_COLUMNS = ["epsilon", "xmin", "metric", "perplexity", "achieved"]


@dataclass
class RunInputs:
    """What every run of a sweep shares, computed once: the model (``None``: each worker loads
    the spec's model itself, once), the calibration, the OWL scores and the metrics table
    AlphaPruning scores."""

    loaded: LoadedModel | None
    calibration: object = None
    owl: dict | None = None
    metrics: pd.DataFrame | None = None


def sweep(base: PruneSpec, *, methods: list[str], allocations: list[str], sparsities: list[float],
          epsilons: list[float] | Mapping[str, list[float]] | None = None, dense: bool = True,
          loaded: LoadedModel | None = None, registry: Registry | None = None, metrics: pd.DataFrame | None = None,
          calibration: object = None, executor: Executor | None = None, ship_model: bool | None = None,
          progress: Progress = None, cancel: object = None) -> pd.DataFrame:
    """Every method x allocation x sparsity (x epsilon for ``alpha``), pruned from the same dense
    model, evaluated, recorded; returns one comparison table (``SWEEP_COLUMNS``), dense first.

    ``base`` gives the model, calibration, evaluation, device and the allocation settings
    (metric, mapping, r_max, ...); each run replaces its method, allocation, sparsity and
    epsilon. ``epsilons``: one list for every method, or ``{method: list}`` (each method with
    the epsilon tuned for it; a method left out gets the default epsilon). ``loaded``,
    ``metrics`` and ``calibration`` are computed from ``base`` when not given. A failed run is
    recorded and the sweep goes on (its row has no perplexity); when every run failed,
    ``ValueError`` says so (``sweep_table``).

    ``executor`` (``core.executor``; default ``base.device`` in this thread) runs the runs: on
    several devices one run per device at a time, on Ray one actor per slot that loads the
    spec's model once (or streams it, ``base.streaming``) and runs its jobs in turn, each in a
    private registry copied into ``registry`` as it ends; ``ship_model`` (default: when
    ``loaded`` was given) sends the driver's model instead. The same jobs, records and table
    whichever way."""
    jobs = sweep_jobs(base, methods=methods, allocations=allocations, sparsities=sparsities, epsilons=epsilons,
                      dense=dense)
    registry = registry or Registry()
    executor = executor or Local(base.device)
    ship_model = loaded is not None if ship_model is None else ship_model
    inputs = sweep_inputs(base, jobs, loaded=loaded, metrics=metrics, calibration=calibration, progress=progress,
                          cancel=cancel)
    runs: list[dict | None] = [None] * len(jobs)
    inner = progress if executor.in_thread else None
    if executor.remote:
        fn, shared = _remote_run, (inputs if ship_model else replace(inputs, loaded=None))
    else:
        # a streamed run fills its skeleton block by block: one skeleton per device, loaded here first
        # (loading one while another thread runs would put that thread's new tensors on the meta device)
        models: queue.Queue = queue.Queue()
        for k in range(len(executor.slots) if base.streaming else 1):
            models.put(inputs.loaded if k == 0 else load_for(base))

        def fn(job: tuple[str, PruneSpec], device: str) -> dict:
            kind, spec = job
            log.info("sweep: %s %s %s S=%g eps=%s", kind, spec.method, spec.allocation, spec.sparsity, spec.epsilon)
            loaded = models.get() if base.streaming else inputs.loaded
            try:
                return run_job(kind, _on(spec, device), replace(inputs, loaded=loaded), registry, progress=inner,
                               cancel=cancel)
            finally:
                if base.streaming:
                    models.put(loaded)
        shared = None
    for i, result in executor.map(fn, jobs, shared=shared, cancel=cancel):
        kind, spec = jobs[i]
        if isinstance(result, BaseException):     # failed outside its run (on Ray: its worker's registry is gone)
            log.info("sweep run %s %s %s failed: %s", kind, spec.method, spec.allocation, result)
            run_id = record_failure(registry, kind, spec, executor.failure(result), inputs.loaded)
        elif executor.remote:
            run_id = copy_run(registry, *result)
        else:
            run_id = int(result["id"])
        runs[i] = registry.get(run_id)
        if not executor.in_thread:
            report(progress, sum(r is not None for r in runs), len(jobs), "sweep runs")
    return sweep_table(jobs, runs)


def _on(spec: PruneSpec, device: str) -> PruneSpec:
    """``spec`` on its slot's device (resolved once by the executor)."""
    return spec if spec.device == device else replace(spec, device=device)


# --- one sweep's jobs, runs and table ------------------------------------------------------------

#: dtype of each column of a sweep table, whichever route computed it
SWEEP_DTYPES = {"method": "str", "allocation": "str", "sparsity": "float64", "epsilon": "float64",
                "achieved": "float64", "perplexity": "float64", "prune_seconds": "float64",
                "eval_seconds": "float64", "run_id": "int64", "key": "str", "settings": "str"}
FAILED_HINT = "spectrascope runs --status failed"
#: Registry columns a worker's run row carries over into the driver's registry.
_NOT_COPIED = ("id", "kind", "status", "error", "started_at", "finished_at")


def sweep_jobs(base: PruneSpec, *, methods: list[str], allocations: list[str], sparsities: list[float],
               epsilons: list[float] | Mapping[str, list[float]] | None = None,
               dense: bool = True) -> list[tuple[str, PruneSpec]]:
    """``(kind, spec)`` of every run of a sweep in the order of its table: ``eval`` of the
    dense model first (when ``dense``), then one ``prune`` per spec of ``sweep_specs``."""
    specs = sweep_specs(base, methods=methods, allocations=allocations, sparsities=sparsities, epsilons=epsilons)
    return ([("eval", base)] if dense else []) + [("prune", s) for s in specs]


def sweep_inputs(base: PruneSpec, jobs: list[tuple[str, PruneSpec]], *, loaded: LoadedModel | None = None,
                 metrics: pd.DataFrame | None = None, calibration: object = None, progress: Progress = None,
                 cancel: object = None) -> RunInputs:
    """What every run of a sweep shares (``RunInputs``), computed once."""
    loaded = loaded if loaded is not None else load_for(base, progress)   # once every spec is valid
    specs = [s for kind, s in jobs if kind == "prune"]
    allocations = {s.allocation for s in specs}
    if calibration is None and any(s.needs_calibration for s in specs):
        calibration = calibration_for(base, loaded)
    owl = owl_scores_for(loaded, calibration, device=base.device, progress=progress, cancel=cancel) \
        if "owl" in allocations else None
    if "alpha" in allocations:
        metrics = alpha_metrics(base, loaded, metrics, progress)
    return RunInputs(loaded, calibration, owl, metrics)


# --- on a Ray worker: the model held once per worker process --------------------------------

_WORKER_MODEL: dict[tuple, LoadedModel] = {}


def worker_model(spec: PruneSpec) -> LoadedModel:
    """The spec's model in this worker process (a Ray actor), loaded once (a skeleton when
    streaming) and kept for its next runs; another model replaces it."""
    key = (spec.model, spec.dtype, spec.trust_remote_code, spec.streaming)
    if key not in _WORKER_MODEL:
        _WORKER_MODEL.clear()
        _WORKER_MODEL[key] = load_for(spec)
    return _WORKER_MODEL[key]


def _remote_run(job: tuple[str, PruneSpec], device: str, shared: RunInputs) -> tuple[dict, pd.DataFrame]:
    """On a worker: the run in a private registry (``run_job``); returns its row (done or
    failed) and matrices. Only a failure outside the run (the model not loading) raises."""
    kind, spec = job
    spec = _on(spec, device)
    inputs = shared if shared.loaded is not None else replace(shared, loaded=worker_model(spec))
    with tempfile.TemporaryDirectory(prefix="spectrascope-run-") as tmp:
        registry = Registry(os.path.join(tmp, "runs.sqlite"))
        run = run_job(kind, spec, inputs, registry)
        return run, registry.matrices(int(run["id"]))


def _plain(value: object) -> object:
    """A registry value as SQLite takes it (numpy scalars -> Python, NaN -> None)."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def copy_run(registry: Registry, row: Mapping, matrices: pd.DataFrame) -> int:
    """Record a run of another registry (a worker's) in ``registry``; returns its new id."""
    fields = {k: _plain(v) for k, v in row.items() if k not in _NOT_COPIED}
    run_id = registry.start(str(row["kind"]), **fields)
    if len(matrices):
        registry.add_matrices(run_id, matrices)
    registry.finish(run_id, str(row["status"]), error=_plain(row.get("error")))
    registry.update(run_id, started_at=_plain(row["started_at"]), finished_at=_plain(row["finished_at"]))
    return run_id


class _Recording(Registry):
    """``registry`` as one run sees it: the same database, remembering the id of the run it
    starts (so a run's failure is found where the run recorded it)."""

    def __init__(self, registry: Registry) -> None:   # noqa: D107 - shares the registry's state
        self.__dict__.update(vars(registry))
        self.run_id: int | None = None

    def start(self, kind: str, **fields: object) -> int:
        self.run_id = super().start(kind, **fields)
        return self.run_id


def run_job(kind: str, spec: PruneSpec, inputs: RunInputs, registry: Registry, *, progress: Progress = None,
            cancel: object = None) -> dict:
    """One sweep run (``eval`` of the dense model or ``prune``) recorded in ``registry``;
    returns its registry row: done, or failed with its error (a failure raised before the run
    recorded itself is recorded here). Cancelling raises."""
    recording = _Recording(registry)
    try:
        if kind == "eval":
            run_id = eval_run(spec, inputs.loaded, registry=recording, progress=progress, cancel=cancel)[0]
        else:
            run_id = prune_and_eval(spec, inputs.loaded, registry=recording, metrics=inputs.metrics,
                                    owl_scores=inputs.owl, calibration=inputs.calibration, progress=progress,
                                    cancel=cancel).run_id
    except (Cancelled, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a failed run is recorded with its error; the sweep goes on
        log.info("sweep run %s %s %s failed: %s", kind, spec.method, spec.allocation, exc)
        run_id = recording.run_id
        if run_id is None:
            run_id = record_failure(registry, kind, spec, f"{type(exc).__name__}: {exc}", inputs.loaded)
    return registry.get(run_id)


def record_failure(registry: Registry, kind: str, spec: PruneSpec, error: str, loaded: LoadedModel | None) -> int:
    """Record a run that failed before it recorded itself (or whose worker's record is lost)."""
    prune = kind == "prune"
    run_id = registry.start(kind, model=loaded.source if loaded is not None else spec.model,
                            model_identity=loaded.identity if loaded is not None else None,
                            method=spec.method if prune else "dense", allocation=spec.allocation if prune else None,
                            sparsity=spec.sparsity if prune else None,
                            epsilon=spec.epsilon if prune and spec.epsilon != "auto" else None,
                            device=spec.device)
    registry.finish(run_id, "failed", error=error)
    return run_id


def _number(value: object) -> float:
    return float("nan") if missing(value) else float(value)


def sweep_row(kind: str, spec: PruneSpec, run: Mapping) -> dict:
    """The table row of one sweep run, from its registry row (done or failed) and its spec:
    the one row builder of every route (one process, several devices, Ray)."""
    key = run_key(run)
    dense = kind == "eval"
    return {"method": "dense" if dense else spec.method, "allocation": "-" if dense else spec.allocation,
            "sparsity": 0.0 if dense else float(spec.sparsity),
            "epsilon": float("nan") if dense else _number(run.get("epsilon")),
            "achieved": 0.0 if dense else _number(run.get("achieved_sparsity")),
            "perplexity": _number(run.get("perplexity")),
            "prune_seconds": 0.0 if dense else _number(run.get("prune_seconds")),
            "eval_seconds": _number(run.get("eval_seconds")), "run_id": int(run["id"]),
            "key": key.key, "settings": key.settings}


def sweep_table(jobs: list[tuple[str, PruneSpec]], runs: list[Mapping]) -> pd.DataFrame:
    """The table of a sweep (``SWEEP_COLUMNS`` with ``SWEEP_DTYPES``) from its jobs and their
    registry rows, in job order. Failed runs are logged in one warning; when every run failed,
    ``ValueError`` names them and where their errors are recorded."""
    failed = [r for r in runs if r.get("status") != "done"]
    ids = ", ".join(str(int(r["id"])) for r in failed)
    if runs and len(failed) == len(runs):
        first = " ".join(str(failed[0].get("error") or "").split())[:300]
        raise ValueError(f"every run of the sweep failed (runs {ids}); nothing written. The errors are recorded: "
                         f"{FAILED_HINT} (the first: {first})")
    if failed:
        log.warning("%d of %d sweep runs failed (runs %s): their rows have no perplexity; errors: %s",
                    len(failed), len(runs), ids, FAILED_HINT)
    rows = [sweep_row(kind, spec, run) for (kind, spec), run in zip(jobs, runs)]
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS).astype(SWEEP_DTYPES)


def _epsilons_of(epsilons: list[float] | Mapping[str, list[float]] | None, method: str) -> list[float | None]:
    chosen = epsilons.get(method) if isinstance(epsilons, Mapping) else epsilons
    return list(chosen) if chosen else [None]


# --- Markdown ------------------------------------------------------------------------------

def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (numbers rounded for reading)."""
    def cell(v: object) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def pivot(table: pd.DataFrame) -> pd.DataFrame:
    """Perplexity with one row per method and allocation (epsilon in the label) and one column
    per sparsity; the dense perplexity as its own row."""
    t = table.copy()
    t["setting"] = t.apply(lambda r: f"{r.method} {r.allocation}" + (f" (eps {r.epsilon:g})" if pd.notna(
        r.epsilon) else "") if r.method != "dense" else "dense", axis=1)
    p = t.pivot_table(index="setting", columns="sparsity", values="perplexity", sort=False)
    p.columns = [f"{c:.0%}" for c in p.columns]
    return p.reset_index()


def sweep_report(table: pd.DataFrame, base: PruneSpec, *, model: str, calibration: Calibration | None,
                 seconds: float) -> str:
    """The Markdown report of a sweep: its settings and comparison keys, the perplexity pivot
    and every run (perplexities compare only within one key)."""
    e = base.evaluation
    calib_text = (f"calibration {calibration.nsamples} x {calibration.seqlen} tokens of {calibration.dataset} "
                  f"(seed {calibration.seed}, BOS {calibration.bos}{' prepended' if calibration.bos_prepended else ''})"
                  if calibration is not None else "no calibration")
    header = (f"Model {model}; evaluation {e.dataset}, windows of {e.seqlen} tokens"
              + (f" (first {e.max_windows})" if e.max_windows else "") + f", BOS {e.bos}; {calib_text}; "
              f"device {base.device}; total {seconds / 60:.1f} min.")
    keys = table.drop_duplicates("key")
    lines = [f"- {r.settings} (key `{r.key}`)" for r in keys.itertuples()]
    runs = to_markdown(table.drop(columns=["key"]))
    return (f"{header}\n\nComparison keys (compare perplexities within one key):\n\n" + "\n".join(lines)
            + f"\n\nPerplexity:\n\n{to_markdown(pivot(table))}\n\nAll runs:\n\n{runs}\n")


# --- tuning the allocation ----------------------------------------------------------------

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


def holdout_split(base: PruneSpec, loaded: LoadedModel, holdout: float) -> tuple[Calibration, torch.Tensor]:
    """The calibration text of ``base`` tokenized (by its BOS mode) and cut in two: calibration
    windows drawn from the first ``1 - holdout`` of the tokens, and the held-out rest."""
    c = base.calibration
    if c.dataset == base.evaluation.dataset and Path(c.dataset).expanduser().is_file():
        raise ValueError(f"calibration.dataset={c.dataset!r}: a text file is used whole for calibration and "
                         "evaluation, so held-out text would be evaluation text; calibrate on another text")
    plan = bos_plan(loaded.tokenizer, c.bos)
    seqlen = cap_seqlen(c.seqlen, loaded.model)
    ids = tokenize(loaded.tokenizer, load_text(c.dataset, split="calib"), defaults=plan.defaults)
    cut = int(ids.numel() * (1 - holdout))
    windows = sample_windows(ids[:cut], nsamples=c.nsamples, seqlen=seqlen, seed=c.seed, bos_id=plan.token_id)
    return Calibration(windows, c.dataset, c.seed, cut, c.bos, plan.prepended), ids[cut:]


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
    tables = xmin_tables(base, loaded, xmins, analysis=analysis, progress=progress)
    for col in metric_columns:
        for x, t in tables.items():
            if col not in t.columns or not pd.api.types.is_numeric_dtype(t[col]):
                raise ValueError(f"metric_columns: {col!r} is not a numeric column of the {x} metrics table; "
                                 "use alpha, alpha_hat, log_norm, ...")
    calib, held = holdout_split(base, loaded, holdout)
    scores: dict[tuple, tuple[float, float]] = {}
    rows, ppl = [], None
    for xmin, table in tables.items():
        for metric in metric_columns:
            for eps in epsilons:
                spec = replace(base, allocation="alpha", epsilon=eps, metric=metric, nm=None, ratios_file=None,
                               save=None)
                ratios = choose_allocation(spec, loaded, metrics=table).ratio_by_name()
                same = tuple(sorted((k, round(v, 12)) for k, v in ratios.items()))
                if same not in scores:
                    log.info("tune: eps %g xmin %s metric %s", eps, xmin, metric)
                    pruned = prune(loaded, ratios, method=spec.method, device=spec.device, copy=True,
                                   calibration=calib if spec.needs_calibration else None, progress=progress,
                                   cancel=cancel)
                    ppl = perplexity(pruned.model, ids=held, seqlen=calib.seqlen, max_windows=holdout_windows,
                                     device=spec.device, bos=calib.bos, progress=progress, cancel=cancel)
                    scores[same] = (ppl.perplexity, pruned.sparsity)
                    del pruned
                rows.append({"epsilon": float(eps), "xmin": xmin, "metric": metric, "perplexity": scores[same][0],
                             "achieved": scores[same][1]})
    table = pd.DataFrame(rows, columns=TUNE_COLUMNS)
    best = table.loc[table["perplexity"].idxmin()].to_dict()
    key = run_key({"kind": "prune", "model_identity": loaded.identity, "eval_dataset": f"{calib.dataset} "
                   f"(held-out {holdout:g} of calib)", "eval_seqlen": ppl.seqlen, "eval_windows": ppl.windows,
                   "eval_bos": ppl.bos, "eval_bos_prepended": ppl.bos_prepended, "calibration": calib.settings()})
    return Tuning(table, best, base.method, base.sparsity, calib.settings(), ppl.windows * ppl.seqlen, key)


def _tune_one(epsilon: float, device: str, shared: tuple) -> Tuning:
    """One epsilon of ``tune`` on a slot (the model shipped, or this worker's own)."""
    base, grid, analysis, loaded = shared
    base = _on(base, device)
    return tune(base, epsilons=[epsilon], analysis=analysis, loaded=loaded or worker_model(base), **grid)


# --- the runs of a sweep ------------------------------------------------------------------------

def sweep_specs(base: PruneSpec, *, methods: list[str], allocations: list[str], sparsities: list[float],
                epsilons: list[float] | Mapping[str, list[float]] | None = None) -> list[PruneSpec]:
    """The prune specs of a sweep, in the order of its table (see ``sweep``)."""
    for m in methods:
        if m not in PRUNE_METHODS:
            raise ValueError(f"methods: {m!r} is unknown; use {', '.join(PRUNE_METHODS)}")
    for a in allocations:
        if a not in ALLOCATION_METHODS:
            raise ValueError(f"allocations: {a!r} is unknown; use {', '.join(ALLOCATION_METHODS)}")
    return [replace(base, method=method, allocation=allocation, sparsity=float(s), epsilon=eps, nm=None,
                    ratios_file=None, save=None, evaluation=replace(base.evaluation, evaluate=True))
            for method in methods for allocation in allocations for s in sparsities
            for eps in (_epsilons_of(epsilons, method) if allocation == "alpha" else [None])]
