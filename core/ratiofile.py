"""Ratios files: the CSV of per-matrix pruning ratios (columns name and ratio) that
``Allocation.to_csv`` writes, read back and checked against the matrices it is meant for."""
from __future__ import annotations

import csv
import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

_FIX = "write one with `spectrascope allocate --out` or the dashboard's Allocation page"


@dataclass(frozen=True)
class RatioFile:
    """A checked ratios file: its resolved path, the sha256 of its bytes, and one ratio per
    requested matrix name, in that order."""

    path: Path
    sha256: str
    ratios: np.ndarray


def some(names: Sequence[object], limit: int = 5) -> str:
    """The first few names, then how many more."""
    shown = ", ".join(str(x) for x in list(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_ratio_file(path: str | os.PathLike, names: Sequence[str]) -> RatioFile:
    """The ratios of ``path`` for ``names``. Refused with a one-line ``ValueError`` naming the
    file: missing, empty or binary file; no name or ratio column; a ratio that is not a number
    (with its line) or outside [0, 1); names missing, extra or repeated."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"ratios file {path} does not exist; {_FIX}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:
        raise ValueError(f"ratios file {path} is binary, not a CSV; give the CSV with columns name and ratio ({_FIX})")
    rows = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(rows, [])]
    if not any(header):
        raise ValueError(f"ratios file {path} is empty; {_FIX}")
    if "name" not in header or "ratio" not in header:
        raise ValueError(f"ratios file {path} needs the columns name and ratio (it has {', '.join(header)}); {_FIX}")
    i_name, i_ratio = header.index("name"), header.index("ratio")
    found: dict[str, tuple[float, int]] = {}   # name: (ratio, line), the last row of a name
    seen: list[str] = []
    for row in rows:
        if not any(cell.strip() for cell in row):
            continue
        cell = row[i_ratio].strip() if len(row) > i_ratio else ""
        try:
            value = float(cell)
        except ValueError:
            raise ValueError(f"ratios file {path}, line {rows.line_num}: ratio {cell!r} is not a number; "
                             "give a fraction in [0, 1)") from None
        seen.append(row[i_name].strip() if len(row) > i_name else "")
        found[seen[-1]] = (value, rows.line_num)
    if not seen:
        raise ValueError(f"ratios file {path} has a header but no rows; {_FIX}")
    wanted = set(names)
    problems = [("ratios outside [0, 1) for", [f"{k} (line {line})" for k, (v, line) in found.items()
                                                if not 0.0 <= v < 1.0], "give fractions in [0, 1)"),
                ("no ratio for the model's matrices", [k for k in names if k not in found],
                 "allocate for the same model"),
                ("names the model does not have:", [k for k in found if k not in wanted], "allocate for the same model"),
                ("repeated names:", [k for k, c in Counter(seen).items() if c > 1], "keep one row per matrix")]
    for what, bad, todo in problems:
        if bad:
            raise ValueError(f"ratios file {path} has {what} {some(bad)}; {todo}")
    return RatioFile(path, hashlib.sha256(data).hexdigest(), np.array([found[k][0] for k in names]))
