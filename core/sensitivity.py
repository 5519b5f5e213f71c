"""Does the spectral metric predict what matters on this model? Sensitivity: the rise in
held-out loss when one part of the model alone is pruned, and its rank correlation with a
metric of the analysis table.

``measure``: for each block (``per="block"``), or each matrix kind of each block
(``per="matrix"``), prune that part alone to ``sparsity`` with the chosen method, measure the
mean token NLL on held-out windows of the calibration text (``core.calibration.holdout_split``:
never the evaluation text) and subtract the dense model's; then restore the part's weights
(only they are saved) and go on. One pass over the blocks: Wanda's and SparseGPT's statistics
come from the dense model's inputs of each block (``BlockPipeline``) and serve every part of
that block; the held-out windows' dense hidden states are carried block by block, so a part
of block b costs blocks b.. and the head. Results are cached on disk
(``$SPECTRASCOPE_HOME/sensitivity/<key>.json``, keyed by the model's identity and every
setting), where the ``sensitivity`` allocation reads them (``core.allocation``).

``correlate``: Spearman's rho between ``delta_loss`` and the metric (the part's mean over its
matrices), with scipy's p-value and a seeded bootstrap 95 % interval, over all parts and per
kind. AlphaPruning prunes a higher metric more, so its premise is that a LOWER metric (lower
alpha: better trained) means MORE sensitive: a NEGATIVE rho supports it, a positive one
contradicts it (``Correlation.verdict``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .checks import choice, fraction, text, whole
from .choices import BOS_MODES, DEFAULT_SEED, MAPPINGS, PRUNE_METHODS
from .config import atomic_file, home, resolve_device
from .evaluation import StreamedPerplexity
from .models import LoadedModel, is_skeleton
from .progress import Progress, check_cancel
from .pruning.engine import BlockPipeline, InMemoryBlocks
from .pruning.methods import get_method
from .texts import EMBEDDED

log = logging.getLogger(__name__)

SENSITIVITY_VERSION = "1"   # bump when a change alters the measured values
#: How parts are cut: a whole block, or one matrix kind of a block (the allocation's mappings).
PER = MAPPINGS
#: The ``kind`` of a whole-block part.
ALL_KINDS = "all"
#: Columns of ``Sensitivity.table``.
COLUMNS = ("block", "kind", "params", "loss", "delta_loss")
#: A correlation is called significant below this p-value (and with its interval on one side of 0).
P_LEVEL = 0.05


@dataclass(frozen=True)
class SensitivitySettings:
    """What a measurement depends on besides the weights: the method and target ``sparsity``
    of each part, ``per`` part (``block`` or ``matrix``), the calibration text and its windows
    (``nsamples`` x ``seqlen``, ``seed``, ``bos``), the held-out share of that text and how many
    of its windows are scored. Defaults keep the demo to minutes on a CPU."""

    method: str = "wanda"
    sparsity: float = 0.5
    per: str = "block"
    dataset: str = EMBEDDED
    nsamples: int = 16
    seqlen: int = 256
    seed: int = DEFAULT_SEED
    bos: str = "auto"
    holdout: float = 0.1
    holdout_windows: int = 4

    def __post_init__(self) -> None:
        choice("method", self.method, PRUNE_METHODS)
        object.__setattr__(self, "sparsity", fraction("sparsity", self.sparsity, low_open=True))
        choice("per", self.per, PER)
        text("dataset", self.dataset)
        whole("nsamples", self.nsamples, 1)
        whole("seqlen", self.seqlen, 2)
        whole("seed", self.seed, 0)
        choice("bos", self.bos, BOS_MODES)
        if not (isinstance(self.holdout, (int, float)) and 0.0 < self.holdout < 0.5):
            raise ValueError(f"holdout={self.holdout!r}: give the held-out share of the calibration text, e.g. 0.1")
        whole("holdout_windows", self.holdout_windows, 1)

    def label(self) -> str:
        return (f"{self.method} at sparsity {self.sparsity:g} per {self.per}; calibration {self.nsamples} x "
                f"{self.seqlen} tokens of {self.dataset} (seed {self.seed}, BOS {self.bos}); held-out "
                f"{self.holdout:g} of it, {self.holdout_windows} windows")


@dataclass
class Sensitivity:
    """Measured sensitivities: ``table`` (``COLUMNS``: one row per part; kind ``all`` for a whole
    block), the dense model's held-out loss, where they are cached and whether they came from there."""

    table: pd.DataFrame
    dense_loss: float
    settings: SensitivitySettings
    identity: str
    source: str
    holdout_tokens: int
    seconds: float
    path: Path | None = None
    cached: bool = False

    def to_dict(self) -> dict:
        return {"identity": self.identity, "source": self.source, "settings": asdict(self.settings),
                "dense_loss": self.dense_loss, "holdout_tokens": self.holdout_tokens, "seconds": self.seconds,
                "rows": self.table.to_dict(orient="records")}

    def provenance(self) -> dict:
        """What an allocation records of the sensitivities it used (JSON-able)."""
        return {"settings": asdict(self.settings), "dense_loss": self.dense_loss,
                "cache": str(self.path) if self.path else None}

    def per_matrix(self, matrices: pd.DataFrame) -> np.ndarray:
        """Each matrix's ``delta_loss`` (its block's, or its block and kind's) for ``matrices``
        (columns block, kind), NaN where none was measured."""
        t = self.table
        key = (lambda b, k: (int(b), ALL_KINDS)) if self.settings.per == "block" else (lambda b, k: (int(b), str(k)))
        got = {(int(b), str(k)): float(d) for b, k, d in zip(t["block"], t["kind"], t["delta_loss"])}
        return np.array([got.get(key(b, k), np.nan) for b, k in zip(matrices["block"], matrices["kind"])])


# --- the cache ---------------------------------------------------------------------------------

def cache_path(identity: str, settings: SensitivitySettings) -> Path:
    """The cache file of ``identity`` (a model's weights identity) measured with ``settings``."""
    if not identity:
        raise ValueError("identity='': give the model's weights identity (LoadedModel.identity)")
    key = json.dumps({"identity": identity, **asdict(settings), "version": SENSITIVITY_VERSION}, sort_keys=True)
    return home() / "sensitivity" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def read_sensitivity(identity: str, settings: SensitivitySettings) -> Sensitivity | None:
    """The cached measurement of ``identity`` with ``settings``, or ``None`` when there is none
    (or it cannot be read: it is then measured again)."""
    path = cache_path(identity, settings)
    try:
        data = json.loads(path.read_text())
        table = pd.DataFrame(data["rows"]).reindex(columns=list(COLUMNS))
        return Sensitivity(table, float(data["dense_loss"]), settings, identity, str(data["source"]),
                           int(data["holdout_tokens"]), float(data["seconds"]), path, True)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("sensitivity cache %s cannot be read (%s); measuring again", path, exc)
        return None


def sensitivity_for(loaded: LoadedModel, settings: SensitivitySettings, *, device: str = "auto",
                    use_cache: bool = True, progress: Progress = None, cancel: object = None) -> Sensitivity:
    """The sensitivities of ``loaded`` with ``settings``: from the cache, or measured and cached."""
    if use_cache and loaded.identity:
        found = read_sensitivity(loaded.identity, settings)
        if found is not None:
            log.info("sensitivities of %s (%s) read from %s", loaded.source, settings.label(), found.path)
            return found
    result = measure(loaded, settings, device=device, progress=progress, cancel=cancel)
    if loaded.identity:
        path = cache_path(loaded.identity, settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_file(path, lambda tmp: tmp.write_text(json.dumps(result.to_dict(), indent=1)), overwrite=True)
        result.path = path
        log.info("sensitivities of %s cached in %s", loaded.source, path)
    return result


def settings_for(spec: object) -> SensitivitySettings:
    """The measurement the ``sensitivity`` allocation of a ``PruneSpec`` uses: its method and
    sparsity, per its mapping, on its calibration text, seed and BOS, with the windows of
    ``SensitivitySettings``' defaults (those of ``spectrascope sensitivity``, whose cache it reads)."""
    c = spec.calibration
    return SensitivitySettings(method=spec.method, sparsity=spec.sparsity, per=spec.mapping, dataset=c.dataset,
                               seed=c.seed, bos=c.bos)


def measured_for(spec: object, loaded: LoadedModel, *, progress: Progress = None,
                 cancel: object = None) -> Sensitivity:
    """The sensitivities the ``sensitivity`` allocation of ``spec`` maps (``settings_for``):
    cached, or measured now (minutes on a CPU for a 135M model) and cached."""
    settings = settings_for(spec)
    if not loaded.identity or read_sensitivity(loaded.identity, settings) is None:
        log.warning("measuring the sensitivities of %s for the sensitivity allocation (%s); they are cached for "
                    "later runs", loaded.source, settings.label())
    return sensitivity_for(loaded, settings, device=spec.device, progress=progress, cancel=cancel)


# --- measuring ---------------------------------------------------------------------------------

class _HeldOut(StreamedPerplexity):
    """The held-out windows, their hidden states kept at the dense input of the next block
    (``block(b)`` carries them through block ``b``): ``loss_from(b)`` carries a copy through
    blocks ``b``.. as they are now and returns the mean token NLL."""

    def loss_from(self, b: int) -> float:
        kept, step = self.hidden, self.next_block
        if b != step:
            raise ValueError(f"held-out states are at block {step}, not {b}")
        self.hidden, self.spare = kept.clone(), torch.empty_like(kept)
        try:
            for k in range(b, len(self.loaded.blocks)):
                self.block(k)
            return float(self.result().nll)
        finally:
            self.hidden, self.spare, self.next_block = kept, torch.empty_like(kept), step


class _Reused:
    """A block's statistics for many prunings: SparseGPT takes a copy of the Hessian each time."""

    def __init__(self, collector: object) -> None:
        self._collector = collector

    def __getattr__(self, name: str) -> object:
        return getattr(self._collector, name)

    def take_hessian(self) -> torch.Tensor:
        return self._collector.H


def _parts(loaded: LoadedModel, b: int, per: str) -> list[tuple[str, list]]:
    infos = [m for m in loaded.matrices if m.block == b]
    if per == "block":
        return [(ALL_KINDS, infos)]
    kinds = list(dict.fromkeys(m.kind for m in infos))
    return [(k, [m for m in infos if m.kind == k]) for k in kinds]


@torch.no_grad()
def measure(loaded: LoadedModel, settings: SensitivitySettings, *, device: str = "auto", progress: Progress = None,
            cancel: object = None) -> Sensitivity:
    """Measure every part's sensitivity (module docstring); ``loaded`` is left as it was."""
    from .spec import CalibrationSpec, PruneSpec
    from .calibration import holdout_split

    s = settings
    if is_skeleton(loaded):
        raise ValueError("sensitivity needs the model in memory (each part is pruned and restored); "
                         "drop --streaming")
    start = time.perf_counter()
    base = PruneSpec(method=s.method, calibration=CalibrationSpec(s.dataset, s.nsamples, s.seqlen, s.seed, s.bos))
    calib, held_ids = holdout_split(base, loaded, s.holdout)
    method = get_method(s.method)
    dev = resolve_device(device)
    model = loaded.model
    home_device, was_training = next(model.parameters()).device, model.training
    model.eval().to(dev)
    try:
        held = _HeldOut(loaded, InMemoryBlocks(loaded), ids=held_ids, seqlen=calib.seqlen,
                        max_windows=s.holdout_windows, device=dev, bos=s.bos, cancel=cancel)
        dense = held.loss_from(0)
        rows: list[dict] = []

        def on_block(b: int, stats: dict) -> None:
            reused: dict[int, _Reused] = {}
            kept = {name: reused.setdefault(id(c), _Reused(c)) for name, c in stats.items()}
            infos = [m for m in loaded.matrices if m.block == b]
            for kind, members in _parts(loaded, b, s.per):
                check_cancel(cancel, f"block {b} {kind}")
                names = {m.name for m in members}
                saved = {n: loaded.weight(n).detach().clone() for n in names}
                try:
                    method.prune_block(loaded, b, kept, ratios={m.name: s.sparsity if m.name in names else 0.0
                                                                for m in infos}, nm=None, device=dev)
                    loss = held.loss_from(b)
                finally:
                    for n, w in saved.items():
                        loaded.weight(n).copy_(w)
                rows.append({"block": b, "kind": kind, "params": sum(m.params for m in members), "loss": loss,
                             "delta_loss": loss - dense})
            held.block(b)      # the dense states go on to the next block

        pipeline = BlockPipeline(loaded, calib.input_ids if method.collector is not None else None,
                                 collector=method.collector, device=dev, progress=progress, cancel=cancel,
                                 label=f"sensitivity ({s.method} {s.sparsity:g} per {s.per})")
        pipeline.run(on_block, forward_after=False)
    finally:
        model.to(home_device).train(was_training)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    seconds = time.perf_counter() - start
    tokens = int(held.windows.shape[0] * (held.windows.shape[1] - 1))
    log.info("sensitivity of %s: %d parts in %.1f s (dense held-out loss %.4f)", loaded.source, len(table), seconds,
             dense)
    return Sensitivity(table, dense, s, loaded.identity, loaded.source, tokens, seconds)


# --- correlating -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Correlation:
    """Spearman's ``rho`` between delta_loss and the metric over ``n`` parts (``group``: ``all``
    or a kind), scipy's two-sided p-value and the bootstrap 95 % interval [``low``, ``high``]."""

    group: str
    n: int
    rho: float
    p: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """``supports`` (rho < 0: a lower metric is more sensitive, as AlphaPruning assumes),
        ``contradicts`` (rho > 0), each only when p < P_LEVEL and the interval excludes 0;
        else ``inconclusive``."""
        if not (math.isfinite(self.rho) and self.p < P_LEVEL):
            return "inconclusive"
        if self.rho < 0 and self.high < 0:
            return "supports"
        if self.rho > 0 and self.low > 0:
            return "contradicts"
        return "inconclusive"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def spearman(x: np.ndarray, y: np.ndarray, *, group: str = ALL_KINDS, bootstrap: int = 1000,
             seed: int = 0) -> Correlation:
    """Spearman's rho of ``x`` and ``y`` (pairs with a NaN left out), its p-value and a seeded
    bootstrap percentile 95 % interval from ``bootstrap`` resamples of the pairs."""
    from scipy.stats import rankdata, spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(group, n, math.nan, math.nan, math.nan, math.nan)
    rho, p = spearmanr(x, y)
    idx = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n))
    rx, ry = rankdata(x[idx], axis=1), rankdata(y[idx], axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (rx * ry).sum(1) / np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    low, high = np.nanpercentile(boot, [2.5, 97.5]) if np.isfinite(boot).any() else (math.nan, math.nan)
    return Correlation(group, n, float(rho), float(p), float(low), float(high))


@dataclass
class SensitivityReport:
    """Sensitivities beside a metric: ``table`` (block, kind, the metric, delta_loss; one row
    per part) and the correlations over all parts and per kind (``per="matrix"``)."""

    sensitivity: Sensitivity
    metric: str
    table: pd.DataFrame
    correlations: list[Correlation] = field(default_factory=list)

    @property
    def overall(self) -> Correlation:
        return self.correlations[0]

    def to_dict(self) -> dict:
        s = self.sensitivity
        return {"metric": self.metric, "premise": f"AlphaPruning prunes a higher {self.metric} more: a negative rho "
                "(lower metric, more sensitive) supports it, a positive rho contradicts it",
                "overall": self.overall.to_dict(), "per_kind": [c.to_dict() for c in self.correlations[1:]],
                "settings": asdict(s.settings), "dense_loss": s.dense_loss, "holdout_tokens": s.holdout_tokens,
                "seconds": s.seconds, "cached": s.cached, "cache": str(s.path) if s.path else None,
                "model": s.source, "identity": s.identity}

    def to_csv(self, path: str | Path, *, overwrite: bool = False) -> Path:
        return atomic_file(path, lambda tmp: self.table.to_csv(tmp, index=False), overwrite=overwrite)

    def summary(self) -> str:
        s = self.sensitivity

        def line(c: Correlation) -> str:
            return (f"{c.group:>6}: rho {c.rho:+.3f} (95% CI {c.low:+.3f}..{c.high:+.3f}, p {c.p:.2g}, n {c.n}) "
                    f"-> {c.verdict}")

        head = (f"sensitivity of {s.source}: {s.settings.label()}; dense held-out loss {s.dense_loss:.4f} "
                f"({s.holdout_tokens} tokens, never the evaluation text); "
                + (f"read from {s.path}" if s.cached else f"measured in {s.seconds:.0f} s"))
        d = self.table["delta_loss"]
        spread = f"delta_loss min {d.min():+.4f}, median {d.median():+.4f}, max {d.max():+.4f}"
        premise = (f"Spearman rho of delta_loss and {self.metric}; AlphaPruning's premise (lower {self.metric} = "
                   "more sensitive) is supported by a negative rho:")
        return "\n".join([head, spread, premise] + [line(c) for c in self.correlations])


def check_metric(metrics: pd.DataFrame, metric: str) -> None:
    """Refuse a ``metric`` that is not a numeric metric column of the analysis table ``metrics``."""
    col = metrics[metric] if metric in metrics.columns else None
    if col is None or metric in ("block", "params") or pd.api.types.is_bool_dtype(col) \
            or not pd.api.types.is_numeric_dtype(col):
        raise ValueError(f"--metric {metric!r} is not a numeric metric column of the analysis table; use alpha, "
                         "alpha_hat, log_norm, stable_rank, ...")


def part_metric(metrics: pd.DataFrame, metric: str, sens: Sensitivity) -> np.ndarray:
    """The metric of each part of ``sens``: the mean over its matrices (block, or block and kind)."""
    check_metric(metrics, metric)
    m = metrics.assign(block=metrics["block"].astype(int))
    if sens.settings.per == "block":
        means = m.groupby("block")[metric].mean()
        return np.array([means.get(int(b), np.nan) for b in sens.table["block"]], dtype=float)
    means = m.groupby(["block", "kind"])[metric].mean()
    return np.array([means.get((int(b), str(k)), np.nan) for b, k in zip(sens.table["block"], sens.table["kind"])],
                    dtype=float)


def correlate(sens: Sensitivity, metrics: pd.DataFrame, metric: str = "alpha", *, bootstrap: int = 1000,
              seed: int = 0) -> SensitivityReport:
    """``sens`` beside ``metric`` of the analysis table ``metrics``: the table and the Spearman
    correlations over all parts and per kind."""
    whole("bootstrap", bootstrap, 1)
    values = part_metric(metrics, metric, sens)
    t = sens.table
    table = pd.DataFrame({"block": t["block"].astype(int), "kind": t["kind"], metric: values,
                          "delta_loss": t["delta_loss"].astype(float)})
    delta = table["delta_loss"].to_numpy()
    if not np.isfinite(delta).all():
        log.warning("%d parts have no finite delta_loss (the pruned model's loss is not finite); they are left out",
                    int((~np.isfinite(delta)).sum()))
    cors = [spearman(delta, values, bootstrap=bootstrap, seed=seed)]
    if sens.settings.per == "matrix":
        for kind in dict.fromkeys(table["kind"]):
            rows = (table["kind"] == kind).to_numpy()
            cors.append(spearman(delta[rows], values[rows], group=str(kind), bootstrap=bootstrap, seed=seed))
    return SensitivityReport(sens, metric, table, cors)
