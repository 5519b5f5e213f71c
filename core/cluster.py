"""Parallel analyses, sweeps and epsilon tuning: spectra, sweep runs and epsilons as Ray tasks,
or sweep runs one per local device; every Ray import of Spectrascope stays in this module.

Ray is the optional extra ``spectrascope[cluster]``. ``address=True`` (or ``"local"``)
starts a local Ray instance, any other string joins that cluster. Spectra tasks read their
matrices from the checkpoint path when the workers see it (shared storage), otherwise the
driver puts them in Ray's object store. Sweep runs are recorded by the worker in a private
registry and copied into the driver's registry as each run finishes (a run that fails is recorded
with its error, as in one process); a task that fails outside its run (the model does not load)
or is lost is retried once, then recorded as failed with its error. Every route builds its table
with ``core.sweeps.sweep_table``. Cancelling the driver cancels the tasks.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import replace
from typing import Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch

from .analysis import Analysis, analyze
from .checkpoints import open_checkpoint
from .devices import map_on_devices, parse_devices, plan_devices
from .fit import XMIN_METHODS
from .experiments import load_for
from .spec import PruneSpec
from .models import LoadedModel, MatrixInfo, Source, iter_weights, load_model
from .progress import Cancelled, Progress, is_cancelled, report
from .registry import Registry
from .spectra import Spectrum, compute_spectra
from .sweeps import (DEFAULT_EPSILONS, DEFAULT_METRIC_COLUMNS, Tuning, record_failure, run_job, sweep_inputs, sweep_jobs,
                     sweep_table, tune)

log = logging.getLogger(__name__)

#: A Ray task is tried this many times (a failed or lost task is retried once).
ATTEMPTS = 2
#: Registry columns a worker's run row carries over into the driver's registry.
_NOT_COPIED = ("id", "kind", "status", "error", "started_at", "finished_at")


# --- connecting ------------------------------------------------------------------------------

def ray_module():
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'spectrascope[cluster]' (or pip install ray)") from None
    return ray


def connect(address: str | bool | None = True, *, num_cpus: int | None = None):
    """Start a local Ray instance (``True``, ``"local"``) or join the cluster at ``address``;
    an already connected driver is reused. Returns the ``ray`` module."""
    ray = ray_module()
    if not ray.is_initialized():
        local = address in (True, None, "", "local")
        ray.init(address=None if local else str(address), num_cpus=num_cpus if local else None,
                 include_dashboard=False, log_to_driver=False)
        log.info("Ray: %s, resources %s", "local instance" if local else f"joined {address}",
                 ray.cluster_resources())
    return ray


def _gpus(ray) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def _gather(ray, refs: list, *, cancel: object = None) -> Iterator[tuple[int, object]]:
    """``(index, result)`` of each task as it finishes (``result`` is the exception when the
    task failed after its retries). A cancel flag or Ctrl-C cancels every pending task."""
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    try:
        while pending:
            if is_cancelled(cancel):
                raise Cancelled("cancelled: the driver stopped the Ray tasks")
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in ready:
                try:
                    yield index[ref], ray.get(ref)
                except ray.exceptions.RayError as exc:
                    yield index[ref], _cause(exc)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _cause(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''} (after {ATTEMPTS} attempts)"


# --- spectra ---------------------------------------------------------------------------------

def _spectra_task(infos: list[MatrixInfo], where: str | None, tensors: list | None, device: str) -> list[Spectrum]:
    """On a worker: the spectra of ``infos``, read from the checkpoint ``where`` or given."""
    if where is not None:
        ckpt = open_checkpoint(where)
        items = [(info, ckpt.read(info.name)) for info in infos]
    else:
        items = list(zip(infos, tensors))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return compute_spectra(items, total=len(items), device=device, workers=1 if device == "cpu" else None)


def _probe(path: str) -> int:
    try:
        return open_checkpoint(path).nbytes
    except (OSError, ValueError):
        return -1


def workers_see(ray, path: str) -> bool:
    """Whether a Ray worker reads the same checkpoint at ``path`` (same files, same sizes)."""
    try:
        mine = open_checkpoint(path).nbytes
    except (OSError, ValueError):
        return False
    return ray.get(ray.remote(num_cpus=0)(_probe).remote(path)) == mine


def spectra_on_ray(source: Source | LoadedModel, *, address: str | bool = True, device: str = "auto",
                   groups: int | None = None, shared: bool | None = None, trust_remote_code: bool = False,
                   progress: Progress = None, cancel: object = None) -> list[Spectrum]:
    """The spectra of every matrix of ``source`` as Ray tasks, in the model's order.

    The matrices are split into ``groups`` (default one per GPU of the cluster, else one
    per CPU) of about equal estimated cost. A safetensors folder that the workers see
    (``shared``; probed when ``None``) is read by the workers themselves; otherwise the
    driver loads the model and puts each group's tensors in the object store."""
    ray = connect(address)
    gpus = _gpus(ray) if device != "cpu" else 0
    slots = groups or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
    path = str(source.path) if isinstance(source, Source) and source.kind == "folder" else None
    if path is not None and shared is None:
        shared = workers_see(ray, path)
    if path is not None and shared:
        infos, weights = open_checkpoint(path).matrices, None
    else:
        loaded = source if isinstance(source, LoadedModel) else load_model(
            source.label if source.kind == "hub" else (source.path or "demo"), device="cpu",
            trust_remote_code=trust_remote_code, tokenizer=False)
        infos = loaded.matrices
        weights = dict((i.name, w.detach().cpu()) for i, w in iter_weights(loaded))
        path = None
    plan = plan_devices([(i.rows, i.cols) for i in infos], [str(k) for k in range(slots)])
    parts = [[i for i, p in zip(infos, plan) if p == str(k)] for k in range(slots)]
    parts = [p for p in parts if p]
    task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_retries=ATTEMPTS - 1,
                      retry_exceptions=True)(_spectra_task)
    task_device = "cuda" if gpus else "cpu"
    refs = [task.remote(part, path, None if weights is None else ray.put([weights[i.name] for i in part]),
                        task_device) for part in parts]
    done: dict[str, Spectrum] = {}
    report(progress, 0, len(infos), "eigenvalues (Ray)")
    for _, result in _gather(ray, refs, cancel=cancel):
        if isinstance(result, BaseException):
            raise RuntimeError(f"a Ray spectra task failed: {_error_text(result)}") from result
        done.update((s.info.name, s) for s in result)
        report(progress, len(done), len(infos), "eigenvalues (Ray)")
    return [done[i.name] for i in infos]


# --- sweep runs ------------------------------------------------------------------------------

_WORKER_MODELS: dict[tuple, LoadedModel] = {}


def _worker_model(spec: PruneSpec, loaded: LoadedModel | None) -> LoadedModel:
    if loaded is not None:
        return loaded
    key = (spec.model, spec.dtype, spec.trust_remote_code)
    if key not in _WORKER_MODELS:   # a worker process keeps the model for its next runs
        _WORKER_MODELS.clear()
        _WORKER_MODELS[key] = load_for(spec)
    return _WORKER_MODELS[key]


def _run_task(kind: str, spec: PruneSpec, inputs: dict) -> tuple[dict, pd.DataFrame]:
    """On a Ray worker: the run in a private registry (``core.sweeps.run_job``); returns its
    row (done or failed) and matrices. Only a failure outside the run (the model not loading,
    a lost worker) raises, and is retried."""
    if spec.device == "auto":
        spec = replace(spec, device="cuda" if torch.cuda.is_available() else "cpu")
    inputs = {**inputs, "loaded": _worker_model(spec, inputs.get("loaded"))}
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


def sweep_parallel(base: PruneSpec, *, methods: list[str], allocations: list[str], sparsities: list[float],
                   epsilons: list[float] | Mapping[str, list[float]] | None = None, dense: bool = True,
                   ray: str | bool | None = None, devices: Sequence[str] | None = None,
                   loaded: LoadedModel | None = None, ship_model: bool | None = None,
                   registry: Registry | None = None, metrics: pd.DataFrame | None = None, calibration: object = None,
                   progress: Progress = None, cancel: object = None) -> pd.DataFrame:
    """``core.sweeps.sweep`` with its runs in parallel: as Ray tasks (``ray``: ``True`` or an
    address; one GPU per task where the cluster has GPUs) or one run per local device
    (``devices``). The same jobs, the same registry records and the same table
    (``core.sweeps.sweep_table``, rows in the sweep's order, the same columns and dtypes).

    The driver loads the model once for the shared inputs (alpha metrics, calibration, OWL
    scores). Ray workers load the spec's model themselves, unless ``ship_model`` (default:
    when ``loaded`` was given) sends the driver's model through the object store."""
    if not ray and not devices:
        raise ValueError("sweep_parallel: give ray=True/ADDRESS or devices=[...]")
    jobs = sweep_jobs(base, methods=methods, allocations=allocations, sparsities=sparsities, epsilons=epsilons,
                      dense=dense)
    registry = registry or Registry()
    ship_model = loaded is not None if ship_model is None else ship_model
    inputs = sweep_inputs(base, jobs, loaded=loaded, metrics=metrics, calibration=calibration, progress=progress,
                          cancel=cancel)
    runs: list[dict | None] = [None] * len(jobs)

    def finished(i: int, result: object) -> None:
        kind, spec = jobs[i]
        if isinstance(result, (Cancelled, KeyboardInterrupt)):
            raise result
        if isinstance(result, BaseException):     # a Ray task that failed twice: its worker's registry is gone
            log.info("sweep run %s %s %s failed: %s", kind, spec.method, spec.allocation, result)
            run_id = record_failure(registry, kind, spec, _error_text(result), inputs["loaded"])
        elif ray:
            run_id = copy_run(registry, *result)
        else:
            run_id = int(result["id"])
        runs[i] = registry.get(run_id)
        report(progress, sum(r is not None for r in runs), len(jobs), "sweep runs")

    if ray:
        _sweep_on_ray(connect(ray), jobs, inputs if ship_model else {**inputs, "loaded": None}, finished, cancel)
    else:
        _sweep_on_devices(parse_devices(devices), jobs, inputs, registry, finished)
    return sweep_table(jobs, runs)


def _sweep_on_ray(ray, jobs: list, inputs: dict, finished: Callable, cancel: object) -> None:
    gpus = _gpus(ray) if all(s.device != "cpu" for _, s in jobs) else 0
    task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=ATTEMPTS - 1,
                      retry_exceptions=True)(_run_task)
    shared = ray.put(inputs)
    refs = [task.remote(kind, spec, shared) for kind, spec in jobs]
    for i, result in _gather(ray, refs, cancel=cancel):
        finished(i, result)


def _sweep_on_devices(devices: list[str], jobs: list, inputs: dict, registry: Registry,
                      finished: Callable) -> None:
    def run(job: tuple[str, PruneSpec], device: str) -> dict:
        kind, spec = job
        return run_job(kind, replace(spec, device=device), inputs, registry)

    for i, result in map_on_devices(run, jobs, devices):
        finished(i, result)


# --- epsilon tuning --------------------------------------------------------------------------

def _tune_task(base: PruneSpec, epsilon: float, grid: dict, analysis: Analysis | None,
               loaded: LoadedModel | None) -> Tuning:
    if base.device == "auto":
        base = replace(base, device="cuda" if torch.cuda.is_available() else "cpu")
    return tune(base, epsilons=[epsilon], analysis=analysis, loaded=_worker_model(base, loaded), **grid)


def tune_on_ray(base: PruneSpec, *, epsilons: list[float] | None = None, xmins: list[str] | None = None,
                metric_columns: Sequence[str] = DEFAULT_METRIC_COLUMNS, holdout: float = 0.1,
                holdout_windows: int | None = 16, ray: str | bool = True, loaded: LoadedModel | None = None,
                ship_model: bool | None = None, progress: Progress = None, cancel: object = None) -> Tuning:
    """``core.sweeps.tune`` with one Ray task per epsilon (each task draws the same seeded
    calibration and held-out text, and refits the driver's one analysis); the same table, in
    the same order, and the same choice as one process."""
    epsilons = list(epsilons) if epsilons else list(DEFAULT_EPSILONS)
    ship_model = loaded is not None if ship_model is None else ship_model
    driver = loaded if loaded is not None else load_for(base, progress)
    analysis = None if base.metrics_file is not None else analyze(
        driver, xmin=(xmins or XMIN_METHODS)[0], device=base.device, progress=progress)
    grid = dict(xmins=xmins, metric_columns=metric_columns, holdout=holdout, holdout_windows=holdout_windows)
    ray = connect(ray)
    gpus = _gpus(ray) if base.device != "cpu" else 0
    task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=ATTEMPTS - 1,
                      retry_exceptions=True)(_tune_task)
    model_ref, analysis_ref = ray.put(driver if ship_model else None), ray.put(analysis)
    refs = [task.remote(base, e, grid, analysis_ref, model_ref) for e in epsilons]
    parts: list[Tuning | None] = [None] * len(refs)
    for i, result in _gather(ray, refs, cancel=cancel):
        if isinstance(result, BaseException):
            raise RuntimeError(f"epsilon {epsilons[i]:g}: {_error_text(result)}") from result
        parts[i] = result
        report(progress, sum(p is not None for p in parts), len(parts), "epsilons (Ray)")
    table = pd.concat([p.table.assign(_eps=i) for i, p in enumerate(parts)], ignore_index=True)
    table["_row"] = table.groupby("_eps").cumcount()           # one process: xmin, metric, then epsilon
    table = table.sort_values(["_row", "_eps"], kind="stable").drop(columns=["_row", "_eps"]).reset_index(drop=True)
    return replace(parts[0], table=table, best=table.loc[table["perplexity"].idxmin()].to_dict())
