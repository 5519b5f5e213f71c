"""Metrics files: the table of per-matrix HT-SR metrics that ``spectrascope analyze --out``
writes (.csv or .parquet), read back for AlphaPruning and checked with one-line errors."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .checks import first_line


def read_metrics(path: str | os.PathLike, metric: str | None = None) -> pd.DataFrame:
    """A table written by ``spectrascope analyze --out`` (.csv or .parquet). Refused in one line
    naming the file: missing, empty, binary or unreadable, without a ``name`` column, or (when
    ``metric`` is given and a column) with a value of ``metric`` that is not a number (its line)."""
    path = Path(path).expanduser().resolve()
    fix = "write one with `spectrascope analyze --out`"
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path}: no such file; {fix}")
    parquet = path.suffix.lower() == ".parquet"
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head.strip():
        raise ValueError(f"metrics file {path} is empty; {fix}")
    if not parquet and b"\x00" in head:
        raise ValueError(f"metrics file {path} is binary, not a CSV table; {fix}")
    try:
        table = pd.read_parquet(path) if parquet else pd.read_csv(path)
    except (ValueError, OSError, ImportError) as exc:   # pandas and pyarrow raise many types for a bad file
        first = first_line(exc)
        raise ValueError(f"metrics file {path} cannot be read as a {'Parquet' if parquet else 'CSV'} table "
                         f"({first}); {fix}") from exc
    if "name" not in table.columns:
        raise ValueError(f"metrics file {path} has no column name (it has {', '.join(map(str, table.columns))}); "
                         f"{fix}")
    if metric is not None and metric in table.columns:
        values = pd.to_numeric(table[metric], errors="coerce")
        bad = table.index[values.isna() & table[metric].notna()]
        if len(bad):
            where = f"line {bad[0] + 2}" if not parquet else f"row {bad[0] + 1}"
            raise ValueError(f"metrics file {path}, {where}: {metric} {table[metric][bad[0]]!r} is not a number; "
                             f"{fix}")
        table[metric] = values
    return table
