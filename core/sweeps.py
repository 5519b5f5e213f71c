"""Many runs from one base ``PruneSpec``: a sweep over methods x allocations x sparsities
(x epsilons) into one comparison table with its Markdown report, and the choice of
AlphaPruning's epsilon on held-out calibration text.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Mapping

import pandas as pd

from .allocation import METHODS as ALLOCATION_METHODS
from .calibration import Calibration, cap_seqlen, sample_windows, tokenize
from .evaluation import perplexity
from .experiments import PruneSpec, alpha_metrics, calibration_for, choose_allocation, eval_run, load_for, \
    prune_and_eval
from .experiments import _whole
from .models import LoadedModel
from .progress import Progress
from .pruning import METHODS as PRUNE_METHODS
from .pruning import owl_scores as compute_owl_scores
from .pruning import prune
from .registry import Registry
from .texts import load_text

log = logging.getLogger(__name__)

SWEEP_COLUMNS = ["method", "allocation", "sparsity", "epsilon", "achieved", "perplexity", "prune_seconds",
                 "eval_seconds", "run_id"]
DEFAULT_EPSILONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def sweep(base: PruneSpec, *, methods: list[str], allocations: list[str], sparsities: list[float],
          epsilons: list[float] | Mapping[str, list[float]] | None = None, dense: bool = True,
          loaded: LoadedModel | None = None, registry: Registry | None = None, metrics: pd.DataFrame | None = None,
          calibration: object = None, progress: Progress = None, cancel: object = None) -> pd.DataFrame:
    """Every method x allocation x sparsity (x epsilon for ``alpha``), pruned from the same dense
    model, evaluated, recorded; returns one comparison table (``SWEEP_COLUMNS``), dense first.

    ``base`` gives the model, calibration, evaluation, device and the allocation settings
    (metric, mapping, r_max, ...); each run replaces its method, allocation, sparsity and
    epsilon. ``epsilons``: one list for every method, or ``{method: list}`` (each method with
    the epsilon tuned for it; a method left out gets the default epsilon). ``loaded``,
    ``metrics`` and ``calibration`` are computed from ``base`` when not given."""
    specs = sweep_specs(base, methods=methods, allocations=allocations, sparsities=sparsities, epsilons=epsilons)
    registry = registry or Registry()
    loaded = loaded if loaded is not None else load_for(base, progress)   # once every spec is valid
    if calibration is None and any(s.needs_calibration for s in specs):
        calibration = calibration_for(base, loaded)
    rows = []
    if dense:
        run_id, ppl = eval_run(base, loaded, registry=registry, progress=progress, cancel=cancel)
        rows.append({"method": "dense", "allocation": "-", "sparsity": 0.0, "epsilon": None, "achieved": 0.0,
                     "perplexity": ppl.perplexity, "prune_seconds": 0.0, "eval_seconds": ppl.seconds,
                     "run_id": run_id})
    owl = compute_owl_scores(loaded, calibration, device=base.device, progress=progress, cancel=cancel) \
        if "owl" in allocations else None
    if "alpha" in allocations:
        metrics = alpha_metrics(base, loaded, metrics, progress)
    for spec in specs:
        log.info("sweep: %s %s S=%g eps=%s", spec.method, spec.allocation, spec.sparsity, spec.epsilon)
        run = prune_and_eval(spec, loaded, registry=registry, metrics=metrics, owl_scores=owl,
                             calibration=calibration, progress=progress, cancel=cancel)
        rows.append({"method": spec.method, "allocation": spec.allocation, "sparsity": spec.sparsity,
                     "epsilon": run.epsilon, "achieved": run.achieved, "perplexity": run.perplexity.perplexity,
                     "prune_seconds": run.prune_seconds, "eval_seconds": run.perplexity.seconds,
                     "run_id": run.run_id})
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


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
    """The Markdown report of a sweep: its settings, the perplexity pivot and every run."""
    e = base.evaluation
    calib_text = (f"calibration {calibration.nsamples} x {calibration.seqlen} tokens of {calibration.dataset} "
                  f"(seed {calibration.seed})" if calibration is not None else "no calibration")
    header = (f"Model {model}; evaluation {e.dataset}, windows of {e.seqlen} tokens"
              + (f" (first {e.max_windows})" if e.max_windows else "") + f"; {calib_text}; "
              f"device {base.device}; total {seconds / 60:.1f} min.")
    return f"{header}\n\nPerplexity:\n\n{to_markdown(pivot(table))}\n\nAll runs:\n\n{to_markdown(table)}\n"


# --- epsilon tuning --------------------------------------------------------------------------

@dataclass
class EpsilonTuning:
    """``best`` epsilon by held-out calibration perplexity; ``table``: epsilon, perplexity."""

    best: float
    table: pd.DataFrame
    method: str
    sparsity: float
    calibration: dict
    holdout_tokens: int

    def summary(self) -> str:
        lines = [f"epsilon for {self.method} at sparsity {self.sparsity:g}: {self.best:g} "
                 f"(held-out calibration text, {self.holdout_tokens} tokens; never the evaluation text)"]
        lines += [f"  eps {r.epsilon:<5g} perplexity {r.perplexity:.3f}" for r in self.table.itertuples()]
        return "\n".join(lines)


def tune_epsilon(base: PruneSpec, *, epsilons: list[float] | None = None, holdout: float = 0.1,
                 holdout_windows: int | None = 16, loaded: LoadedModel | None = None,
                 metrics: pd.DataFrame | None = None, progress: Progress = None,
                 cancel: object = None) -> EpsilonTuning:
    """Pick AlphaPruning's epsilon from ``epsilons`` by perplexity on held-out calibration text,
    pruning ``base`` (its method, sparsity and alpha settings) once per epsilon.

    The calibration split of ``base.calibration.dataset`` is tokenized and cut in two:
    calibration windows are drawn from the first ``1 - holdout`` of the tokens, the
    perplexity is measured on the last ``holdout`` (at most ``holdout_windows`` windows).
    The evaluation split is never read."""
    if not (0.0 < holdout < 0.5):
        raise ValueError(f"holdout={holdout!r}: give the held-out share of the calibration text, e.g. 0.1")
    _whole("holdout_windows (--holdout-windows)", holdout_windows, 1, optional=True)
    epsilons = list(epsilons) if epsilons else list(DEFAULT_EPSILONS)
    specs = [replace(base, allocation="alpha", epsilon=e, nm=None, ratios_file=None, save=None) for e in epsilons]
    loaded = loaded if loaded is not None else load_for(base, progress)
    c = base.calibration
    seqlen = cap_seqlen(c.seqlen, loaded.model)
    ids = tokenize(loaded.tokenizer, load_text(c.dataset, split="calib"))
    cut = int(ids.numel() * (1 - holdout))
    calib = Calibration(sample_windows(ids[:cut], nsamples=c.nsamples, seqlen=seqlen, seed=c.seed), c.dataset,
                        c.seed, cut)
    held = ids[cut:]
    metrics = alpha_metrics(base, loaded, metrics, progress)
    rows = []
    for spec in specs:
        ratios = choose_allocation(spec, loaded, metrics=metrics).ratio_by_name()
        pruned = prune(loaded, ratios, method=spec.method, calibration=calib if spec.needs_calibration else None,
                       device=spec.device, copy=True, progress=progress, cancel=cancel)
        ppl = perplexity(pruned.model, ids=held, seqlen=seqlen, max_windows=holdout_windows, device=spec.device,
                         progress=progress, cancel=cancel)
        rows.append({"epsilon": spec.epsilon, "perplexity": ppl.perplexity, "achieved": pruned.sparsity})
        del pruned
    table = pd.DataFrame(rows)
    best = float(table.loc[table["perplexity"].idxmin(), "epsilon"])
    return EpsilonTuning(best, table, base.method, base.sparsity, calib.settings(),
                         min(held.numel(), (holdout_windows or 10**9) * seqlen))


# --- the runs of a sweep (also for core.cluster) ------------------------------------------------

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
