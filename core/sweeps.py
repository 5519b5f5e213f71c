"""Many runs from one base ``PruneSpec``: a sweep over methods x allocations x sparsities
(x epsilons) into one comparison table with its Markdown report, on any executor (this
thread, several devices, Ray). Every table carries the comparison key of its runs
(``core.registry.run_key``). Tuning the allocation is ``core.tuning`` and ``core.fasttune``.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import tempfile
from dataclasses import dataclass, replace
from typing import Mapping

import pandas as pd

from .allocation import METHODS as ALLOCATION_METHODS
from .calibration import Calibration
from .executor import Executor, Local
from .experiments import eval_run, prune_and_eval
from .markdown import to_markdown
from .models import LoadedModel
from .owlcache import owl_scores_for
from .prepare import alpha_metrics, calibration_for, load_for, on_device, worker_model
from .progress import Cancelled, Progress, report
from .pruning import METHODS as PRUNE_METHODS
from .registry import Registry, software_versions
from .runkey import missing, run_key
from .spec import PruneSpec

log = logging.getLogger(__name__)

SWEEP_COLUMNS = ["method", "allocation", "sparsity", "epsilon", "achieved", "perplexity", "prune_seconds",
                 "eval_seconds", "run_id", "key", "settings"]


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
          resume: bool = False,
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
    whichever way.

    ``resume``: a job whose identical run (same model weights, same arguments as asked,
    ``PruneSpec.run_spec``, same software versions) is done in ``registry`` takes that run
    instead of running again, so a sweep stopped by a failure or a kill computes only what is
    missing when run again."""
    jobs = sweep_jobs(base, methods=methods, allocations=allocations, sparsities=sparsities, epsilons=epsilons,
                      dense=dense)
    registry = registry or Registry()
    executor = executor or Local(base.device)
    ship_model = loaded is not None if ship_model is None else ship_model
    inputs = sweep_inputs(base, jobs, loaded=loaded, metrics=metrics, calibration=calibration, progress=progress,
                          cancel=cancel)
    runs: list[dict | None] = [None] * len(jobs)
    if resume:
        for i, run in finished_runs(registry, jobs, inputs.loaded.identity).items():
            runs[i] = run
        log.info("sweep --resume: %d of %d runs finished earlier and are reused (runs %s)",
                 sum(r is not None for r in runs), len(jobs), ", ".join(str(r["id"]) for r in runs if r) or "none")
    todo = [i for i, r in enumerate(runs) if r is None]
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
                return run_job(kind, on_device(spec, device), replace(inputs, loaded=loaded), registry, progress=inner,
                               cancel=cancel)
            finally:
                if base.streaming:
                    models.put(loaded)
        shared = None
    for k, result in executor.map(fn, [jobs[i] for i in todo], shared=shared, cancel=cancel):
        i = todo[k]
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


def finished_runs(registry: Registry, jobs: list[tuple[str, PruneSpec]], identity: str) -> dict[int, dict]:
    """``{job index: registry row}`` of the jobs whose identical run is done in ``registry``: the
    same weights (``identity``), kind and arguments as asked (``PruneSpec.run_spec``) and the
    same software versions; the newest such run."""
    versions = software_versions()
    done: dict[tuple, int] = {}
    for r in registry.query(status="done", model_identity=identity).to_dict(orient="records"):
        if isinstance(r.get("spec"), list) and r.get("versions") == versions:
            done[(r["kind"], tuple(r["spec"]))] = int(r["id"])
    keys = [(kind, tuple(spec.run_spec(kind))) for kind, spec in jobs]
    return {i: registry.get(done[key]) for i, key in enumerate(keys) if key in done}


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


def _remote_run(job: tuple[str, PruneSpec], device: str, shared: RunInputs) -> tuple[dict, pd.DataFrame]:
    """On a worker: the run in a private registry (``run_job``); returns its row (done or
    failed) and matrices. Only a failure outside the run (the model not loading) raises."""
    kind, spec = job
    spec = on_device(spec, device)
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
