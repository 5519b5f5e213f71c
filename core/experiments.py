"""Experiments: one validated ``PruneSpec`` describes a prune (optionally evaluate and save)
run; ``prune_and_eval`` and ``eval_run`` carry a spec out and record it in the registry.

A spec is checked when it is made (everything that can be checked before loading a model),
turns into the ``spectrascope prune ...`` arguments that reproduce it (``to_argv``) and back
(``from_args``), so the dashboard, the CLI and the library describe a run the same way.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .allocation import (DEFAULT_EPSILON, DEFAULT_R_MAX, MAPPINGS, Allocation, allocate, matrix_table,
                         ratios_from_file)
from .allocation import METHODS as ALLOCATION_METHODS
from .analysis import analyze, analyze_copy
from .calibration import BOS_MODES, DEFAULT_NSAMPLES, DEFAULT_SEED, DEFAULT_SEQLEN, Calibration, calibration_data
from .checks import choice as _choice, fail as _fail, flag as _flag, fraction as _fraction
from .checks import path as _path, text as _text, whole as _whole
from .config import DTYPES
from .evaluation import Perplexity, perplexity
from .metricsfile import read_metrics
from .fit import XMIN_METHODS
from .models import LoadedModel, is_skeleton, load_model, load_skeleton, save_model
from .progress import Progress
from .pruning import METHODS as PRUNE_METHODS
from .pruning import owl_scores as compute_owl_scores
from .pruning import PruneResult, prune, prune_to_folder
from .registry import Registry, software_versions
from .runkey import RunKey, run_key
from .texts import EMBEDDED
from .zeroshot import ZeroShot, record_zeroshot, task_folder, task_names

log = logging.getLogger(__name__)

#: Where a run's per-matrix ratios come from: an allocation method or a ratios file.
ALLOCATIONS = (*ALLOCATION_METHODS, "file")
_NM = re.compile(r"(\d+):(\d+)")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


# --- the spec ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration windows: ``nsamples`` windows of ``seqlen`` tokens of ``dataset`` (seeded),
    BOS by ``bos`` (``core.calibration.BOS_MODES``)."""

    dataset: str = EMBEDDED
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = DEFAULT_SEED
    bos: str = "auto"

    def __post_init__(self) -> None:
        _text("calibration.dataset", self.dataset)
        _whole("calibration.nsamples", self.nsamples, 1)
        _whole("calibration.seqlen", self.seqlen, 2)
        _whole("calibration.seed", self.seed, 0)
        _choice("calibration.bos", self.bos, BOS_MODES)


@dataclass(frozen=True)
class EvaluationSpec:
    """Perplexity of the pruned model (``evaluate``) on the evaluation part of ``dataset``, BOS by
    ``bos`` (``core.calibration.BOS_MODES``); zero-shot accuracy on the ``zeroshot`` tasks (none:
    not measured; ``core.zeroshot``), the first ``zeroshot_limit`` documents of each, tasks also
    read from ``task_dir``."""

    evaluate: bool = False
    dataset: str = EMBEDDED
    seqlen: int = DEFAULT_SEQLEN
    max_windows: int | None = None
    bos: str = "auto"
    zeroshot: tuple[str, ...] = ()
    zeroshot_limit: int | None = None
    task_dir: Path | None = None

    def __post_init__(self) -> None:
        _flag("evaluation.evaluate", self.evaluate)
        _text("evaluation.dataset", self.dataset)
        _whole("evaluation.seqlen", self.seqlen, 2)
        _whole("evaluation.max_windows", self.max_windows, 1, optional=True)
        _choice("evaluation.bos", self.bos, BOS_MODES)
        object.__setattr__(self, "zeroshot", task_names(self.zeroshot) if self.zeroshot else ())
        _whole("evaluation.zeroshot_limit", self.zeroshot_limit, 1, optional=True)
        object.__setattr__(self, "task_dir", task_folder(self.task_dir))


@dataclass(frozen=True)
class PruneSpec:
    """Everything that defines one prune run. ``allocation`` is ``file`` exactly when
    ``ratios_file`` is given; ``epsilon``/``r_max`` ``None`` mean the allocation defaults;
    with ``nm`` (``"2:4"``) the ratios are not used. Paths are stored absolute."""

    model: str = "demo"
    method: str = "wanda"
    allocation: str = "uniform"
    sparsity: float = 0.5
    epsilon: float | None = None
    metric: str = "alpha"
    xmin: str = "peak"
    mapping: str = "block"
    r_max: float | None = None
    dense_kinds: tuple[str, ...] = ()
    reverse: bool = False
    ratios_file: Path | None = None
    metrics_file: Path | None = None
    nm: str | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    device: str = "auto"
    dtype: str = "float32"
    save: Path | None = None
    trust_remote_code: bool = False
    analyze_output: bool = False        # analyse the pruned model (disk cache; recorded in the run's params)
    streaming: bool = False             # models larger than memory: block by block from the shards

    def __post_init__(self) -> None:
        put = object.__setattr__   # frozen: normalised values are set once, here
        put(self, "model", str(self.model) if isinstance(self.model, os.PathLike) else self.model)
        _text("model", self.model)
        _choice("method", self.method, PRUNE_METHODS)
        _choice("allocation", self.allocation, ALLOCATIONS)
        put(self, "sparsity", _fraction("sparsity", self.sparsity))
        put(self, "epsilon", _fraction("epsilon", self.epsilon, optional=True))
        _text("metric", self.metric)
        _choice("xmin", self.xmin, XMIN_METHODS)
        _choice("mapping", self.mapping, MAPPINGS)
        put(self, "r_max", _fraction("r_max", self.r_max, low_open=True, optional=True))
        if self.r_max is not None and self.sparsity > self.r_max:
            _fail("sparsity", self.sparsity, f"above r_max={self.r_max:g}; lower sparsity or raise r_max")
        kinds = self.dense_kinds.split(",") if isinstance(self.dense_kinds, str) else self.dense_kinds
        put(self, "dense_kinds", tuple(k.strip() for k in kinds if str(k).strip()))
        _flag("reverse", self.reverse)
        put(self, "ratios_file", _path("ratios_file", self.ratios_file, must_exist=True))
        if (self.allocation == "file") != (self.ratios_file is not None):
            _fail("allocation", self.allocation, "a ratios file and allocation 'file' go together; give both "
                  "or neither (--ratios FILE alone is enough)")
        put(self, "metrics_file", _path("metrics_file", self.metrics_file, must_exist=True))
        if self.nm is not None:
            match = _NM.fullmatch(str(self.nm))
            if not match or not 1 <= int(match[1]) < int(match[2]):
                _fail("nm", self.nm, "write N:M with 1 <= N < M, e.g. 2:4 or 4:8")
            if self.ratios_file is not None:
                _fail("nm", self.nm, "N:M sparsity does not use a ratios file; drop one of them")
        if not isinstance(self.calibration, CalibrationSpec):
            _fail("calibration", self.calibration, "give a CalibrationSpec")
        if not isinstance(self.evaluation, EvaluationSpec):
            _fail("evaluation", self.evaluation, "give an EvaluationSpec")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device.strip().lower()):
            _fail("device", self.device, "use auto, cpu, cuda, cuda:N or mps")
        _choice("dtype", self.dtype, DTYPES)
        put(self, "save", _path("save", self.save, must_exist=False))
        _flag("trust_remote_code", self.trust_remote_code)
        _flag("analyze_output", self.analyze_output)
        _flag("streaming", self.streaming)

    @property
    def needs_calibration(self) -> bool:
        """Wanda and SparseGPT need calibration windows, and so do OWL's outlier scores."""
        return self.method != "magnitude" or (self.allocation == "owl" and self.nm is None)

    @property
    def recorded_allocation(self) -> str:
        return "n:m" if self.nm else self.allocation

    def to_argv(self) -> list[str]:
        """The ``spectrascope`` arguments (from ``prune`` on) that describe this spec."""
        c, e = self.calibration, self.evaluation
        argv = ["prune", "--model", self.model, "--method", self.method]
        argv += ["--ratios", str(self.ratios_file)] if self.ratios_file else ["--allocation", self.allocation]
        argv += ["--sparsity", repr(self.sparsity), "--metric", self.metric, "--mapping", self.mapping]
        argv += ["--epsilon", repr(self.epsilon)] if self.epsilon is not None else []
        argv += ["--xmin", self.xmin] if self.xmin != "peak" else []
        argv += ["--r-max", repr(self.r_max)] if self.r_max is not None else []
        argv += ["--dense-kinds", ",".join(self.dense_kinds)] if self.dense_kinds else []
        argv += ["--reverse"] if self.reverse else []
        argv += ["--metrics", str(self.metrics_file)] if self.metrics_file else []
        argv += ["--nm", self.nm] if self.nm else []
        argv += ["--calib", c.dataset, "--nsamples", str(c.nsamples), "--seqlen", str(c.seqlen), "--seed", str(c.seed)]
        argv += ["--bos", c.bos] + (["--eval-bos", e.bos] if e.bos != c.bos else [])
        argv += ["--eval"] if e.evaluate else []
        argv += ["--dataset", e.dataset, "--eval-seqlen", str(e.seqlen)]
        argv += ["--max-windows", str(e.max_windows)] if e.max_windows is not None else []
        argv += ["--zeroshot", ",".join(e.zeroshot)] if e.zeroshot else []
        argv += ["--zeroshot-limit", str(e.zeroshot_limit)] if e.zeroshot_limit is not None else []
        argv += ["--task-dir", str(e.task_dir)] if e.task_dir else []
        argv += ["--device", self.device, "--dtype", self.dtype]
        argv += ["--save", str(self.save)] if self.save else []
        argv += ["--trust-remote-code"] if self.trust_remote_code else []
        argv += ["--analyze-output"] if self.analyze_output else []
        argv += ["--streaming"] if self.streaming else []
        return argv

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: object) -> "PruneSpec":
        """The spec of parsed ``spectrascope`` arguments (``prune``'s, or the subset another
        command has: missing options take the defaults); ``overrides`` replace fields."""
        def get(name: str, default: object) -> object:
            value = getattr(args, name, None)
            return default if value is None else value

        seqlen, bos = get("seqlen", DEFAULT_SEQLEN), get("bos", "auto")
        ratios = get("ratios", None)
        fields = dict(
            model=get("model", cls.model), method=get("method", cls.method),
            allocation=get("allocation", "file" if ratios else cls.allocation), sparsity=get("sparsity", cls.sparsity),
            epsilon=get("epsilon", None), metric=get("metric", cls.metric), xmin=get("xmin", cls.xmin),
            mapping=get("mapping", cls.mapping),
            r_max=get("r_max", None), dense_kinds=get("dense_kinds", ()), reverse=get("reverse", False),
            ratios_file=ratios, metrics_file=get("metrics", None), nm=get("nm", None),
            calibration=CalibrationSpec(get("calib", EMBEDDED), get("nsamples", DEFAULT_NSAMPLES), seqlen,
                                        get("seed", DEFAULT_SEED), bos),
            evaluation=EvaluationSpec(get("eval", False), get("dataset", EMBEDDED), get("eval_seqlen", seqlen),
                                      get("max_windows", None), get("eval_bos", bos), zeroshot=get("zeroshot", ()),
                                      zeroshot_limit=get("zeroshot_limit", None), task_dir=get("task_dir", None)),
            device=get("device", cls.device), dtype=get("dtype", cls.dtype), save=get("save", None),
            trust_remote_code=get("trust_remote_code", False), analyze_output=get("analyze_output", False),
            streaming=get("streaming", False))
        return cls(**{**fields, **overrides})


# --- results -----------------------------------------------------------------------------

@dataclass
class RunResult:
    """One recorded prune (and optional eval) run."""

    run_id: int | None
    method: str
    allocation: str
    sparsity: float
    epsilon: float | None
    nm: str | None
    matrices: pd.DataFrame              # name, block, kind, params, ratio, achieved
    achieved: float
    prune_seconds: float
    perplexity: Perplexity | None = None
    output_dir: Path | None = None
    calibration: dict = field(default_factory=dict)
    zeroshot: ZeroShot | None = None
    key: RunKey | None = None           # the registry's comparison key of this run

    def to_dict(self) -> dict:
        ppl = self.perplexity
        return {"run_id": self.run_id, "method": self.method, "allocation": self.allocation,
                "sparsity": self.sparsity, "epsilon": self.epsilon, "nm": self.nm,
                "achieved_sparsity": self.achieved, "prune_seconds": self.prune_seconds,
                "calibration": self.calibration, "output_dir": str(self.output_dir) if self.output_dir else None,
                "perplexity": ppl.to_dict() if ppl is not None else None,
                "zeroshot": self.zeroshot.to_dict() if self.zeroshot is not None else None,
                **(self.key._asdict() if self.key is not None else {})}


# --- building blocks ---------------------------------------------------------------------

def load_for(spec: PruneSpec, progress: Progress = None) -> LoadedModel:
    """The spec's model, loaded on the CPU in its dtype (stages move what they need); with
    ``streaming`` without its weights (``load_skeleton``: blocks come from the shards)."""
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
        return metrics
    if spec.metrics_file is not None:
        return read_metrics(spec.metrics_file, spec.metric)
    if is_skeleton(loaded):         # weights not in memory: read them from the shards
        return analyze(loaded.path, xmin=spec.xmin, streaming=True, device=spec.device, progress=progress).table
    return analyze(loaded, xmin=spec.xmin, device=spec.device, progress=progress).table


def _calibration_settings(calibration: object) -> dict:
    if isinstance(calibration, Calibration):
        return calibration.settings()
    shape = getattr(calibration, "shape", None)
    return {"nsamples": int(shape[0]), "seqlen": int(shape[1])} if shape is not None and len(shape) == 2 else {}


def choose_allocation(spec: PruneSpec, loaded: LoadedModel, *, metrics: pd.DataFrame | None = None,
                      owl_scores: dict[int, float] | None = None, calibration: object = None,
                      progress: Progress = None, cancel: object = None) -> Allocation:
    """The per-matrix ratios of ``spec`` for ``loaded``: from its ratios file, or by its
    allocation method (``alpha`` scores ``metrics``; ``owl`` needs ``owl_scores`` or the
    ``calibration`` to compute them)."""
    table = matrix_table(loaded.matrices)
    if spec.allocation == "file":
        return ratios_from_file(spec.ratios_file, table)
    if spec.allocation == "alpha":
        scored = alpha_metrics(spec, loaded, metrics, progress)
        if set(scored["name"]) != set(table["name"]):
            raise ValueError(f"metrics: the table's matrix names do not match the model's ({len(table)} matrices); "
                             "analyze the same model")
        if spec.metric not in scored.columns:
            _fail("metric", spec.metric, "not a column of the metrics table; use alpha, alpha_hat, log_norm, ...")
        table = table.merge(scored[["name", spec.metric]], on="name", how="left")
    if spec.allocation == "owl" and owl_scores is None:
        owl_scores = compute_owl_scores(loaded, calibration, device=spec.device, progress=progress, cancel=cancel)
    return allocate(table, sparsity=spec.sparsity, method=spec.allocation, metric=spec.metric, mapping=spec.mapping,
                    epsilon=DEFAULT_EPSILON if spec.epsilon is None else spec.epsilon,
                    r_max=DEFAULT_R_MAX if spec.r_max is None else spec.r_max, dense_kinds=spec.dense_kinds,
                    reverse=spec.reverse, owl_scores=owl_scores)


# --- pipelines ---------------------------------------------------------------------------

def prune_and_eval(spec: PruneSpec, loaded: LoadedModel | None = None, *, registry: Registry | None = None,
                   metrics: pd.DataFrame | None = None, owl_scores: dict[int, float] | None = None,
                   calibration: object = None, progress: Progress = None, cancel: object = None) -> RunResult:
    """Prune a copy of ``loaded`` (the spec's model when ``None``; the original stays dense),
    optionally evaluate and save it, and record the run in ``registry`` (default database).

    ``metrics`` (an analysis table), ``owl_scores`` and ``calibration`` (a ``Calibration`` or
    token ids ``nsamples x seqlen``) are precomputed inputs to reuse across runs; by default
    they are computed from the spec."""
    if spec.save is not None and spec.save.exists():
        _fail("save", str(spec.save), "already exists; choose a new folder (nothing is overwritten)")
    if spec.streaming and spec.save is None:
        _fail("streaming", True, "a streamed prune writes the pruned model as it goes; give save (--save DIR)")
    registry = registry or Registry()
    loaded = loaded if loaded is not None else load_for(spec, progress)
    if not spec.needs_calibration:
        calibration = None
    elif calibration is None:
        calibration = calibration_for(spec, loaded)
    calib = _calibration_settings(calibration)
    alpha = spec.allocation == "alpha" and not spec.nm
    epsilon = (DEFAULT_EPSILON if spec.epsilon is None else spec.epsilon) if alpha else None
    ratios, params, sparsity = None, {}, spec.sparsity
    if not spec.nm:   # before the run is recorded: a bad ratios or metrics file is refused, not a failed run
        alloc = choose_allocation(spec, loaded, metrics=metrics, owl_scores=owl_scores, calibration=calibration,
                                  progress=progress, cancel=cancel)
        # a ratios file's sparsity is its weighted mean; its path and hash are in params
        ratios, params, sparsity = alloc.ratio_by_name(), alloc.params(), float(alloc.sparsity)
        if alpha and metrics is None and spec.metrics_file is None:
            params["xmin"] = spec.xmin     # the fit that produced the scored metric
    fields = {"model": loaded.source, "model_identity": loaded.identity, "method": spec.method,
              "allocation": spec.recorded_allocation, "sparsity": None if spec.nm else sparsity,
              "epsilon": epsilon, "mapping": spec.mapping, "nm": spec.nm, "allocation_params": params,
              "calibration": calib if calibration is not None else None,
              "calib_bos": calib.get("bos") if calibration is not None else None,
              "calib_bos_prepended": calib.get("bos_prepended") if calibration is not None else None,
              "device": spec.device, "dtype": loaded.dtype_name, "output_dir": str(spec.save) if spec.save else None}
    with registry.record("prune", **fields) as run_id:
        if spec.streaming:
            return _prune_streamed(spec, loaded, ratios, calibration, calib, registry, run_id, params, epsilon,
                                   sparsity, progress, cancel)
        result = prune(loaded, ratios, method=spec.method, calibration=calibration, nm=spec.nm, device=spec.device,
                       copy=True, progress=progress, cancel=cancel)
        registry.add_matrices(run_id, result.matrices)
        registry.update(run_id, achieved_sparsity=result.sparsity, prune_seconds=result.seconds)
        ppl = None
        if spec.evaluation.evaluate:
            ppl = _evaluate(spec, result.model, registry, run_id, progress, cancel)
        out = RunResult(run_id, spec.method, spec.recorded_allocation, result.sparsity if spec.nm else sparsity,
                        epsilon, spec.nm, result.matrices, result.sparsity, result.seconds, ppl, None, calib,
                        _zeroshot(spec, result.model, registry, run_id, progress), run_key(registry.get(run_id)))
        if spec.save:
            out.output_dir = save_model(result.model, spec.save, _report(spec, loaded, out, params, result))
        if spec.analyze_output:   # the pruned model's spectra, cached; the run records where
            a = analyze_copy(result.model, out.output_dir, f"run{run_id}", device=spec.device, progress=progress)
            registry.update(run_id, allocation_params={**params, "analysis": {"identity": a.identity, "xmin": a.xmin}})
        del result
    return out


def _evaluate(spec: PruneSpec, loaded: LoadedModel, registry: Registry, run_id: int, progress: Progress,
              cancel: object) -> Perplexity:
    e = spec.evaluation
    ppl = perplexity(loaded, dataset=e.dataset, seqlen=e.seqlen, max_windows=e.max_windows, device=spec.device,
                     progress=progress, cancel=cancel, bos=e.bos)
    registry.update(run_id, eval_dataset=ppl.dataset, eval_seqlen=ppl.seqlen, eval_windows=ppl.windows,
                    eval_bos=ppl.bos, eval_bos_prepended=ppl.bos_prepended, perplexity=ppl.perplexity,
                    tokens_per_second=ppl.tokens_per_second, eval_seconds=ppl.seconds)
    if not math.isfinite(ppl.perplexity):
        raise ValueError(f"the perplexity of {spec.model} is {ppl.perplexity}: its outputs are not finite (NaN or "
                         f"inf weights, or an overflow in {loaded.dtype_name}); check the model or use float32 "
                         f"(run {run_id} is recorded as failed)")
    return ppl


def eval_run(spec: PruneSpec, loaded: LoadedModel | None = None, *, registry: Registry | None = None,
             progress: Progress = None, cancel: object = None) -> tuple[int, Perplexity]:
    """Perplexity (and the zero-shot tasks, if any) of the model as it is (``loaded``, or the
    spec's model), recorded as an ``eval`` run. Only the spec's model, dtype, device and
    ``evaluation`` are used."""
    registry = registry or Registry()
    loaded = loaded if loaded is not None else load_for(spec, progress)
    with registry.record("eval", model=loaded.source, model_identity=loaded.identity, method="dense",
                         device=spec.device, dtype=loaded.dtype_name) as run_id:
        ppl = _evaluate(spec, loaded, registry, run_id, progress, cancel)
        _zeroshot(spec, loaded, registry, run_id, progress)
    return run_id, ppl


def _zeroshot(spec: PruneSpec, loaded: LoadedModel, registry: Registry, run_id: int, progress: Progress
              ) -> ZeroShot | None:
    """The spec's zero-shot tasks on ``loaded``, recorded with run ``run_id`` (None without tasks)."""
    e = spec.evaluation
    if not e.zeroshot:
        return None
    return record_zeroshot(loaded, registry, run_id, e.zeroshot, task_dir=e.task_dir, limit=e.zeroshot_limit,
                           device=spec.device, progress=progress)


def _report(spec: PruneSpec, loaded: LoadedModel, out: RunResult, params: dict, result: PruneResult) -> dict:
    """The JSON report saved beside a pruned model's weights."""
    return {**out.to_dict(), "output_dir": str(spec.save), "model": loaded.source, "model_identity": loaded.identity,
            "allocation_params": params, "versions": software_versions(), "spec": spec.to_argv(),
            "matrices": result.matrices.to_dict(orient="records")}


def _prune_streamed(spec: PruneSpec, loaded: LoadedModel, ratios: dict | None, calibration: object, calib: dict,
                    registry: Registry, run_id: int, params: dict, epsilon: float | None, sparsity: float,
                    progress: Progress, cancel: object) -> RunResult:
    """``prune_and_eval``'s prune, evaluation and save for a skeleton: blocks stream from the
    shards into ``spec.save``; the evaluation loads the complete output (before it is
    published) normally, so it needs the pruned model's memory."""
    runs: list[RunResult] = []

    def finish(result: PruneResult, folder: Path) -> dict:
        registry.add_matrices(run_id, result.matrices)
        registry.update(run_id, achieved_sparsity=result.sparsity, prune_seconds=result.seconds)
        ppl = None
        if spec.evaluation.evaluate:
            pruned = load_model(folder, device="cpu", dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
            ppl = _evaluate(spec, pruned, registry, run_id, progress, cancel)
            del pruned
        out = RunResult(run_id, spec.method, spec.recorded_allocation, result.sparsity if spec.nm else sparsity,
                        epsilon, spec.nm, result.matrices, result.sparsity, result.seconds, ppl, spec.save, calib,
                        key=run_key(registry.get(run_id)))
        runs.append(out)
        return _report(spec, loaded, out, params, result)

    prune_to_folder(loaded, spec.save, ratios, method=spec.method, calibration=calibration, nm=spec.nm,
                    device=spec.device, report=finish, progress=progress, cancel=cancel)
    return runs[0]
