"""What a run needs before it starts, from its ``PruneSpec``: the inputs checked, the model
loaded (``load_for``; on a Ray worker once, ``worker_model``), the calibration windows, the
metrics table AlphaPruning scores and the per-matrix ratios (``choose_allocation``). Shared by
the runs (``core.experiments``), the sweeps and the tuning."""
from __future__ import annotations

import logging
from dataclasses import replace

import pandas as pd

from .allocation import DEFAULT_EPSILON, DEFAULT_R_MAX, Allocation, allocate, matrix_table, ratios_from_file
from .analysis import analyze
from .calibration import Calibration, calibration_data
from .checks import fail as _fail
from .config import resolve_device
from .metricsfile import read_metrics
from .models import LoadedModel, is_skeleton, load_model, load_skeleton
from .owlcache import owl_scores_for
from .progress import Progress
from .quant import quant_alpha_message
from .spec import PruneSpec
from .texts import check_text

log = logging.getLogger(__name__)


def check_inputs(spec: PruneSpec) -> None:
    """Refuse, before the model loads, what the spec needs later and cannot have: a device this
    machine lacks (or one of ``devices``), a calibration or evaluation text that is missing or empty."""
    for device in (spec.device, *spec.devices):
        resolve_device(device)
    if spec.needs_calibration:
        check_text(spec.calibration.dataset, "--calib")
    check_text(spec.evaluation.dataset, "--dataset")     # also read by eval_run without evaluate


def load_for(spec: PruneSpec, progress: Progress = None) -> LoadedModel:
    """The spec's model, loaded on the CPU in its dtype (stages move what they need); with
    ``streaming`` without its weights (``load_skeleton``: blocks come from the shards).
    ``check_inputs`` first: what the work needs later is refused before the load."""
    check_inputs(spec)
    if spec.streaming:
        return load_skeleton(spec.model, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
                             progress=progress)
    return load_model(spec.model, device="cpu", dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
                      progress=progress)


def calibration_for(spec: PruneSpec, loaded: LoadedModel) -> Calibration:
    c = spec.calibration
    return calibration_data(loaded.tokenizer, dataset=c.dataset, nsamples=c.nsamples, seqlen=c.seqlen,
                            seed=c.seed, model=loaded.model, bos=c.bos)


def alpha_metrics(spec: PruneSpec, loaded: LoadedModel, metrics: pd.DataFrame | None = None,
                  progress: Progress = None) -> pd.DataFrame:
    """The analysis table AlphaPruning scores: ``metrics`` if given, else the spec's
    ``metrics_file``, else ``analyze`` now with the spec's ``xmin`` (cached by the model's identity)."""
    if metrics is not None:
        return metrics_for(loaded, metrics)
    if spec.metrics_file is not None:
        return metrics_for(loaded, read_metrics(spec.metrics_file, spec.metric), spec.metrics_file)
    if is_skeleton(loaded):         # weights not in memory: read them from the shards
        return analyze(loaded.path, xmin=spec.xmin, streaming=True, device=spec.device, progress=progress).table
    return analyze(loaded, xmin=spec.xmin, device=spec.device, progress=progress).table


def metrics_for(loaded: LoadedModel, table: pd.DataFrame, source: object = None) -> pd.DataFrame:
    """``table`` if its matrix names are exactly ``loaded``'s prunable matrices; otherwise refused
    (a table of another model, never scored at a default), naming the first name off each way."""
    names = list(matrix_table(loaded.matrices)["name"])
    given = [str(n) for n in table["name"]] if "name" in table.columns else []
    missing, extra = [n for n in names if n not in set(given)], [n for n in given if n not in set(names)]
    if missing or extra:
        what = f"metrics table {source}" if source is not None else "the metrics table"
        off = ([f"lacks {len(missing)} of the model's {len(names)} matrices, first {missing[0]}"] if missing else []) \
            + ([f"names {len(extra)} the model does not have, first {extra[0]}"] if extra else [])
        raise ValueError(f"{what} is not of {loaded.source}: it {' and '.join(off)}; analyze the same model "
                         "(spectrascope analyze --model ... --out)")
    return table


def choose_allocation(spec: PruneSpec, loaded: LoadedModel, *, metrics: pd.DataFrame | None = None,
                      owl_scores: dict[int, float] | None = None, calibration: object = None,
                      progress: Progress = None, cancel: object = None) -> Allocation:
    """The per-matrix ratios of ``spec`` for ``loaded``: from its ratios file, or by its
    allocation method (``alpha`` scores ``metrics``; ``owl`` needs ``owl_scores`` or the
    ``calibration`` to compute them; ``sensitivity`` the measured sensitivities of ``core.sensitivity``,
    read from its cache or measured now)."""
    if spec.allocation == "alpha" and spec.epsilon == "auto":
        _fail("epsilon", "auto", "is tuned when a run starts (prune_and_eval, core.fasttune.auto_epsilon); give a "
              "number to compute ratios directly")
    table = matrix_table(loaded.matrices)
    if spec.allocation == "file":
        return ratios_from_file(spec.ratios_file, table)
    if spec.allocation == "alpha":
        scored = alpha_metrics(spec, loaded, metrics, progress)     # refused if of another model
        if spec.metric not in scored.columns:
            _fail("metric", spec.metric, "not a column of the metrics table; use alpha, alpha_hat, log_norm, ...")
        table = table.merge(scored[["name", spec.metric]], on="name", how="left")
        if note := quant_alpha_message(scored, spec.metric):
            log.warning(note)
    if spec.allocation == "owl" and owl_scores is None:
        owl_scores = owl_scores_for(loaded, calibration, device=spec.device, progress=progress, cancel=cancel)
    sensitivity = None
    if spec.allocation == "sensitivity":    # measured once per model, method, sparsity and mapping; cached
        from .sensitivity import measured_for

        sensitivity = measured_for(spec, loaded, progress=progress, cancel=cancel)
        table = table.assign(delta_loss=sensitivity.per_matrix(table))
    alloc = allocate(table, sparsity=spec.sparsity, method=spec.allocation, metric=spec.metric, mapping=spec.mapping,
                    epsilon=DEFAULT_EPSILON if spec.epsilon is None else spec.epsilon,
                    r_max=DEFAULT_R_MAX if spec.r_max is None else spec.r_max, dense_kinds=spec.dense_kinds,
                    reverse=spec.reverse, owl_scores=owl_scores)
    if sensitivity is not None:
        alloc.details["sensitivity"] = sensitivity.provenance()
    return alloc


def on_device(spec: PruneSpec, device: str) -> PruneSpec:
    """``spec`` on its slot's device (resolved once by the executor)."""
    return spec if spec.device == device else replace(spec, device=device)




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
