"""Layer-wise sparsity allocation: per-matrix pruning ratios (uniform, AlphaPruning, OWL, or a
ratios file) whose parameter-weighted mean is the target sparsity S.

AlphaPruning (Lu et al., NeurIPS 2024; ``docs/htsr-primer.md`` section 4) gives matrices
whose spectra are less heavy-tailed (larger ``alpha``: less well trained) more sparsity:

1. score m_i: the metric of matrix i, or (``mapping="block"``, the default) the mean
   metric of its transformer block;
2. linear map into [1 - eps, 1 + eps]:  q_i = (1 - eps) + 2 eps (m_i - min m) / (max m - min m);
3. rescale so the parameter-weighted mean is the target S:  r_i = q_i S sum(n) / sum(n q).

Sensitivity (``core.sensitivity``): the measured rise in held-out loss when a block (or a
kind of a block) alone is pruned, the ``delta_loss`` column, mapped as the alpha metric but the
other way round: more sensitive, less sparsity (``epsilon`` is the range as for alpha).

OWL (Yin et al., ICML 2024) gives blocks with a larger share D_l of outlier Wanda scores
less sparsity: q_i = S - (d_l - mean d) with d_l = 2 lam (D_l - min D) / (max D - min D),
the mean weighted by parameters; below 0 it is raised to 0. Uniform: q_i = 1.

Where no bound is hit, the ratios are exactly those formulas, in input order. Beyond the
published code, every method keeps each ratio in [0, r_max]: a matrix over r_max is set
to r_max and its excess re-spread over the others in proportion to q (water-filling);
``dense_kinds`` stay at 0; the weighted mean over all matrices stays exactly S. Requests
that cannot be met are refused with a ``ValueError``. :func:`ratios_from_file` reads
ratios written earlier. The published LLaMA alpha profiles are in ``core.profiles``.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from .choices import ALLOCATION_METHODS as METHODS
from .choices import DEFAULT_R_MAX as _DEFAULT_R_MAX, MAPPINGS
from .config import atomic_file
from .ratiofile import read_ratio_file
from .ratiofile import some as _some

logger = logging.getLogger(__name__)

#: The allocation methods (the CLI and the dashboard read this list) and ``MAPPINGS``: in ``core.choices``.
#: Default tau range. The paper's tuned values at 70 % sparsity lie in 0.2-0.5; 0.3 is the
#: value it chose most often (LLaMA-7B magnitude, LLaMA-13B and LLaMA-2-7B Wanda, ...).
DEFAULT_EPSILON = 0.3
DEFAULT_R_MAX = _DEFAULT_R_MAX
#: OWL's lambda: block sparsities span S - lam .. S + lam (the paper's value 0.08).
OWL_LAMBDA = 0.08
#: The allocations that map a score column with the tau map; ``sensitivity`` scores this column.
SCORED = ("alpha", "sensitivity")
SENSITIVITY_COLUMN = "delta_loss"
#: Columns every input table needs besides the metric column.
REQUIRED_COLUMNS = ("name", "block", "kind", "params")
#: Columns written by :meth:`Allocation.to_csv` (and the CLI's ``--out``).
CSV_COLUMNS = ("name", "block", "kind", "params", "metric", "ratio")
#: Metrics whose spread is below this fraction of their magnitude count as all equal
#: (uniform ratios) instead of turning rounding noise into the full [1 - eps, 1 + eps] range.
_EQUAL_RTOL = 1e-12
#: A weighted mean this close to the target is reported as the target (rounding noise).
_MEAN_ATOL = 1e-12


def matrix_table(matrices: Iterable[object]) -> pd.DataFrame:
    """The table ``allocate`` needs for uniform and OWL (name, block, kind, params) from
    objects with those attributes, e.g. ``LoadedModel.matrices`` (``core.models.MatrixInfo``)."""
    rows = [(m.name, m.block, m.kind, m.params) for m in matrices]
    name, block, kind, params = zip(*rows) if rows else ((), (), (), ())
    return pd.DataFrame({"name": list(name), "block": np.asarray(block, dtype=np.int64), "kind": list(kind),
                         "params": np.asarray(params, dtype=np.int64)})


# --- result ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Allocation:
    """Per-matrix sparsity ratios and how they were obtained.

    ``ratios`` has one row per input matrix, in input order: name, block, kind, params,
    metric (the matrix's own metric; the block mean where ``filled``), ratio (fraction of
    the matrix's weights to prune), clipped (held at ``r_max``), filled (the metric was NaN
    and took its block's mean). ``epsilon`` is the one used (0 unless ``alpha``). For OWL the
    metric column is the block's outlier share D_l. ``weighted_mean`` is sum(n r) / sum(n),
    reported as ``sparsity`` where it differs only by rounding noise (below 1e-12).
    ``details``: method-specific settings, ``owl``: lambda and the block scores; ``file``:
    the file's resolved path and sha256.
    """

    ratios: pd.DataFrame
    sparsity: float
    method: str
    metric: str
    mapping: str
    epsilon: float
    r_max: float
    dense_kinds: tuple[str, ...]
    reverse: bool
    weighted_mean: float
    n_clipped: int
    n_filled: int
    warnings: tuple[str, ...] = ()
    details: dict[str, object] = field(default_factory=dict)

    def params(self) -> dict[str, object]:
        """The settings to record with a run (JSON-able), as far as they matter for ``method``."""
        if self.method == "file":
            return dict(self.details)
        bounds = {"r_max": self.r_max, "dense_kinds": list(self.dense_kinds)}
        if self.method in SCORED:
            return {**self.details, "epsilon": self.epsilon, "mapping": self.mapping, "metric": self.metric, **bounds,
                    "reverse": self.reverse}
        return {**self.details, **bounds}

    def ratio_by_name(self) -> dict[str, float]:
        """``{matrix name: ratio}``, the form a pruner takes."""
        return dict(zip(self.ratios["name"].tolist(), self.ratios["ratio"].tolist()))

    def summary(self) -> str:
        """A few lines for a terminal: method, target, range, weighted mean, clipping."""
        r = self.ratios
        if self.method in ("uniform", "file"):
            how = "uniform allocation" if self.method == "uniform" else f"ratios from {self.details['path']}"
        elif self.method == "owl":
            how = f"OWL allocation (lambda {self.details['lambda']:g})"
        elif self.method == "sensitivity":
            how = (f"sensitivity allocation (measured {self.metric}, more sensitive less sparse; {self.mapping} "
                   f"mapping, epsilon {self.epsilon:g})")
        else:
            how = (f"alpha allocation (metric {self.metric}, {self.mapping} mapping, epsilon {self.epsilon:g}"
                   f"{', reversed' if self.reverse else ''})")
        prunable = r.loc[~r["kind"].isin(self.dense_kinds), "ratio"]
        lines = [
            f"{how} of {len(r)} matrices",
            f"target sparsity {self.sparsity:.4f}, parameter-weighted mean {self.weighted_mean:.6f}",
            f"ratio min {prunable.min():.4f}, max {prunable.max():.4f}"
            + (f" (dense kinds {','.join(self.dense_kinds)} at 0)" if self.dense_kinds else ""),
            f"clipped at r_max={self.r_max:g}: {self.n_clipped} matrices",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the columns name, block, kind, params, metric, ratio to ``path`` atomically
        (a temporary file in the same folder, then ``os.replace``). Returns the path."""
        path = atomic_file(path, lambda tmp: self.ratios.loc[:, list(CSV_COLUMNS)].to_csv(tmp, index=False),
                           overwrite=overwrite)
        logger.info("wrote %d ratios to %s", len(self.ratios), path)
        return path


# --- allocation ------------------------------------------------------------------------

def allocate(table: pd.DataFrame, *, sparsity: float, method: str = "alpha", metric: str = "alpha",
             mapping: str = "block", epsilon: float = DEFAULT_EPSILON, r_max: float = DEFAULT_R_MAX,
             dense_kinds: Iterable[str] | str = (), reverse: bool = False,
             owl_scores: Mapping[int, float] | None = None, owl_lambda: float = OWL_LAMBDA) -> Allocation:
    """Per-matrix sparsity ratios whose parameter-weighted mean is ``sparsity``.

    ``table``: one row per matrix to prune, columns name, block (int), kind (str), params
    (int > 0; :func:`matrix_table` builds these from a model) and, for ``alpha``, the
    ``metric`` column (any numeric column of the analysis table: alpha, log_norm, ...).
    ``method``: ``alpha`` (AlphaPruning), ``uniform`` or ``owl`` (needs ``owl_scores``,
    {block: outlier share} from ``core.pruning.owl_scores``; 0 <= ``owl_lambda`` < 1).
    ``sensitivity``: the table's ``delta_loss`` column (``core.sensitivity``; ``metric`` is
    ignored), mapped like alpha with mapping and epsilon, a higher value giving less sparsity.
    mapping, epsilon, metric and reverse only matter for ``alpha`` (and ``sensitivity``). ``mapping``: ``block``
    (each matrix takes its block's mean metric) or ``matrix``. ``epsilon``: the tau range,
    0 <= epsilon < 1 (at 1 the lowest share would be 0); 0 gives uniform ratios.
    ``r_max``: upper bound of any ratio, 0 < r_max < 1. ``dense_kinds``: kinds (``("k",
    "v")`` or ``"k,v"``) kept at 0; the others carry the whole budget. ``reverse``: lower
    metric is pruned more (for teaching and ablation).

    A NaN metric (no fit) takes its block's mean and is reported in ``warnings``; a block
    without any finite metric is an error. Block means use every matrix of the block; the
    min and max of the tau map (and of OWL's D, and the mean of its d) are taken over the
    prunable matrices, so those span [1 - eps, 1 + eps].
    """
    sparsity = _check_number("sparsity", sparsity, 0.0, 1.0, hi_open=True,
                             hint="give the target fraction of pruned weights, e.g. 0.7")
    epsilon = _check_number("epsilon", epsilon, 0.0, 1.0, hi_open=True,
                            hint="use a value such as 0.2-0.5 (the paper's tuned range), or 0 for uniform")
    r_max = _check_number("r_max", r_max, 0.0, 1.0, lo_open=True, hi_open=True,
                          hint="use a bound below 1 such as the default 0.99")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping={mapping!r} is unknown; use one of {', '.join(MAPPINGS)}")
    if not isinstance(reverse, (bool, np.bool_)):
        raise ValueError(f"reverse={reverse!r} must be True or False")
    owl_lambda = _check_number("owl_lambda", owl_lambda, 0.0, 1.0, hi_open=True,
                               hint="use OWL's value 0.08 (block sparsities span S - lambda .. S + lambda)")
    if sparsity > r_max:
        raise ValueError(f"sparsity={sparsity:g} is above r_max={r_max:g}: no matrix may be pruned beyond r_max, "
                         "so the mean cannot reach the target; lower sparsity or raise r_max")

    if method == "sensitivity":
        metric = SENSITIVITY_COLUMN
        if not isinstance(table, pd.DataFrame) or metric not in table.columns:
            raise ValueError("method='sensitivity' needs the measured sensitivities as a delta_loss column; measure "
                             "them with `spectrascope sensitivity` (core.sensitivity)")
    cols, names, params, values = _columns(table, metric, need_metric=method in SCORED)
    kinds = cols["kind"].to_numpy(dtype=object)
    dense_kinds = _dense_kinds(dense_kinds, kinds)
    codes, block_ids = pd.factorize(cols["block"].to_numpy(), sort=False)
    n_blocks = len(block_ids)

    warnings: list[str] = []
    filled = np.zeros(len(names), dtype=bool)
    if method in SCORED:
        values, filled = _fill_missing(values, codes, block_ids, metric)
        if filled.any():
            warnings.append(f"{int(filled.sum())} matrices have no {metric} (NaN) and took their block's mean: "
                            + _some(names[filled]))
    elif method == "owl":
        per_block = _block_scores(owl_scores, block_ids)
        values, metric = per_block[codes], "outlier_share"
    if method not in SCORED:
        epsilon, reverse = 0.0, False

    dense = np.isin(kinds, dense_kinds) if dense_kinds else np.zeros(len(names), dtype=bool)
    prunable = ~dense
    n = params.astype(np.float64)
    n_total = float(n.sum())
    n_prunable = float(n[prunable].sum())
    if not prunable.any():
        raise ValueError(f"dense_kinds={','.join(dense_kinds)} covers every kind in the table, which leaves nothing "
                         "to prune; keep at least one kind prunable")
    target = sparsity * n_total  # sum of n_i r_i over the prunable matrices
    _check_budget(sparsity, r_max, dense_kinds, n_prunable, n_total)

    q = np.ones(len(names))
    if method in SCORED and epsilon > 0.0:
        score = values
        if mapping == "block":
            sums = np.bincount(codes, weights=values, minlength=n_blocks)
            score = (sums / np.bincount(codes, minlength=n_blocks))[codes]
        q = _tau_map(score, prunable, epsilon, reverse != (method == "sensitivity"))
    elif method == "owl":  # _tau_map gives d + (1 - lambda); the constant goes with the mean
        d = _tau_map(values, prunable, owl_lambda, False)
        q = np.maximum(sparsity - (d - float(n[prunable] @ d[prunable]) / n_prunable), 0.0)

    ratio = np.zeros(len(names))
    clipped = np.zeros(len(names), dtype=bool)
    ratio[prunable], clipped[prunable] = _water_fill(q[prunable], n[prunable], target, r_max)
    weighted_mean = float(n @ ratio) / n_total
    weighted_mean = sparsity if abs(weighted_mean - sparsity) < _MEAN_ATOL else weighted_mean  # rounding noise
    if abs(weighted_mean - sparsity) > 1e-9:  # OWL ratios raised to 0 cannot take any of the budget
        raise ValueError(f"sparsity={sparsity:g} cannot be reached with r_max={r_max:g}: the matrices that may take "
                         f"more are all at r_max (mean {weighted_mean:.4f}); raise r_max or lower owl_lambda")
    n_clipped = int(clipped.sum())
    if n_clipped:
        logger.info("%d matrices reached r_max=%g; their excess went to the others", n_clipped, r_max)
    for w in warnings:
        logger.warning(w)

    details = {}
    if method == "owl":
        details = {"lambda": owl_lambda, "scores": dict(zip(map(str, block_ids.tolist()), per_block.tolist()))}
    # from the input's own column arrays (dtype kept): rebuilding string columns from objects is slow
    ratios = pd.DataFrame({"name": cols["name"].array, "block": cols["block"].array, "kind": cols["kind"].array,
                           "params": cols["params"].array, "metric": values, "ratio": ratio,
                           "clipped": clipped, "filled": filled}, copy=True)
    return Allocation(ratios=ratios, sparsity=sparsity, method=method, metric=metric, mapping=mapping,
                      epsilon=epsilon, r_max=r_max, dense_kinds=dense_kinds, reverse=bool(reverse),
                      weighted_mean=weighted_mean, n_clipped=n_clipped, n_filled=int(filled.sum()),
                      warnings=tuple(warnings), details=details)


def _check_budget(sparsity: float, r_max: float, dense_kinds: tuple[str, ...], n_prunable: float,
                  n_total: float) -> None:
    if sparsity * n_total > r_max * n_prunable:
        reachable = r_max * n_prunable / n_total
        raise ValueError(f"sparsity={sparsity:g} cannot be reached with dense_kinds={','.join(dense_kinds)} and "
                         f"r_max={r_max:g}: the other matrices hold {n_prunable / n_total:.1%} of the parameters, so "
                         f"at most {reachable:.4f} is reachable; lower sparsity, raise r_max or keep fewer kinds dense")


def check_reachable(table: pd.DataFrame, *, sparsity: float, dense_kinds: Iterable[str] | str = (),
                    r_max: float | None = None) -> None:
    """Refuse, before any work, a target ``sparsity`` that no allocation of ``table``'s matrices
    (name, block, kind, params: :func:`matrix_table` or an analysis table) can reach: with
    ``dense_kinds`` kept at 0 and no ratio above ``r_max``, the other matrices cannot carry the
    mean (``allocate`` raises the same error, but only after the metrics or scores it needs)."""
    r_max = DEFAULT_R_MAX if r_max is None else r_max
    cols, names, params, _ = _columns(table, None, need_metric=False)
    kinds = _dense_kinds(dense_kinds, cols["kind"].to_numpy(dtype=object))
    n = params.astype(np.float64)
    dense = np.isin(cols["kind"].to_numpy(dtype=object), kinds) if kinds else np.zeros(len(n), dtype=bool)
    if dense.all():
        raise ValueError(f"dense_kinds={','.join(kinds)} covers every kind in the table, which leaves nothing "
                         "to prune; keep at least one kind prunable")
    _check_budget(float(sparsity), float(r_max), kinds, float(n[~dense].sum()), float(n.sum()))


def _tau_map(score: np.ndarray, prunable: np.ndarray, epsilon: float, reverse: bool) -> np.ndarray:
    """q = (1 - eps) + 2 eps (m - min) / (max - min), min and max over the prunable matrices;
    reversed: (max - m) instead of (m - min). All-equal scores give q = 1."""
    live = score[prunable]
    lo, hi = float(live.min()), float(live.max())
    if hi - lo <= _EQUAL_RTOL * max(abs(lo), abs(hi)):
        return np.ones(len(score))
    shifted = (hi - score) if reverse else (score - lo)
    return (1.0 - epsilon) + 2.0 * epsilon * shifted / (hi - lo)


def _water_fill(q: np.ndarray, n: np.ndarray, target: float, r_max: float) -> tuple[np.ndarray, np.ndarray]:
    """r = c q with sum(n r) = target and r <= r_max: matrices over r_max are pinned there and
    c is recomputed for the rest until none is over. The pinned set only grows (c only
    rises), so there are at most as many passes as distinct q values, in practice 2-4 on the
    LLaMA profiles. Needs q >= 0 (those at 0 stay at 0) and target <= r_max sum(n)."""
    nq = n * q
    clipped = np.zeros(len(q), dtype=bool)
    while True:
        free_nq = float(nq[~clipped].sum())
        budget = max(target - r_max * float(n[clipped].sum()), 0.0)
        r = q * (budget / free_nq) if free_nq > 0.0 else np.zeros(len(q))
        over = (r > r_max) & ~clipped
        if not over.any():
            break
        clipped |= over
    r[clipped] = r_max
    return r, clipped


def ratios_from_file(path: str | os.PathLike, table: pd.DataFrame) -> Allocation:
    """The ratios of a CSV with columns name and ratio (``Allocation.to_csv``, ``spectrascope
    allocate --out``, the dashboard's download) for exactly the matrices of ``table`` (name,
    block, kind, params: :func:`matrix_table`); refusals: ``ratiofile.read_ratio_file``.
    ``sparsity`` is the file's parameter-weighted mean."""
    cols, names, params, _ = _columns(table, None, need_metric=False)
    file = read_ratio_file(path, names.tolist())
    n = params.astype(np.float64)
    mean = float(n @ file.ratios) / float(n.sum())
    ratios = pd.DataFrame({**{c: cols[c].array for c in REQUIRED_COLUMNS}, "metric": np.nan, "ratio": file.ratios,
                           "clipped": False, "filled": False}, copy=True)
    return Allocation(ratios=ratios, sparsity=mean, method="file", metric="", mapping="", epsilon=0.0, r_max=1.0,
                      dense_kinds=(), reverse=False, weighted_mean=mean, n_clipped=0, n_filled=0,
                      details={"path": str(file.path), "sha256": file.sha256})


# --- validation ------------------------------------------------------------------------

def _check_number(name: str, value: object, lo: float, hi: float, *, lo_open: bool = False,
                  hi_open: bool = False, hint: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}={value!r} must be a number; {hint}")
    x = float(value)
    low_ok = x > lo if lo_open else x >= lo
    high_ok = x < hi if hi_open else x <= hi
    if not (math.isfinite(x) and low_ok and high_ok):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name}={value!r} is outside {interval}; {hint}")
    return x


def _columns(table: pd.DataFrame, metric: str | None, *, need_metric: bool
             ) -> tuple[dict[str, pd.Series], np.ndarray, np.ndarray, np.ndarray]:
    """The columns name, block, kind, params and (if present) metric of ``table``, checked;
    with the names, the parameter counts and the metric values (NaN if absent) as arrays.
    Each column is taken once: ``table[col]`` costs tens of microseconds (slider moves)."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"table must be a pandas DataFrame (the output of `spectrascope analyze`), "
                         f"not {type(table).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if need_metric and metric not in table.columns:
        missing.append(metric)
    if missing:
        hint = " (metric=... names the score column)" if metric in missing else ""
        raise ValueError(f"table lacks column(s) {', '.join(missing)}{hint}; it needs "
                         f"{', '.join(REQUIRED_COLUMNS)} and the metric column, as written by `spectrascope analyze`")
    if len(table) == 0:
        raise ValueError("table has no rows; give at least one matrix")
    cols = {c: table[c] for c in (*REQUIRED_COLUMNS, metric) if c in table.columns}
    if not pd.api.types.is_integer_dtype(cols["block"].dtype):
        raise ValueError("table column 'block' must hold integers (the transformer block index of each matrix)")
    if not pd.api.types.is_integer_dtype(cols["params"].dtype):
        raise ValueError("table column 'params' must hold integers (the number of weights of each matrix)")
    names = cols["name"].to_numpy(dtype=object)
    if pd.isna(names).any() or pd.isna(cols["kind"].to_numpy(dtype=object)).any():
        raise ValueError("table columns 'name' and 'kind' must not have missing values")
    if len(set(names.tolist())) != len(names):
        dup = pd.unique(names[pd.Series(names).duplicated().to_numpy()])
        raise ValueError(f"table column 'name' must be unique; repeated: {_some(dup)}")
    params = cols["params"].to_numpy(dtype=np.int64)
    if (params <= 0).any():
        raise ValueError(f"table column 'params' must be positive; check {_some(names[params <= 0])}")
    if metric in cols:
        col = cols[metric]
        if pd.api.types.is_bool_dtype(col.dtype) or not pd.api.types.is_numeric_dtype(col.dtype):
            raise ValueError(f"metric={metric!r}: column {metric!r} is not numeric; choose a numeric column")
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
        if need_metric and np.isinf(values).any():
            raise ValueError(f"metric={metric!r} is infinite for {_some(names[np.isinf(values)])}; "
                             "set those entries to NaN (no fit) or choose another metric")
    else:
        values = np.full(len(names), np.nan)
    return cols, names, params, values


def _dense_kinds(dense_kinds: Iterable[str] | str, kinds: np.ndarray) -> tuple[str, ...]:
    if isinstance(dense_kinds, str):
        dense_kinds = dense_kinds.split(",")
    wanted = tuple(dict.fromkeys(str(k).strip() for k in dense_kinds if str(k).strip()))
    present = set(kinds.tolist())
    unknown = [k for k in wanted if k not in present]
    if unknown:
        raise ValueError(f"dense_kinds names {', '.join(unknown)}, which the table does not have; "
                         f"its kinds are {', '.join(sorted(present))}")
    return wanted


def _block_scores(owl_scores: Mapping[int, float] | None, block_ids: np.ndarray) -> np.ndarray:
    """OWL's outlier share of each block in ``block_ids`` order; keys may be ints or their strings."""
    if owl_scores is None:
        raise ValueError("method='owl' needs owl_scores ({block: outlier share}); compute them with "
                         "core.pruning.owl_scores on calibration text")
    try:
        scores = {int(b): float(v) for b, v in dict(owl_scores).items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"owl_scores must map block numbers to numbers ({exc}); use core.pruning.owl_scores") from None
    missing = [b for b in block_ids.tolist() if b not in scores]
    if missing:
        raise ValueError(f"owl_scores has no score for block(s) {_some(np.array(missing))}; compute them for the "
                         "same model")
    per_block = np.array([scores[b] for b in block_ids.tolist()], dtype=np.float64)
    if not np.isfinite(per_block).all():
        raise ValueError(f"owl_scores is not finite for block(s) {_some(block_ids[~np.isfinite(per_block)])}; "
                         "recompute them")
    return per_block


def _fill_missing(values: np.ndarray, codes: np.ndarray, block_ids: np.ndarray,
                  metric: str) -> tuple[np.ndarray, np.ndarray]:
    """NaN metrics replaced by their block's mean; a block without any value is an error."""
    missing = np.isnan(values)
    if not missing.any():
        return values, missing
    ok = ~missing
    sums = np.bincount(codes[ok], weights=values[ok], minlength=len(block_ids))
    counts = np.bincount(codes[ok], minlength=len(block_ids))
    if (counts == 0).any():
        bad = ", ".join(str(b) for b in block_ids[counts == 0])
        raise ValueError(f"block(s) {bad} have no {metric} value at all (every fit failed); drop or re-analyse "
                         f"those blocks, choose another metric, or use method='uniform'")
    values = values.copy()
    values[missing] = (sums / np.maximum(counts, 1))[codes[missing]]
    return values, missing
