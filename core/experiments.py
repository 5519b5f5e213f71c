"""Experiments: ``prune_and_eval`` and ``eval_run`` carry out a ``PruneSpec`` (``core.spec``):
load, allocate, prune a copy (or stream it block by block), evaluate, save, and record the
run in the registry. Both prune paths end in one run tail (``_record`` then ``_analyze_output``);
a streamed run evaluates each pruned block as it is written (``StreamedPerplexity``), so
neither the model nor its pruned output is ever whole in memory."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .allocation import DEFAULT_EPSILON
from .analysis import analyze, analyze_copy
from .calibration import Calibration
from .checks import fail as _fail, new_folder
from .evaluation import Perplexity, StreamedPerplexity, perplexity
from .fasttune import auto_epsilon
from .models import LoadedModel, resolve_source, save_model
from .prepare import calibration_for, choose_allocation, load_for
from .progress import Progress
from .pruning import PruneResult, prune, prune_to_folder
from .pruning.streaming import ShardBlocks
from .registry import Registry, software_versions
from .runkey import RunKey, run_key
from .zeroshot import ZeroShot, record_zeroshot

from .spec import PruneSpec, untunable

log = logging.getLogger(__name__)

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


# --- the pipelines -------------------------------------------------------------------------

def _calibration_settings(calibration: object) -> dict:
    if isinstance(calibration, Calibration):
        return calibration.settings()
    shape = getattr(calibration, "shape", None)
    return {"nsamples": int(shape[0]), "seqlen": int(shape[1])} if shape is not None and len(shape) == 2 else {}


def check_save(spec: PruneSpec, loaded: LoadedModel | None = None) -> None:
    """Refuse, before any work, a ``save`` folder that cannot be made: one that exists, whose
    parent is a file or not writable, or inside the source model's folder (``loaded``'s, else
    the spec's model's, found without loading it)."""
    if spec.save is None:
        return
    source = loaded.path if loaded is not None else None
    if loaded is None:
        src = resolve_source(spec.model)
        source = src.path if src.kind == "folder" else None
    new_folder("save", spec.save, source=source)


def prune_and_eval(spec: PruneSpec, loaded: LoadedModel | None = None, *, registry: Registry | None = None,
                   metrics: pd.DataFrame | None = None, owl_scores: dict[int, float] | None = None,
                   calibration: object = None, progress: Progress = None, cancel: object = None) -> RunResult:
    """Prune a copy of ``loaded`` (the spec's model when ``None``; the original stays dense),
    optionally evaluate and save it, and record the run in ``registry`` (default database).

    ``metrics`` (an analysis table), ``owl_scores`` and ``calibration`` (a ``Calibration`` or
    token ids ``nsamples x seqlen``) are precomputed inputs to reuse across runs; by default
    they are computed from the spec."""
    check_save(spec, loaded)
    if spec.streaming and spec.save is None and not spec.evaluation.evaluate:
        _fail("streaming", True, "a streamed prune keeps nothing in memory; give save (--save DIR) to write the "
              "pruned model, or evaluate it (--eval)")
    if spec.streaming and spec.save is None and spec.analyze_output:
        _fail("analyze_output", True, "a streamed prune analyses its saved output; give save (--save DIR)")
    registry = registry or Registry()     # a read-only or damaged registry is refused here, before the work
    loaded = loaded if loaded is not None else load_for(spec, progress)
    spec.check_reachable(loaded.matrices)      # before calibration, tuning or scoring
    if not spec.needs_calibration:
        calibration = None
    elif calibration is None:
        calibration = calibration_for(spec, loaded)
    calib = _calibration_settings(calibration)
    alpha = spec.allocation == "alpha" and not spec.nm
    asked = spec.run_spec()          # as asked (epsilon auto, not what tuning chose): what a resumed sweep matches
    tuning = None
    if alpha and spec.epsilon == "auto":     # tuned on held-out calibration text, never the evaluation text
        tuned, tuning = auto_epsilon(spec, loaded, progress=progress, cancel=cancel)
        (log.warning if tuned.epsilon == 0 else log.info)("epsilon auto: %s", tuning["reason"])
        metrics = metrics if tuned.xmin == spec.xmin else None     # scored with the fit the tuning chose
        spec = tuned
    elif alpha and spec.epsilon is None and spec.metrics_file is None:
        log.warning("epsilon %g (the paper's default), not auto: %s; give --epsilon to choose it", DEFAULT_EPSILON,
                    untunable(spec))
    epsilon = (DEFAULT_EPSILON if spec.epsilon is None else spec.epsilon) if alpha else None
    ratios, params, sparsity = None, {}, spec.sparsity
    if not spec.nm:   # before the run is recorded: a bad ratios or metrics file is refused, not a failed run
        alloc = choose_allocation(spec, loaded, metrics=metrics, owl_scores=owl_scores, calibration=calibration,
                                  progress=progress, cancel=cancel)
        # a ratios file's sparsity is its weighted mean; its path and hash are in params
        ratios, params, sparsity = alloc.ratio_by_name(), alloc.params(), float(alloc.sparsity)
        if tuning is not None:
            params["tuning"] = tuning
        if alpha and metrics is None and spec.metrics_file is None:
            params["xmin"] = spec.xmin     # the fit that produced the scored metric
    fields = {"model": loaded.source, "model_identity": loaded.identity, "method": spec.method,
              "allocation": spec.recorded_allocation, "sparsity": None if spec.nm else sparsity,
              "epsilon": epsilon, "mapping": spec.mapping, "nm": spec.nm, "allocation_params": params,
              "calibration": calib if calibration is not None else None,
              "calib_bos": calib.get("bos") if calibration is not None else None,
              "calib_bos_prepended": calib.get("bos_prepended") if calibration is not None else None,
              "device": spec.recorded_device, "dtype": loaded.dtype_name,
              "output_dir": str(spec.save) if spec.save else None, "spec": asked}
    with registry.record("prune", **fields) as run_id:
        run = _Run(spec, loaded, registry, run_id, params, epsilon, sparsity, calib, progress, cancel)
        if spec.streaming:
            return _prune_streamed(run, ratios, calibration)
        result = prune(loaded, ratios, method=spec.method, calibration=calibration, nm=spec.nm, device=spec.device,
                       copy=True, progress=progress, cancel=cancel, devices=spec.devices or None)
        out, report = _record(run, result, evaluated=result.model)
        if spec.save:
            out.output_dir = save_model(result.model, spec.save, report)
        _analyze_output(run, out, result.model)
        del result
    return out


# --- the run tail both prune paths share ---------------------------------------------------

@dataclass
class _Run:
    """One prune run being recorded: its spec and model, where it is recorded, and what the
    allocation decided (``params``, ``epsilon``, ``sparsity``) with the calibration settings."""

    spec: PruneSpec
    loaded: LoadedModel
    registry: Registry
    run_id: int
    params: dict
    epsilon: float | None
    sparsity: float
    calib: dict
    progress: Progress = None
    cancel: object = None


def _record(run: _Run, result: PruneResult, *, evaluated: LoadedModel | None = None,
            ppl: Perplexity | None = None) -> tuple[RunResult, dict]:
    """The run tail, first part: record the pruned matrices and achieved sparsity, the
    perplexity (``ppl`` already measured, else of ``evaluated`` when the spec evaluates) and
    the zero-shot tasks (of ``evaluated``); the ``RunResult`` and the report saved with it."""
    spec, registry, run_id = run.spec, run.registry, run.run_id
    registry.add_matrices(run_id, result.matrices)
    registry.update(run_id, achieved_sparsity=result.sparsity, prune_seconds=result.seconds)
    if ppl is not None:
        _record_perplexity(spec, ppl, registry, run_id, result.dtype)
    elif spec.evaluation.evaluate and evaluated is not None:
        ppl = _evaluate(spec, evaluated, registry, run_id, run.progress, run.cancel)
    zeroshot = _zeroshot(spec, evaluated, registry, run_id, run.progress) if evaluated is not None else None
    out = RunResult(run_id, spec.method, spec.recorded_allocation, result.sparsity if spec.nm else run.sparsity,
                    run.epsilon, spec.nm, result.matrices, result.sparsity, result.seconds, ppl, None, run.calib,
                    zeroshot, run_key(registry.get(run_id)))
    return out, _report(spec, run.loaded, out, run.params, result)


def _analyze_output(run: _Run, out: RunResult, model: LoadedModel | None) -> None:
    """The run tail, second part (once the output is saved): with ``analyze_output``, the
    pruned model's spectra (of its saved folder, streamed when the run streamed; else of
    ``model`` in memory), cached; the run records where."""
    spec = run.spec
    if not spec.analyze_output:
        return
    if out.output_dir is not None:
        a = analyze(out.output_dir, xmin=spec.xmin, device=spec.device, streaming=spec.streaming,
                    progress=run.progress)
    else:
        a = analyze_copy(model, None, f"run{run.run_id}", xmin=spec.xmin, device=spec.device, progress=run.progress)
    run.registry.update(run.run_id, allocation_params={**run.params,
                                                       "analysis": {"identity": a.identity, "xmin": a.xmin}})


def _evaluate(spec: PruneSpec, loaded: LoadedModel, registry: Registry, run_id: int, progress: Progress,
              cancel: object) -> Perplexity:
    e = spec.evaluation
    ppl = perplexity(loaded, dataset=e.dataset, seqlen=e.seqlen, max_windows=e.max_windows, device=spec.device,
                     progress=progress, cancel=cancel, bos=e.bos, devices=spec.devices or None)
    return _record_perplexity(spec, ppl, registry, run_id, loaded.dtype_name)


def _record_perplexity(spec: PruneSpec, ppl: Perplexity, registry: Registry, run_id: int, dtype: str) -> Perplexity:
    """Record ``ppl`` with run ``run_id``; a perplexity that is not finite fails the run."""
    registry.update(run_id, eval_dataset=ppl.dataset, eval_seqlen=ppl.seqlen, eval_windows=ppl.windows,
                    eval_bos=ppl.bos, eval_bos_prepended=ppl.bos_prepended, perplexity=ppl.perplexity,
                    tokens_per_second=ppl.tokens_per_second, eval_seconds=ppl.seconds)
    if not math.isfinite(ppl.perplexity):
        raise ValueError(f"the perplexity of {spec.model} is {ppl.perplexity}: its outputs are not finite (NaN or "
                         f"inf weights, or an overflow in {dtype}); check the model or use float32 "
                         f"(run {run_id} is recorded as failed)")
    return ppl


def eval_run(spec: PruneSpec, loaded: LoadedModel | None = None, *, registry: Registry | None = None,
             progress: Progress = None, cancel: object = None) -> tuple[int, Perplexity]:
    """Perplexity (and the zero-shot tasks, if any) of the model as it is (``loaded``, or the
    spec's model), recorded as an ``eval`` run. Only the spec's model, dtype, device (or
    ``devices``) and ``evaluation`` are used."""
    registry = registry or Registry()
    loaded = loaded if loaded is not None else load_for(spec, progress)
    with registry.record("eval", model=loaded.source, model_identity=loaded.identity, method="dense",
                         device=spec.recorded_device, dtype=loaded.dtype_name, spec=spec.run_spec("eval")) as run_id:
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
                           device=spec.device, trust_task_code=e.trust_task_code, progress=progress)


def _report(spec: PruneSpec, loaded: LoadedModel, out: RunResult, params: dict, result: PruneResult) -> dict:
    """The JSON report saved beside a pruned model's weights."""
    return {**out.to_dict(), "output_dir": str(spec.save), "model": loaded.source, "model_identity": loaded.identity,
            "allocation_params": params, "versions": software_versions(), "spec": spec.to_argv(),
            "device": result.device, "placement": result.placement,
            "matrices": result.matrices.to_dict(orient="records")}


def _prune_streamed(run: _Run, ratios: dict | None, calibration: object) -> RunResult:
    """``prune_and_eval`` for a skeleton: blocks stream from the shards into ``spec.save``
    (when given); with ``evaluate`` each pruned block carries the evaluation windows as it is
    written (``StreamedPerplexity``: the output is evaluated block by block, never loaded);
    then the shared run tail."""
    spec, loaded = run.spec, run.loaded
    e = spec.evaluation
    streamed = StreamedPerplexity(loaded, ShardBlocks(loaded), dataset=e.dataset, seqlen=e.seqlen,
                                  max_windows=e.max_windows, device=spec.device, cancel=run.cancel,
                                  bos=e.bos, devices=spec.devices or None) if e.evaluate else None
    along = streamed.block if streamed is not None else None
    runs: list[RunResult] = []

    def finish(result: PruneResult, folder: Path | None = None) -> dict:
        out, report = _record(run, result, ppl=streamed.result() if streamed is not None else None)
        out.output_dir = spec.save
        runs.append(out)
        return report

    options = dict(method=spec.method, calibration=calibration, nm=spec.nm, device=spec.device,
                   progress=run.progress, cancel=run.cancel, devices=spec.devices or None)
    if spec.save is not None:
        prune_to_folder(loaded, spec.save, ratios, report=finish, along=along, **options)
    else:   # evaluated only (a sweep's run): nothing is written
        finish(prune(loaded, ratios, source=ShardBlocks(loaded, along=along), **options))
    _analyze_output(run, runs[0], None)
    return runs[0]
