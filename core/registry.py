"""The runs database (``$SPECTRASCOPE_HOME/runs.sqlite``): one row per recorded prune or
eval run and one row per pruned matrix; nothing here loads or prunes a model.

``runs``: kind prune or eval; model identity, method, allocation and its parameters,
calibration settings, perplexity, timings, software versions, status
running/done/failed/cancelled with the error. ``matrices``: requested ratio and achieved
sparsity per matrix. ``zeroshot``: a run's zero-shot scores, one row per task and metric.
The schema is versioned (``schema_version``; an older database is migrated in place by
``MIGRATIONS``, and columns kept outside the versioned tables, ``_ADDED_COLUMNS``, are added
when missing); WAL mode and a busy timeout make two processes writing at once safe; every
write is one short transaction.

A run's comparison key (``run_key``): model identity, evaluation text, seqlen, windows and
BOS, and for prune runs the calibration text, windows, seqlen, seed and BOS. Perplexities
are comparable only within one key; ``Registry.compare`` adds it, ``Registry.baseline``
finds the dense or uniform run of the same key.

Liveness: a run records its process (host, pid, start time) and a heartbeat renewed every
``HEARTBEAT_S`` while it runs; a ``running`` run whose process is gone is marked
``interrupted`` when the registry is read.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sqlite3
import threading
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator, Mapping

import numpy
import pandas as pd
import torch
import transformers

from .choices import STATUSES
from .config import home
from .liveness import HEARTBEAT_S, gone, this_process
from .progress import Cancelled
from .runkey import RunKey, missing, run_key

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

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
    calibration TEXT,                  -- JSON: dataset, nsamples, seqlen, seed, bos, bos_prepended
    calib_bos TEXT, calib_bos_prepended INTEGER,   -- requested BOS mode, whether BOS was prepended
    achieved_sparsity REAL,
    eval_dataset TEXT, eval_seqlen INTEGER, eval_windows INTEGER, eval_bos TEXT, eval_bos_prepended INTEGER,
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
CREATE TABLE IF NOT EXISTS zeroshot (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    task TEXT NOT NULL, metric TEXT NOT NULL, value REAL, stderr REAL, n INTEGER,
    harness_version TEXT, "limit" INTEGER,
    PRIMARY KEY (run_id, task, metric)
);
"""

#: Statements that bring a database of version ``v - 1`` to version ``v``.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE runs ADD COLUMN calib_bos TEXT", "ALTER TABLE runs ADD COLUMN calib_bos_prepended INTEGER",
        "ALTER TABLE runs ADD COLUMN eval_bos TEXT", "ALTER TABLE runs ADD COLUMN eval_bos_prepended INTEGER",
        # version 1 tokenized without special tokens: its windows never started with BOS
        "UPDATE runs SET eval_bos = 'none', eval_bos_prepended = 0 WHERE eval_seqlen IS NOT NULL",
        "UPDATE runs SET calib_bos = 'none', calib_bos_prepended = 0 WHERE calibration IS NOT NULL"),
}

_RUN_COLUMNS = ("kind", "status", "error", "model", "model_identity", "method", "allocation", "sparsity", "epsilon",
                "mapping", "nm", "allocation_params", "calibration", "calib_bos", "calib_bos_prepended",
                "achieved_sparsity", "eval_dataset", "eval_seqlen", "eval_windows", "eval_bos",
                "eval_bos_prepended", "perplexity", "tokens_per_second", "prune_seconds", "eval_seconds",
                "device", "dtype", "output_dir", "versions", "started_at", "finished_at")
#: Columns added after version 1's CREATE TABLE (name: SQL type), added to older databases on open.
_ADDED_COLUMNS = {"runs": {"host": "TEXT", "pid": "INTEGER", "process_start": "TEXT", "heartbeat_at": "REAL"}}
_RUN_COLUMNS += tuple(c for c in _ADDED_COLUMNS["runs"] if c not in _RUN_COLUMNS)
_JSON_COLUMNS = ("allocation_params", "calibration", "versions")
COMPARE_COLUMNS = ("id", "kind", "model", "model_identity", "method", "allocation", "sparsity", "epsilon", "nm",
                   "achieved_sparsity", "eval_dataset", "eval_seqlen", "eval_windows", "perplexity",
                   "prune_seconds", "eval_seconds", "output_dir", "eval_key", "key", "settings")
_BOOL_COLUMNS = ("calib_bos_prepended", "eval_bos_prepended")
BASELINES = ("dense", "uniform")


def software_versions() -> dict:
    """Versions of Spectrascope and the libraries whose behaviour a run's numbers depend on."""
    try:
        spectrascope = version("spectrascope")
    except PackageNotFoundError:  # run from a checkout, not installed as a package
        spectrascope = "dev"
    return {"spectrascope": spectrascope, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__, "pandas": pd.__version__}


def _unusable(path: Path, exc: sqlite3.Error) -> ValueError:
    """A one-line error naming the registry file that SQLite cannot use, and what to do."""
    fix = "or set SPECTRASCOPE_HOME to another folder"
    if path.is_dir():
        return ValueError(f"the runs registry {path} is a folder, not a database file; move it away {fix}")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return ValueError(f"the runs registry {path} cannot be read or written (permission denied); "
                          f"make it readable and writable {fix}")
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
        return ValueError(f"the runs registry {path} is not an SQLite database (damaged, or another file); "
                          f"move it aside (a new registry is then started) {fix}")
    return ValueError(f"the runs registry {path} cannot be used ({exc}); move it aside {fix}")


def _add_missing_columns(con: sqlite3.Connection) -> None:
    """``ALTER TABLE ADD COLUMN`` every column of ``_ADDED_COLUMNS`` that a table lacks."""
    for table, columns in _ADDED_COLUMNS.items():
        have = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
        for name, sql_type in columns.items():
            if name not in have:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")


class Registry:
    """The runs database. ``Registry()`` uses ``$SPECTRASCOPE_HOME/runs.sqlite``."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else home() / "runs.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open()
        except sqlite3.Error as exc:
            raise _unusable(self.path, exc) from exc

    def _open(self) -> None:
        con = sqlite3.connect(self.path, timeout=60)
        try:
            con.execute("PRAGMA busy_timeout = 60000")
            con.execute("PRAGMA journal_mode = WAL")
            con.executescript(_SCHEMA)   # IF NOT EXISTS: safe when two processes open at once
        finally:
            con.close()
        with self._connect() as con:   # one transaction: two processes never migrate twice
            row = con.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise ValueError(f"{self.path} has schema version {row[0]}, newer than this Spectrascope "
                                 f"({SCHEMA_VERSION}); upgrade Spectrascope or use another SPECTRASCOPE_HOME")
            elif row[0] < SCHEMA_VERSION:
                for version in range(row[0] + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[version]:
                        con.execute(statement)
                con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            _add_missing_columns(con)

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
                            "started_at": time.time(), **this_process()})
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
        stop = self.heartbeat(run_id)
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
        finally:
            stop.set()    # the heartbeat only touches running runs: harmless if it beats once more

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
        self.mark_interrupted()
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
        for col in _BOOL_COLUMNS:
            table[col] = table[col].map(lambda v: None if missing(v) else bool(v)).astype(object)
        return table

    def compare(self, *, model_identity: str | None = None) -> pd.DataFrame:
        """Finished prune and eval runs with a perplexity, oldest first: the rows of a comparison
        table (``COMPARE_COLUMNS``, with each run's ``run_key``; the dashboard's results table and
        plot read this). Compare perplexities only between rows of one ``key``."""
        t = self.query(status="done", model_identity=model_identity)
        t = t[t["perplexity"].notna()].reset_index(drop=True)
        keys = [run_key(row) for row in t.to_dict(orient="records")]
        for i, name in enumerate(RunKey._fields):
            t[name] = [k[i] for k in keys]
        return t.loc[:, list(COMPARE_COLUMNS)]

    def baseline(self, row_or_key: Mapping[str, object] | str, kind: str = "dense", *, method: str | None = None,
                 sparsity: float | None = None) -> dict | None:
        """The newest finished run to compare ``row_or_key`` (a row of ``compare``/``query``/``get``
        or a ``key``) with, under the same key, or ``None``: ``dense``, the eval run of its
        evaluation key; ``uniform``, the uniform-allocation prune run of its key with the same
        ``method`` and ``sparsity`` (from the row unless given; any when neither is known)."""
        if kind not in BASELINES:
            raise ValueError(f"kind={kind!r}: use one of {', '.join(BASELINES)}")
        if isinstance(row_or_key, str):
            key, row = row_or_key, {}
        else:
            row = dict(row_or_key)
            key = str(row["key"]) if isinstance(row.get("key"), str) else run_key(row).key
        method = method if method is not None else row.get("method")
        sparsity = sparsity if sparsity is not None else row.get("sparsity")
        identity = key.split("|", 1)[0]
        table = self.compare(model_identity=None if identity == "?" else identity)
        if kind == "dense":
            eval_key = key.split("|calib=", 1)[0]
            hits = table[(table["kind"] == "eval") & (table["eval_key"] == eval_key)]
        else:
            hits = table[(table["kind"] == "prune") & (table["allocation"] == "uniform") & (table["key"] == key)]
            if not missing(method):
                hits = hits[hits["method"] == method]
            if not missing(sparsity):
                hits = hits[(hits["sparsity"] - float(sparsity)).abs() < 1e-9]
        return hits.iloc[-1].to_dict() if len(hits) else None

    ZEROSHOT_COLUMNS = ("run_id", "task", "metric", "value", "stderr", "n", "harness_version", "limit")

    def add_zeroshot(self, run_id: int, rows: list[Mapping[str, object]]) -> None:
        """Zero-shot rows of a run (keys task, metric, value, stderr, n, harness_version, limit)."""
        values = [(run_id, *(r[c] for c in self.ZEROSHOT_COLUMNS[1:])) for r in rows]
        with self._connect() as con:
            con.executemany("INSERT OR REPLACE INTO zeroshot VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)

    def zeroshot(self, run_ids: list[int] | None = None) -> pd.DataFrame:
        """Zero-shot rows (``ZEROSHOT_COLUMNS``) of the given runs (all when ``None``)."""
        sql = 'SELECT run_id, task, metric, value, stderr, n, harness_version, "limit" FROM zeroshot'
        params = [int(i) for i in run_ids] if run_ids is not None else []
        if run_ids is not None:
            sql += f" WHERE run_id IN ({', '.join('?' * len(params))})"
        con = sqlite3.connect(self.path, timeout=60)
        try:
            return pd.read_sql_query(sql + " ORDER BY run_id, rowid", con, params=params)
        finally:
            con.close()

    def heartbeat(self, run_id: int, every: float = HEARTBEAT_S) -> threading.Event:
        """Renew ``run_id``'s heartbeat every ``every`` seconds from a daemon thread while it is
        ``running``; set the returned event to stop."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every):
                try:
                    with self._connect() as con:
                        con.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ? AND status = 'running'",
                                    (time.time(), run_id))
                except sqlite3.Error as exc:      # a busy or vanished database: try again next time
                    log.debug("heartbeat of run %d: %s", run_id, exc)

        threading.Thread(target=beat, name=f"registry-heartbeat-{run_id}", daemon=True).start()
        return stop

    def mark_interrupted(self) -> list[int]:
        """Mark every ``running`` run whose process is gone as ``interrupted``; returns their ids."""
        con = sqlite3.connect(self.path, timeout=60)
        try:
            con.row_factory = sqlite3.Row
            running = [dict(r) for r in con.execute("SELECT * FROM runs WHERE status = 'running'")]
        finally:
            con.close()
        now = time.time()
        ended = [r for r in running if gone(r, now)]
        if ended:
            with self._connect() as con:
                for r in ended:
                    who = f"pid {r['pid']} on {r['host']}" if r.get("pid") is not None else "its process"
                    con.execute("UPDATE runs SET status = 'interrupted', error = ?, finished_at = ? "
                                "WHERE id = ? AND status = 'running'",
                                (f"interrupted: {who} ended without finishing the run (killed?)",
                                 r.get("heartbeat_at") or r["started_at"], r["id"]))
        return [int(r["id"]) for r in ended]
