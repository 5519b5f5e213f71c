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

Trust: a ``schema_version`` that is not a version number is refused in one line naming the
file (which is kept); ``Registry(read_only=True)`` lists a registry the user cannot write; a
writing ``Registry`` fails on open, before a command's work, if it cannot write; and a registry
deleted or replaced during a run is recreated with this process's runs (``Registry._ensure``).

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
from .config import home, home_path
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
_ADDED_COLUMNS = {"runs": {"host": "TEXT", "pid": "INTEGER", "process_start": "TEXT", "heartbeat_at": "REAL",
                           "spec": "TEXT"}}      # spec: the run's arguments (``run_spec``), for a resumed sweep
_RUN_COLUMNS += tuple(c for c in _ADDED_COLUMNS["runs"] if c not in _RUN_COLUMNS)
_JSON_COLUMNS = ("allocation_params", "calibration", "versions", "spec")
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
    if path.exists() and not os.access(path, os.R_OK):
        return ValueError(f"the runs registry {path} cannot be read or written (permission denied); "
                          f"make it readable and writable {fix}")
    if "readonly" in str(exc) or (path.exists() and not os.access(path, os.W_OK)):
        return ValueError(f"the runs registry {path} is read-only and this command records a run; make it (and "
                          f"its folder) writable {fix} (`spectrascope runs` still lists it)")
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


def _identity(path: Path) -> tuple[int, int] | None:
    """The file behind ``path`` (device, inode), None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Registry:
    """The runs database. ``Registry()`` uses ``$SPECTRASCOPE_HOME/runs.sqlite``.

    ``read_only=True`` (commands that only list or look up runs) never writes: it works on a
    registry the user cannot write, a missing one reads as empty, and runs whose process is
    gone are shown as interrupted without being marked. A writing registry checks at once
    that it can write (so a command fails before its work, not when it records). The rows of
    the runs this object records are also kept in memory: if the file is deleted or replaced
    meanwhile, it is recreated and those runs are written again (with a warning)."""

    def __init__(self, path: str | os.PathLike | None = None, *, read_only: bool = False) -> None:
        self.path = Path(path) if path is not None else (home_path() if read_only else home()) / "runs.sqlite"
        self.read_only = read_only
        self._lock = threading.RLock()
        self._mine: dict[int, dict] = {}                 # run id -> its encoded row, as last written
        self._mine_matrices: dict[int, dict[str, tuple]] = {}
        self._mine_zeroshot: dict[int, dict[tuple, tuple]] = {}
        self._alias: dict[int, int] = {}                 # our run id -> its id in a replaced registry
        self._file: tuple[int, int] | None = None
        try:
            if read_only:
                with self._read() as con:
                    if con is not None:
                        self._version(con)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._open()
        except sqlite3.Error as exc:
            raise _unusable(self.path, exc) from exc

    def _version(self, con: sqlite3.Connection) -> int | None:
        """The schema version (None for a new database), checked: a whole number from 1 to this
        Spectrascope's; raises ValueError naming the file otherwise."""
        try:
            row = con.execute("SELECT version FROM schema_version").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        if row is None:
            return None
        version, fix = row[0], "or set SPECTRASCOPE_HOME to another folder"
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"the runs registry {self.path} has schema_version {version!r}, not a version number "
                             f"(1 to {SCHEMA_VERSION}): it is damaged; move it aside (a new registry is then "
                             f"started) {fix}")
        if version > SCHEMA_VERSION:
            raise ValueError(f"the runs registry {self.path} has schema version {version}, newer than this "
                             f"Spectrascope ({SCHEMA_VERSION}); upgrade Spectrascope {fix}")
        return version

    def _open(self) -> None:
        con = sqlite3.connect(self.path, timeout=60)
        try:
            con.execute("PRAGMA busy_timeout = 60000")
            self._version(con)           # a damaged registry is refused before anything is written to it
            con.execute("PRAGMA journal_mode = WAL")
            con.executescript(_SCHEMA)   # IF NOT EXISTS: safe when two processes open at once
        finally:
            con.close()
        with self._connect(ensure=False) as con:   # one transaction: two processes never migrate twice
            version = self._version(con)
            if version is None:
                con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[v]:
                        con.execute(statement)
            # a write on every open: a read-only registry fails here, before the command's work
            con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            _add_missing_columns(con)
        self._file = _identity(self.path)

    def _ensure(self) -> None:
        """Recreate the registry if its file was deleted or replaced since this object opened
        it, and write the runs this object recorded into it again."""
        if self.read_only:
            return
        with self._lock:
            if _identity(self.path) == self._file:
                return
            if not self.path.exists():        # SQLite's side files of the deleted database
                for side in ("-wal", "-shm"):
                    Path(f"{self.path}{side}").unlink(missing_ok=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._open()
            except sqlite3.Error as exc:
                raise _unusable(self.path, exc) from exc
            ids = [self._replay(run_id) for run_id in self._mine]
            log.warning("the runs registry %s was deleted or replaced during this process: recreated it and "
                        "recorded run%s %s in it again (runs of other processes in the old file are not in it)",
                        self.path, "s" if len(ids) > 1 else "", ", ".join(map(str, ids)) or "(none yet)")

    def _replay(self, run_id: int) -> int:
        """Write run ``run_id`` (its row, matrices and zero-shot rows) into the registry; its id
        there (another when the id is taken by another run)."""
        row = {k: v for k, v in self._mine[run_id].items() if k != "id"}
        with self._connect(ensure=False) as con:
            taken = con.execute("SELECT pid, started_at FROM runs WHERE id = ?", (run_id,)).fetchone()
            if taken is None:
                con.execute(f"INSERT INTO runs (id, {', '.join(row)}) VALUES (?, {', '.join('?' * len(row))})",
                            (run_id, *row.values()))
                new = run_id
            elif taken == (row.get("pid"), row.get("started_at")):
                new = run_id
            else:
                cur = con.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                                  tuple(row.values()))
                new = int(cur.lastrowid)
                self._alias[run_id] = new
            con.executemany("INSERT OR REPLACE INTO matrices VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [(new, *r) for r in self._mine_matrices.get(run_id, {}).values()])
            con.executemany("INSERT OR REPLACE INTO zeroshot VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [(new, *r) for r in self._mine_zeroshot.get(run_id, {}).values()])
        return new

    def _id(self, run_id: int) -> int:
        return self._alias.get(int(run_id), int(run_id))

    @contextmanager
    def _connect(self, ensure: bool = True) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            raise ValueError(f"the runs registry {self.path} was opened read-only; this needs a writable one")
        if ensure:
            self._ensure()
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

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection | None]:
        """A connection for reading (None: a read-only registry that does not exist yet)."""
        if not self.read_only:
            self._ensure()
            con = sqlite3.connect(self.path, timeout=60)
        elif not self.path.exists():
            yield None
            return
        else:
            try:
                con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
                con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            except sqlite3.OperationalError:
                # a WAL database in a folder we cannot write (no -shm to create): read it as it is
                con = sqlite3.connect(f"{self.path.resolve().as_uri()}?immutable=1", uri=True, timeout=60)
        try:
            yield con
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
            run_id = int(cur.lastrowid)
        self._mine[run_id] = row
        return run_id

    def update(self, run_id: int, **fields: object) -> None:
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"status={fields['status']!r}: use one of {', '.join(STATUSES)}")
        row = self._encode(fields)
        if not row:
            return
        if run_id in self._mine:
            self._mine[run_id].update(row)
        with self._connect() as con:
            con.execute(f"UPDATE runs SET {', '.join(k + ' = ?' for k in row)} WHERE id = ?",
                        (*row.values(), self._id(run_id)))

    def finish(self, run_id: int, status: str = "done", *, error: str | None = None, **fields: object) -> None:
        self.update(run_id, status=status, error=error, finished_at=time.time(), **fields)

    def add_matrices(self, run_id: int, table: pd.DataFrame) -> None:
        """Per-matrix rows (columns name, block, kind, params, ratio, achieved)."""
        rows = [(r.name, int(r.block), str(r.kind), int(r.params), float(r.ratio), float(r.achieved))
                for r in table.itertuples(index=False)]
        if run_id in self._mine:
            self._mine_matrices.setdefault(run_id, {}).update({r[0]: r for r in rows})
        with self._connect() as con:
            con.executemany("INSERT OR REPLACE INTO matrices VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [(self._id(run_id), *r) for r in rows])

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
        with self._read() as con:
            if con is None:
                return pd.DataFrame(columns=["name", "block", "kind", "params", "ratio", "achieved"])
            return pd.read_sql_query("SELECT name, block, kind, params, ratio, achieved FROM matrices "
                                     "WHERE run_id = ? ORDER BY rowid", con, params=(self._id(run_id),))

    def query(self, *, ids: list[int] | None = None, kind: str | None = None, status: str | None = "",
              model_identity: str | None = None, method: str | None = None, allocation: str | None = None
              ) -> pd.DataFrame:
        """Runs as a DataFrame (newest last), filtered by the given fields (JSON decoded)."""
        if not self.read_only:
            self.mark_interrupted()
        where, params = [], []
        for col, value in (("kind", kind), ("model_identity", model_identity), ("method", method),
                           ("allocation", allocation), ("status", None if self.read_only else status or None)):
            if value is not None:
                where.append(f"{col} = ?")
                params.append(value)
        if ids is not None:
            where.append(f"id IN ({', '.join('?' * len(ids))})")
            params += [self._id(i) for i in ids]
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        with self._read() as con:
            table = (pd.read_sql_query(sql, con, params=params) if con is not None
                     else pd.DataFrame(columns=["id", *_RUN_COLUMNS]))
        for col in _RUN_COLUMNS:             # an older registry read without migrating it
            if col not in table.columns:
                table[col] = None
        if self.read_only:                   # shown as interrupted, marked by the next writer
            ended = [i for i, r in zip(table.index, table.to_dict(orient="records"))
                     if r["status"] == "running" and gone(r, time.time())]
            table.loc[ended, "status"] = "interrupted"
            table.loc[ended, "error"] = "interrupted: its process ended without finishing the run (killed?)"
            if status:
                table = table[table["status"] == status].reset_index(drop=True)
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
        values = [tuple(r[c] for c in self.ZEROSHOT_COLUMNS[1:]) for r in rows]
        if run_id in self._mine:
            self._mine_zeroshot.setdefault(run_id, {}).update({v[:2]: v for v in values})
        with self._connect() as con:
            con.executemany("INSERT OR REPLACE INTO zeroshot VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [(self._id(run_id), *v) for v in values])

    def zeroshot(self, run_ids: list[int] | None = None) -> pd.DataFrame:
        """Zero-shot rows (``ZEROSHOT_COLUMNS``) of the given runs (all when ``None``)."""
        sql = 'SELECT run_id, task, metric, value, stderr, n, harness_version, "limit" FROM zeroshot'
        params = [self._id(i) for i in run_ids] if run_ids is not None else []
        if run_ids is not None:
            sql += f" WHERE run_id IN ({', '.join('?' * len(params))})"
        with self._read() as con:
            if con is None:
                return pd.DataFrame(columns=list(self.ZEROSHOT_COLUMNS))
            return pd.read_sql_query(sql + " ORDER BY run_id, rowid", con, params=params)

    def heartbeat(self, run_id: int, every: float = HEARTBEAT_S) -> threading.Event:
        """Renew ``run_id``'s heartbeat every ``every`` seconds from a daemon thread while it is
        ``running``; set the returned event to stop."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every):
                try:
                    with self._connect() as con:
                        con.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ? AND status = 'running'",
                                    (time.time(), self._id(run_id)))
                except (sqlite3.Error, ValueError, OSError) as exc:   # busy, or being recreated: next time
                    log.debug("heartbeat of run %d: %s", run_id, exc)

        threading.Thread(target=beat, name=f"registry-heartbeat-{run_id}", daemon=True).start()
        return stop

    def mark_interrupted(self) -> list[int]:
        """Mark every ``running`` run whose process is gone as ``interrupted``; returns their ids."""
        if self.read_only:
            return []
        with self._read() as con:
            con.row_factory = sqlite3.Row
            running = [dict(r) for r in con.execute("SELECT * FROM runs WHERE status = 'running'")]
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
