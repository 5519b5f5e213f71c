"""Parallel analyses, sweeps and epsilon tuning: spectra, sweep runs and epsilons as Ray tasks,
or sweep runs one per local device; every Ray import of Spectrascope stays in this module.

Ray is the optional extra ``spectrascope[cluster]``. Where work runs (``connect``): ``True``,
``None`` or ``"local"`` start a new local Ray instance (never a cluster already running here),
``"auto"`` joins ``$RAY_ADDRESS`` or the cluster ``ray start`` runs on this machine, ``"HOST:PORT"``
joins that head after checking within seconds that it answers and accepts this driver's token
(one-line ``ValueError`` otherwise); Ray Client (``ray://``) addresses are refused.

Each spectra task reads its matrices from the checkpoint when its worker sees it (the same
files), one tensor at a time within the memory budget; a task whose worker does not see it hands
back and the driver ships that group's tensors through Ray's object store. Finished groups are
kept on disk as they end, so after a task fails twice a rerun computes only what is missing.
Sweep runs are recorded by the worker in a private registry and copied into the driver's registry
as each run finishes (a run that fails is recorded with its error, as in one process); a task that
fails outside its run (the model does not load) or is lost is retried once, then recorded as
failed with its error. Every route builds its table with ``core.sweeps.sweep_table``. Cancelling
the driver cancels the tasks.
"""
from __future__ import annotations

import logging
import contextlib
import hashlib
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .analysis import Analysis, analyze
from .checkpoints import open_checkpoint
from .config import atomic_file, home
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

#: Seconds to resolve a cluster's host name and to reach its GCS port before giving up.
CONNECT_TIMEOUT = 5.0
#: What the driver is connected to (None: a connection this module did not make, reused as is).
_connected: dict[str, str] = {}


def ray_module():
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'spectrascope[cluster]' (or pip install ray)") from None
    return ray


def ray_target(address: str | bool | None) -> str:
    """``"local"`` (``True``, ``None``, ``""``, ``"local"``: a new private Ray instance on this
    machine, even when a cluster runs here), ``"auto"`` (the cluster ``ray start`` started on
    this machine, or ``$RAY_ADDRESS``) or ``"HOST:PORT"`` (the head's GCS address). Ray Client
    (``ray://``) addresses and other forms are refused in one line."""
    if address in (True, None, "") or str(address).strip().lower() == "local":
        return "local"
    text = str(address).strip()
    if text.lower() == "auto":
        return "auto"
    if text.startswith("ray://"):
        raise ValueError(f"--ray {text}: Ray Client (ray://) addresses are not supported; give the head's "
                         "address HOST:PORT (the --port of `ray start --head`, 6379 by default)")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in text:
        raise ValueError(f"--ray {text}: give the head's address HOST:PORT (e.g. 10.0.0.5:6379), auto for the "
                         "cluster `ray start` runs on this machine, or local (or nothing) for a new local instance")
    return f"{host.strip('[]')}:{port}"


def _resolve(host: str, address: str, timeout: float) -> str:
    """``host``'s first address; a name that does not resolve within ``timeout`` is an error."""
    found: list = []

    def look() -> None:
        try:
            found.append(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
        except OSError as exc:
            found.append(exc)

    thread = threading.Thread(target=look, daemon=True, name="ray-resolve")
    thread.start()
    thread.join(timeout)
    if not found:
        raise ValueError(f"--ray {address}: the host name {host} did not resolve within {timeout:g} s; check the name "
                         "or give the head's IP address")
    if isinstance(found[0], OSError):
        raise ValueError(f"--ray {address}: unknown host {host} ({found[0].strerror or found[0]}); check the name or "
                         "give the head's IP address")
    return found[0]


def check_gcs(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail in one line, within seconds, unless a Ray head answers at ``address`` (HOST:PORT)
    and accepts this driver: nothing listening, an unknown host, or token authentication
    this driver lacks (Ray >= 2.5x clusters started with ``RAY_AUTH_MODE=token``)."""
    host, port = address.rsplit(":", 1)
    ip = _resolve(host, address, timeout)
    try:
        socket.create_connection((ip, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ValueError(f"--ray {address}: nothing answers there ({exc.strerror or exc}); start the head with "
                         f"`ray start --head --port {port}` or give its address") from None
    from ray._raylet import GcsClient

    answer: list = []

    def ask() -> None:
        try:
            GcsClient(address=f"{ip}:{port}").internal_kv_get(b"spectrascope-probe", None, timeout=timeout)
            answer.append(None)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            answer.append(exc)

    with _quiet_stderr():                 # Ray's C++ client logs each failed call on stderr
        thread = threading.Thread(target=ask, daemon=True, name="ray-probe")
        thread.start()
        thread.join(2 * timeout)
    if not answer:
        raise ValueError(f"--ray {address}: no Ray head answered within {2 * timeout:g} s; give the port of "
                         "`ray start --head --port PORT` (6379 by default)")
    if isinstance(answer[0], ray_module().exceptions.AuthenticationError):
        mine = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        what = "its token differs from this driver's" if mine else "this driver has none"
        raise ValueError(f"--ray {address}: the cluster requires token authentication and {what}; export "
                         "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<the token every node uses> (`ray get-auth-token` on "
                         "the head prints it) and run again")
    if answer[0] is not None:
        raise ValueError(f"--ray {address}: no Ray head answers there ({type(answer[0]).__name__}); give the port "
                         "of `ray start --head --port PORT` (6379 by default)")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 goes to /dev/null for the block (C++ logging bypasses Python)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _auto_address() -> str:
    """The address ``ray.init(address="auto")`` joins ($RAY_ADDRESS, else the cluster ``ray start``
    runs on this machine), with token authentication on when this machine has a token, as Ray does."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        found = None
    if not found:
        raise ValueError("--ray auto: no Ray cluster runs on this machine and RAY_ADDRESS is not set; start one "
                         "(`ray start --head`), give HOST:PORT, or --ray local for a new local instance")
    try:
        from ray._private.authentication.authentication_token_setup import \
            maybe_enable_token_auth_if_token_available
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except ImportError:    # a Ray without token authentication
        pass
    return found


def connect(address: str | bool | None = True, *, num_cpus: int | None = None):
    """Start a new local Ray instance (``True``, ``None``, ``"local"``), or join the cluster
    ``"auto"`` finds or the head at ``"HOST:PORT"`` after checking within seconds that it answers
    and accepts this driver (``check_gcs``). A driver already connected to the same target is
    reused (so is a connection made outside this module); another target replaces it.
    Returns the ``ray`` module."""
    ray = ray_module()
    target = ray_target(address)
    if not ray.is_initialized():
        _connected.clear()
    elif _connected.get("target", target) != target:
        ray.shutdown()
    if ray.is_initialized():
        return ray
    if target == "auto":
        check_gcs(_auto_address())
    elif target != "local":
        check_gcs(target)
    try:
        ray.init(address=target, num_cpus=num_cpus if target == "local" else None, include_dashboard=False,
                 log_to_driver=False)
    except (ConnectionError, SystemExit) as exc:       # Ray exits the process when the GCS vanishes
        raise ValueError(f"--ray {address}: could not join the cluster ({type(exc).__name__}: {exc})") from None
    _connected["target"] = target
    log.info("Ray: %s, resources %s", "a new local instance" if target == "local" else f"joined {target}",
             ray.cluster_resources())
    return ray


def _gpus(ray) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def _gather(ray, refs: list, *, cancel: object = None) -> Iterator[tuple[int, object]]:
    """``(index, result)`` of each task as it finishes (``result`` is the exception when the
    task failed after its retries); refs the caller appends to ``refs`` meanwhile are gathered
    too. A cancel flag or Ctrl-C cancels every pending task."""
    index: dict = {}
    pending: list = []
    try:
        while True:
            for ref in refs[len(index):]:
                index[ref] = len(index)
                pending.append(ref)
            if not pending:
                return
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

def _spectra_task(infos: list[MatrixInfo], where: str | None, nbytes: int, tensors: list | None, device: str,
                  budget_bytes: int) -> list[Spectrum] | None:
    """On a worker: the spectra of ``infos``, read one tensor at a time (within ``budget_bytes``)
    from the checkpoint ``where`` or given as ``tensors``. ``None`` when this worker does not see
    that checkpoint (no such folder, or other files than the driver's ``nbytes``): the driver
    then ships the tensors."""
    if where is not None:
        try:
            ckpt = open_checkpoint(where)
            if ckpt.nbytes != nbytes:
                return None
        except (OSError, ValueError):
            return None
        items = ((info, ckpt.read(info.name)) for info in infos)
    else:
        items = zip(infos, tensors)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return compute_spectra(items, total=len(infos), device=device, workers=1 if device == "cpu" else None,
                           budget_bytes=budget_bytes)


def _kept_folder(identity: str, device: str) -> Path:
    """Where the spectra of finished Ray tasks of the weights ``identity`` wait for a rerun."""
    from .analysis import ENGINE_VERSION

    return home() / "analyses" / "partial" / f"{identity.replace(':', '-')}-{device}-v{ENGINE_VERSION}"


def _keep(folder: Path, spectra: list[Spectrum]) -> None:
    """Store finished spectra (one file per task, atomically) so a rerun skips them."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, names=np.array([s.info.name for s in spectra]), w_var=np.array([s.w_var for s in spectra]),
                     reasons=np.array([s.reason for s in spectra]),
                     **{f"e{k}": s.eigs for k, s in enumerate(spectra)})
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha1("\n".join(s.info.name for s in spectra).encode()).hexdigest()[:16]
        atomic_file(folder / f"{key}.npz", write, overwrite=True)
    except OSError as exc:
        log.warning("could not keep finished spectra in %s: %s", folder, exc)


def _kept(folder: Path, infos: list[MatrixInfo]) -> dict[str, Spectrum]:
    """The spectra kept in ``folder`` of the matrices ``infos`` (a damaged file is skipped)."""
    by_name = {i.name: i for i in infos}
    out: dict[str, Spectrum] = {}
    for file in sorted(folder.glob("*.npz")) if folder.is_dir() else ():
        try:
            with np.load(file, allow_pickle=False) as z:
                for k, (name, w_var, reason) in enumerate(zip(z["names"], z["w_var"], z["reasons"])):
                    info = by_name.get(str(name))
                    eigs = z[f"e{k}"]
                    if info is not None and eigs.shape == (min(info.rows, info.cols),):
                        out[info.name] = Spectrum(info, eigs, float(w_var), str(reason))
        except Exception as exc:  # noqa: BLE001 - a damaged zip raises many types
            log.warning("ignoring the damaged kept spectra %s (%s)", file, exc)
    return out


def spectra_on_ray(source: Source | LoadedModel, *, address: str | bool = True, device: str = "auto",
                   groups: int | None = None, shared: bool | None = None, trust_remote_code: bool = False,
                   keep: str | None = None, budget_bytes: int = 1 << 30, progress: Progress = None,
                   cancel: object = None) -> list[Spectrum]:
    """The spectra of every matrix of ``source`` as Ray tasks, in the model's order.

    The matrices are split into ``groups`` (default one per GPU of the cluster, else one
    per CPU) of about equal estimated cost. Each task of a safetensors folder reads its own
    tensors, one at a time within ``budget_bytes``, when its worker sees the folder (the same
    files); a task whose worker does not see it hands back, and the driver ships that group's
    tensors through the object store (reading only them). ``shared=False`` ships every group.
    Other sources are loaded by the driver and shipped.

    ``keep`` (the weights' identity): each finished task's spectra are stored as it ends, so
    after a task fails twice (the error is raised once every other task ended) a rerun computes
    only the matrices still missing; the store is removed when every spectrum is there."""
    ray = connect(address)
    gpus = _gpus(ray) if device != "cpu" else 0
    slots = groups or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
    path = str(source.path) if isinstance(source, Source) and source.kind == "folder" else None
    if path is not None and shared is not False:
        ckpt = open_checkpoint(path)
        infos, read, nbytes = ckpt.matrices, ckpt.read, ckpt.nbytes
    else:
        loaded = source if isinstance(source, LoadedModel) else load_model(
            source.label if source.kind == "hub" else (source.path or "demo"), device="cpu",
            trust_remote_code=trust_remote_code, tokenizer=False)
        infos, nbytes, path = loaded.matrices, 0, None
        read = dict((i.name, w.detach().cpu()) for i, w in iter_weights(loaded)).__getitem__
    task_device = "cuda" if gpus else "cpu"
    kept = _kept_folder(keep, task_device) if keep else None
    done: dict[str, Spectrum] = _kept(kept, infos) if kept else {}
    if done:
        log.info("Ray: %d of %d spectra kept from an earlier run in %s", len(done), len(infos), kept)
    todo = [i for i in infos if i.name not in done]
    plan = plan_devices([(i.rows, i.cols) for i in todo], [str(k) for k in range(slots)])
    parts = [p for p in ([i for i, d in zip(todo, plan) if d == str(k)] for k in range(slots)) if p]
    task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_retries=ATTEMPTS - 1,
                      retry_exceptions=True)(_spectra_task)

    def submit(part: list[MatrixInfo], ship: bool):
        tensors = ray.put([read(i.name) for i in part]) if ship else None
        return task.remote(part, None if ship else path, nbytes, tensors, task_device, budget_bytes)

    refs = [submit(part, ship=path is None) for part in parts]
    failed: list[BaseException] = []
    report(progress, len(done), len(infos), "eigenvalues (Ray)")
    for i, result in _gather(ray, refs, cancel=cancel):
        part = parts[i]
        if result is None:          # this worker does not see the checkpoint: ship the group's tensors
            log.info("Ray: a worker does not see %s; shipping %d tensors through the object store", path, len(part))
            parts.append(part)
            refs.append(submit(part, ship=True))
            continue
        if isinstance(result, (Cancelled, KeyboardInterrupt)):
            raise result
        if isinstance(result, BaseException):
            failed.append(result)
            continue
        if kept:
            _keep(kept, result)
        done.update((s.info.name, s) for s in result)
        report(progress, len(done), len(infos), "eigenvalues (Ray)")
    if failed:
        rest = "" if not kept else (f"; the {len(done)} of {len(infos)} finished spectra are kept and a rerun "
                                    "computes only the rest")
        raise RuntimeError(f"a Ray spectra task failed: {_error_text(failed[0])}{rest}") from failed[0]
    if kept and kept.is_dir():
        shutil.rmtree(kept, ignore_errors=True)
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
    cluster = connect(ray) if ray else None        # a wrong address fails before any work
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
        _sweep_on_ray(cluster, jobs, inputs if ship_model else {**inputs, "loaded": None}, finished, cancel)
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
    ray = connect(ray)                             # a wrong address fails before any work
    driver = loaded if loaded is not None else load_for(base, progress)
    analysis = None if base.metrics_file is not None else analyze(
        driver, xmin=(xmins or XMIN_METHODS)[0], device=base.device, progress=progress)
    grid = dict(xmins=xmins, metric_columns=metric_columns, holdout=holdout, holdout_windows=holdout_windows)
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
