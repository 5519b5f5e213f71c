"""Recorded runs: the SQLite registry, atomic saving, and the prune / eval / sweep /
tune-epsilon pipelines that the CLI and the dashboard call.

Registry (``$SPECTRASCOPE_HOME/runs.sqlite``): one row per run in ``runs`` (kind prune or
eval; model identity, method, allocation and its parameters, calibration settings,
perplexity, timings, software versions, status running/done/failed/cancelled with the
error) and one row per matrix in ``matrices`` (requested ratio, achieved sparsity). The
schema is versioned (``schema_version``); WAL mode and a busy timeout make two processes
writing at once safe; every write is one short transaction.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import pandas as pd

from .config import atomic_dir, home
from .progress import Cancelled, Progress

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("running", "done", "failed", "cancelled")
REPORT_NAME = "spectrascope_report.json"
ALLOCATIONS = ("uniform", "alpha", "owl")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,                -- prune | eval
    status TEXT NOT NULL,              -- running | done | failed | cancelled
    error TEXT,
    model TEXT, model_identity TEXT,
    method TEXT, allocation TEXT, sparsity REAL, epsilon REAL, mapping TEXT, nm TEXT,
    allocation_params TEXT,            -- JSON
    calibration TEXT,                  -- JSON: dataset, nsamples, seqlen, seed
    achieved_sparsity REAL,
    eval_dataset TEXT, eval_seqlen INTEGER, eval_windows INTEGER,
    perplexity REAL, tokens_per_second REAL,
    prune_seconds REAL, eval_seconds REAL,
    device TEXT, dtype TEXT, output_dir TEXT,
    versions TEXT,                     -- JSON
    started_at REAL NOT NULL, finished_at REAL
);
CREATE TABLE IF NOT EXISTS matrices (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name TEXT NOT NULL, block INTEGER, kind TEXT, params INTEGER, ratio REAL, achieved REAL,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX IF NOT EXISTS runs_model ON runs(model_identity, kind, status);
"""

_RUN_COLUMNS = ("kind", "status", "error", "model", "model_identity", "method", "allocation", "sparsity", "epsilon",
                "mapping", "nm", "allocation_params", "calibration", "achieved_sparsity", "eval_dataset",
                "eval_seqlen", "eval_windows", "perplexity", "tokens_per_second", "prune_seconds", "eval_seconds",
                "device", "dtype", "output_dir", "versions", "started_at", "finished_at")
_JSON_COLUMNS = ("allocation_params", "calibration", "versions")


def software_versions() -> dict:
    import numpy
    import torch
    import transformers

    try:
        from importlib.metadata import version
        spectrascope = version("spectrascope")
    except Exception:  # not installed as a package
        spectrascope = "dev"
    return {"spectrascope": spectrascope, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__, "pandas": pd.__version__}


class Registry:
    """The runs database. ``Registry()`` uses ``$SPECTRASCOPE_HOME/runs.sqlite``."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else home() / "runs.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=60)
        try:
            con.execute("PRAGMA busy_timeout = 60000")
            con.execute("PRAGMA journal_mode = WAL")
            con.executescript(_SCHEMA)   # IF NOT EXISTS: safe when two processes open at once
        finally:
            con.close()
        with self._connect() as con:
            row = con.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise ValueError(f"{self.path} has schema version {row[0]}, newer than this Spectrascope "
                                 f"({SCHEMA_VERSION}); upgrade Spectrascope or use another SPECTRASCOPE_HOME")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            con.execute("PRAGMA busy_timeout = 60000")
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        finally:
            con.close()

    @staticmethod
    def _encode(fields: Mapping[str, object]) -> dict:
        bad = sorted(set(fields) - set(_RUN_COLUMNS))
        if bad:
            raise ValueError(f"fields {bad} are not run columns; known: {', '.join(_RUN_COLUMNS)}")
        out = {}
        for k, v in fields.items():
            out[k] = json.dumps(v, sort_keys=True) if k in _JSON_COLUMNS and v is not None else v
        return out

    def start(self, kind: str, **fields: object) -> int:
        """Insert a ``running`` run and return its id."""
        if kind not in ("prune", "eval"):
            raise ValueError(f"kind={kind!r}: use 'prune' or 'eval'")
        row = self._encode({"versions": software_versions(), **fields, "kind": kind, "status": "running",
                            "started_at": time.time()})
        with self._connect() as con:
            cur = con.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                              tuple(row.values()))
            return int(cur.lastrowid)

    def update(self, run_id: int, **fields: object) -> None:
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"status={fields['status']!r}: use one of {', '.join(STATUSES)}")
        row = self._encode(fields)
        if not row:
            return
        with self._connect() as con:
            con.execute(f"UPDATE runs SET {', '.join(k + ' = ?' for k in row)} WHERE id = ?",
                        (*row.values(), run_id))

    def finish(self, run_id: int, status: str = "done", *, error: str | None = None, **fields: object) -> None:
        self.update(run_id, status=status, error=error, finished_at=time.time(), **fields)

    def add_matrices(self, run_id: int, table: pd.DataFrame) -> None:
        """Per-matrix rows (columns name, block, kind, params, ratio, achieved)."""
        rows = [(run_id, r.name, int(r.block), str(r.kind), int(r.params), float(r.ratio), float(r.achieved))
                for r in table.itertuples(index=False)]
        with self._connect() as con:
            con.executemany("INSERT OR REPLACE INTO matrices VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    @contextmanager
    def record(self, kind: str, **fields: object) -> Iterator[int]:
        """``with registry.record("prune", ...) as run_id:`` marks the run done on success,
        cancelled on ``Cancelled``/``KeyboardInterrupt``, failed (with the error) otherwise."""

        run_id = self.start(kind, **fields)
        try:
            yield run_id
        except (Cancelled, KeyboardInterrupt) as exc:
            self.finish(run_id, "cancelled", error=str(exc) or type(exc).__name__)
            raise
        except BaseException as exc:
            self.finish(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        else:
            if self.get(run_id)["status"] == "running":
                self.finish(run_id, "done")

    def get(self, run_id: int) -> dict:
        table = self.query(ids=[run_id])
        if table.empty:
            raise ValueError(f"run_id={run_id}: no such run in {self.path}")
        return table.iloc[0].to_dict()

    def matrices(self, run_id: int) -> pd.DataFrame:
        con = sqlite3.connect(self.path, timeout=60)
        try:
            return pd.read_sql_query("SELECT name, block, kind, params, ratio, achieved FROM matrices "
                                     "WHERE run_id = ? ORDER BY rowid", con, params=(run_id,))
        finally:
            con.close()

    def query(self, *, ids: list[int] | None = None, kind: str | None = None, status: str | None = "",
              model_identity: str | None = None, method: str | None = None, allocation: str | None = None
              ) -> pd.DataFrame:
        """Runs as a DataFrame (newest last), filtered by the given fields (JSON decoded)."""
        where, params = [], []
        for col, value in (("kind", kind), ("model_identity", model_identity), ("method", method),
                           ("allocation", allocation), ("status", status or None)):
            if value is not None:
                where.append(f"{col} = ?")
                params.append(value)
        if ids is not None:
            where.append(f"id IN ({', '.join('?' * len(ids))})")
            params += list(ids)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        con = sqlite3.connect(self.path, timeout=60)
        try:
            table = pd.read_sql_query(sql, con, params=params)
        finally:
            con.close()
        for col in _JSON_COLUMNS:
            table[col] = table[col].map(lambda v: json.loads(v) if isinstance(v, str) else v)
        return table

    def compare(self, *, model_identity: str | None = None) -> pd.DataFrame:
        """Finished prune and eval runs with a perplexity: one row each, for comparison tables."""
        t = self.query(status="done", model_identity=model_identity)
        t = t[t["perplexity"].notna()]
        cols = ["id", "kind", "model", "method", "allocation", "sparsity", "epsilon", "nm", "achieved_sparsity",
                "eval_dataset", "perplexity", "prune_seconds", "eval_seconds"]
        return t.loc[:, cols].reset_index(drop=True)


# --- saving ------------------------------------------------------------------------------

def save_model(loaded, dest: str | os.PathLike, report: dict) -> Path:
    """Write a Hugging Face folder (safetensors, config, tokenizer, ``spectrascope_report.json``)
    atomically: everything goes into a temporary folder next to ``dest`` that is renamed at
    the end, so an interrupted run leaves nothing. ``dest`` must not exist and must not be
    (inside) the folder the model was loaded from."""
    dest = Path(dest).expanduser().resolve()
    if dest.exists():
        raise ValueError(f"save={dest}: already exists; choose a new folder (nothing is overwritten)")
    if loaded.path is not None:
        src = Path(loaded.path).resolve()
        if dest == src or src in dest.parents:
            raise ValueError(f"save={dest}: inside the source model's folder {src}; the source is never touched")
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"save={dest}: folder {dest.parent} does not exist; create it first")

    def write(tmp: Path) -> None:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True, default=str))

    atomic_dir(dest, write)
    log.info("saved pruned model to %s", dest)
    return dest


# --- pipelines ---------------------------------------------------------------------------

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
    perplexity: object | None = None    # evaluation.Perplexity
    output_dir: Path | None = None
    calibration: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        ppl = self.perplexity
        return {"run_id": self.run_id, "method": self.method, "allocation": self.allocation,
                "sparsity": self.sparsity, "epsilon": self.epsilon, "nm": self.nm,
                "achieved_sparsity": self.achieved, "prune_seconds": self.prune_seconds,
                "calibration": self.calibration, "output_dir": str(self.output_dir) if self.output_dir else None,
                "perplexity": ppl.to_dict() if ppl is not None else None}


def layer_ratios(loaded, *, allocation: str, sparsity: float, epsilon: float | None = None,
                 mapping: str = "block", calibration: object = None, owl: Mapping[int, float] | None = None,
                 metrics: pd.DataFrame | None = None, lam: float | None = None, device: str = "auto",
                 options: Mapping[str, object] | None = None, progress: Progress = None,
                 cancel: object = None) -> tuple[dict[str, float], dict]:
    """Per-matrix ratios for ``allocation`` (uniform, alpha, owl) and the parameters used.
    ``owl``: precomputed OWL block scores (``pruning.owl_scores``) to reuse across runs;
    ``metrics``: a precomputed analysis table (``analyze(...).table``) for ``alpha``;
    ``options``: further ``allocation.allocate`` keywords for ``alpha`` (metric, r_max,
    dense_kinds, reverse)."""
    from .pruning import OWL_LAMBDA, OWL_M, owl_ratios, owl_scores

    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} is unknown; use one of {', '.join(ALLOCATIONS)}")
    if not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity={sparsity!r}: give a fraction in [0, 1), e.g. 0.7")
    if allocation == "uniform":
        return {m.name: float(sparsity) for m in loaded.matrices}, {}
    if allocation == "owl":
        if owl is None:
            owl = owl_scores(loaded, calibration, device=device, progress=progress, cancel=cancel)
        lam = OWL_LAMBDA if lam is None else lam
        table = owl_ratios(loaded, owl, sparsity=sparsity, lam=lam)
        return dict(zip(table["name"], table["ratio"])), {"lambda": lam, "M": OWL_M}
    from .allocation import DEFAULT_EPSILON, allocate
    from .analysis import analyze

    if metrics is None:
        metrics = analyze(loaded, device=device, progress=progress).table
    names = {m.name for m in loaded.matrices}
    if set(metrics["name"]) != names:
        raise ValueError(f"metrics: the table's matrix names do not match the model's ({len(names)} matrices); "
                         "analyze the same model")
    eps = DEFAULT_EPSILON if epsilon is None else epsilon
    options = {"metric": "alpha", **(options or {})}
    alloc = allocate(metrics, sparsity=sparsity, method="alpha", mapping=mapping, epsilon=eps, **options)
    return alloc.ratio_by_name(), {"epsilon": eps, "mapping": mapping, **options}


def read_ratios(path: str | os.PathLike, loaded) -> dict[str, float]:
    """Per-matrix ratios from a CSV with columns name and ratio (``spectrascope allocate --out``
    or the dashboard's Allocation page); every prunable matrix of ``loaded`` must be there."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ratios file not found: {path}; write one with `spectrascope allocate --out`")
    table = pd.read_csv(path)
    if not {"name", "ratio"} <= set(table.columns):
        raise ValueError(f"{path} needs the columns name and ratio (it has {', '.join(map(str, table.columns))})")
    ratios = dict(zip(table["name"].astype(str), table["ratio"].astype(float)))
    missing = [m.name for m in loaded.matrices if m.name not in ratios]
    if missing:
        raise ValueError(f"{path} has no ratio for {len(missing)} of the model's matrices (first: {missing[0]}); "
                         "allocate for the same model")
    bad = {k: v for k, v in ratios.items() if not 0.0 <= v < 1.0}
    if bad:
        name, value = next(iter(bad.items()))
        raise ValueError(f"{path}: ratio {value} of {name} is outside [0, 1)")
    return {m.name: ratios[m.name] for m in loaded.matrices}


def prune_and_eval(loaded, *, method: str, allocation: str = "uniform", sparsity: float = 0.5,
                   epsilon: float | None = None, mapping: str = "block", nm: str | None = None,
                   calibration: object = None, evaluate: bool = False, eval_dataset: str = "wiki",
                   eval_seqlen: int = 2048, max_windows: int | None = None, save: str | os.PathLike | None = None,
                   device: str = "auto", registry: Registry | None = None, owl: Mapping[int, float] | None = None,
                   metrics: pd.DataFrame | None = None, ratios: Mapping[str, float] | None = None,
                   options: Mapping[str, object] | None = None, progress: Progress = None,
                   cancel: object = None) -> RunResult:
    """Prune a copy of ``loaded`` (the original stays dense), optionally evaluate and save it,
    and record the run (``registry``; ``None`` uses the default database). ``ratios`` gives the
    per-matrix ratios directly (e.g. ``read_ratios``); then ``allocation`` only labels the run.
    ``options``: further ``allocate`` keywords for ``alpha``."""
    from .evaluation import perplexity
    from .pruning import prune

    if save is not None and Path(save).expanduser().exists():
        raise ValueError(f"save={save}: already exists; choose a new folder (nothing is overwritten)")
    registry = registry or Registry()
    calib = calibration.settings() if hasattr(calibration, "settings") else {}
    fields = {"model": loaded.source, "model_identity": loaded.identity, "method": method,
              "allocation": "n:m" if nm else allocation, "sparsity": None if nm else float(sparsity),
              "epsilon": epsilon if allocation == "alpha" and not nm else None, "mapping": mapping, "nm": nm,
              "calibration": calib if method != "magnitude" or allocation == "owl" else None, "device": str(device),
              "dtype": loaded.dtype_name,
              "output_dir": str(save) if save else None}
    with registry.record("prune", **fields) as run_id:
        if nm:
            ratios, params = {}, {}
        elif ratios is not None:
            ratios, params = dict(ratios), {"source": "given ratios"}
        else:
            ratios, params = layer_ratios(
                loaded, allocation=allocation, sparsity=sparsity, epsilon=epsilon, mapping=mapping,
                calibration=calibration, owl=owl, metrics=metrics, device=device, options=options,
                progress=progress, cancel=cancel)
        registry.update(run_id, allocation_params=params)
        result = prune(loaded, ratios or None, method=method, calibration=calibration, nm=nm, device=device,
                       copy=True, progress=progress, cancel=cancel)
        registry.add_matrices(run_id, result.matrices)
        registry.update(run_id, achieved_sparsity=result.sparsity, prune_seconds=result.seconds)
        ppl = None
        if evaluate:
            ppl = perplexity(result.model, dataset=eval_dataset, seqlen=eval_seqlen, max_windows=max_windows,
                             device=device, progress=progress, cancel=cancel)
            registry.update(run_id, eval_dataset=ppl.dataset, eval_seqlen=ppl.seqlen, eval_windows=ppl.windows,
                            perplexity=ppl.perplexity, tokens_per_second=ppl.tokens_per_second,
                            eval_seconds=ppl.seconds)
        out = RunResult(run_id, method, fields["allocation"], result.sparsity if nm else float(sparsity),
                        fields["epsilon"], nm, result.matrices, result.sparsity, result.seconds, ppl, None, calib)
        if save:
            report = {**out.to_dict(), "output_dir": str(Path(save).expanduser().resolve()), "model": loaded.source, "model_identity": loaded.identity,
                      "allocation_params": params, "versions": software_versions(),
                      "matrices": result.matrices.to_dict(orient="records")}
            out.output_dir = save_model(result.model, save, report)
        del result
    return out


def eval_run(loaded, *, dataset: str = "wiki", seqlen: int = 2048, max_windows: int | None = None,
             device: str = "auto", registry: Registry | None = None, progress: Progress = None,
             cancel: object = None):
    """Perplexity of ``loaded`` as it is, recorded as an ``eval`` run."""
    from .evaluation import perplexity

    registry = registry or Registry()
    with registry.record("eval", model=loaded.source, model_identity=loaded.identity, method="dense",
                         device=str(device),
                         dtype=loaded.dtype_name) as run_id:
        ppl = perplexity(loaded, dataset=dataset, seqlen=seqlen, max_windows=max_windows, device=device,
                         progress=progress, cancel=cancel)
        registry.update(run_id, eval_dataset=ppl.dataset, eval_seqlen=ppl.seqlen, eval_windows=ppl.windows,
                        perplexity=ppl.perplexity, tokens_per_second=ppl.tokens_per_second, eval_seconds=ppl.seconds)
    return run_id, ppl


# --- sweep and epsilon tuning ---------------------------------------------------------------

SWEEP_COLUMNS = ["method", "allocation", "sparsity", "epsilon", "achieved", "perplexity", "prune_seconds",
                 "eval_seconds", "run_id"]


def _alpha_metrics(loaded, device: str, progress: Progress) -> pd.DataFrame:
    from .analysis import analyze

    return analyze(loaded, device=device, progress=progress).table


def sweep(loaded, *, methods: list[str], allocations: list[str], sparsities: list[float],
          epsilons: list[float] | Mapping[str, list[float]] | None = None, calibration: object = None,
          eval_dataset: str = "wiki",
          eval_seqlen: int = 2048, max_windows: int | None = None, dense: bool = True, device: str = "auto",
          registry: Registry | None = None, metrics: pd.DataFrame | None = None, progress: Progress = None,
          cancel: object = None) -> pd.DataFrame:
    """Every method x allocation x sparsity (x epsilon for ``alpha``), pruned from the same dense
    model, evaluated, recorded; returns one comparison table (``SWEEP_COLUMNS``), dense first.

    ``epsilons``: one list for every method, or ``{method: list}`` (each method with the
    epsilon tuned for it; a method left out gets the default epsilon)."""
    from .pruning import METHODS, owl_scores

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: {m!r} is unknown; use {', '.join(METHODS)}")
    for a in allocations:
        if a not in ALLOCATIONS:
            raise ValueError(f"allocations: {a!r} is unknown; use {', '.join(ALLOCATIONS)}")
    registry = registry or Registry()
    rows = []
    if dense:
        run_id, ppl = eval_run(loaded, dataset=eval_dataset, seqlen=eval_seqlen, max_windows=max_windows,
                               device=device, registry=registry, progress=progress, cancel=cancel)
        rows.append({"method": "dense", "allocation": "-", "sparsity": 0.0, "epsilon": None, "achieved": 0.0,
                     "perplexity": ppl.perplexity, "prune_seconds": 0.0, "eval_seconds": ppl.seconds,
                     "run_id": run_id})
    owl = owl_scores(loaded, calibration, device=device, progress=progress, cancel=cancel) \
        if "owl" in allocations else None
    if "alpha" in allocations and metrics is None:
        metrics = _alpha_metrics(loaded, device, progress)
    grid = []
    for method in methods:
        for allocation in allocations:
            for s in sparsities:
                eps_list = (epsilons.get(method) if isinstance(epsilons, Mapping) else epsilons) or [None]
                for eps in eps_list if allocation == "alpha" else [None]:
                    grid.append((method, allocation, float(s), eps))
    for method, allocation, s, eps in grid:
        log.info("sweep: %s %s S=%g eps=%s", method, allocation, s, eps)
        run = prune_and_eval(loaded, method=method, allocation=allocation, sparsity=s, epsilon=eps,
                             calibration=calibration if method != "magnitude" or allocation == "owl" else None,
                             evaluate=True, eval_dataset=eval_dataset, eval_seqlen=eval_seqlen,
                             max_windows=max_windows, device=device, registry=registry, owl=owl, metrics=metrics,
                             progress=progress, cancel=cancel)
        rows.append({"method": method, "allocation": allocation, "sparsity": s, "epsilon": run.epsilon,
                     "achieved": run.achieved, "perplexity": run.perplexity.perplexity,
                     "prune_seconds": run.prune_seconds, "eval_seconds": run.perplexity.seconds,
                     "run_id": run.run_id})
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


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


def tune_epsilon(loaded, *, method: str = "wanda", sparsity: float = 0.7, epsilons: list[float] | None = None,
                 dataset: str = "wiki", nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                 holdout: float = 0.1, holdout_windows: int | None = 16, mapping: str = "block",
                 device: str = "auto", registry: Registry | None = None, metrics: pd.DataFrame | None = None,
                 progress: Progress = None, cancel: object = None) -> EpsilonTuning:
    """Pick AlphaPruning's epsilon from ``epsilons`` by perplexity on held-out calibration text.

    The calibration split of ``dataset`` is tokenized and cut in two: calibration windows are
    drawn from the first ``1 - holdout`` of the tokens, the perplexity is measured on the
    last ``holdout`` (at most ``holdout_windows`` windows). The evaluation split is never read.
    """
    from .calibration import Calibration, cap_seqlen, sample_windows, tokenize
    from .evaluation import perplexity
    from .pruning import prune
    from .texts import load_text

    if not (0.0 < holdout < 0.5):
        raise ValueError(f"holdout={holdout!r}: give the held-out share of the calibration text, e.g. 0.1")
    epsilons = list(epsilons) if epsilons else [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    for e in epsilons:
        if not (0.0 <= e < 1.0):
            raise ValueError(f"epsilons: {e!r} is outside [0, 1)")
    seqlen = cap_seqlen(seqlen, loaded.model)
    ids = tokenize(loaded.tokenizer, load_text(dataset, split="calib"))
    cut = int(ids.numel() * (1 - holdout))
    calib = Calibration(sample_windows(ids[:cut], nsamples=nsamples, seqlen=seqlen, seed=seed), dataset, seed,
                        cut)
    held = ids[cut:]
    if metrics is None:
        metrics = _alpha_metrics(loaded, device, progress)
    rows = []
    for eps in epsilons:
        ratios, _ = layer_ratios(loaded, allocation="alpha", sparsity=sparsity, epsilon=eps, mapping=mapping,
                                 metrics=metrics, device=device)
        pruned = prune(loaded, ratios, method=method, calibration=calib if method != "magnitude" else None,
                       device=device, copy=True, progress=progress, cancel=cancel)
        ppl = perplexity(pruned.model, ids=held, seqlen=seqlen, max_windows=holdout_windows, device=device,
                         progress=progress, cancel=cancel)
        rows.append({"epsilon": eps, "perplexity": ppl.perplexity, "achieved": pruned.sparsity})
        del pruned
    table = pd.DataFrame(rows)
    best = float(table.loc[table["perplexity"].idxmin(), "epsilon"])
    return EpsilonTuning(best, table, method, float(sparsity), calib.settings(),
                         min(held.numel(), (holdout_windows or 10**9) * seqlen))
