"""Comparison of several analyses: one long table (source, matrix, every metric), per-matrix
deltas against the first source, matrices missing from a source, and a summary per kind.

Matrices are matched by their stable names; a matrix whose name the reference lacks is
matched by (block, kind) when the reference has exactly one such matrix (two families
name the same layer differently). A matrix present in one source only is listed in
``Comparison.missing`` and in the deltas (``present`` says where), never dropped.
The sources themselves (models, tables, runs, checkpoints, adapters) come from
``core.compare_sources``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .checks import html_file, table_files
from .choices import COMPARE_TABLES
from .config import atomic_file

#: numeric columns compared matrix by matrix (when both sources have them)
DELTA_METRICS = ("alpha", "alpha_hat", "log_norm", "log_spectral_norm", "log_alpha_norm", "stable_rank",
                 "entropy", "mp_softrank", "num_spikes", "rank", "n_zero", "D", "xmin", "sigma")
#: ``present`` values of a delta row
BOTH, REFERENCE_ONLY, SOURCE_ONLY = "both", "reference only", "this source only"


@dataclass
class Entry:
    """One analysed source: its label, its table, and (when known) every matrix's eigenvalues."""

    label: str
    table: pd.DataFrame
    eigs: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""                 # what was asked for (a path, run:ID, ...)
    kind: str = "model"              # model | table | run | checkpoint | adapter-update | adapter-merged
    identity: str | None = None
    xmin: str | None = None
    step: int | None = None          # training step of a checkpoint series


@dataclass
class Comparison:
    """The tables of a comparison (``entries[0]`` is the reference)."""

    entries: list[Entry]
    long: pd.DataFrame               # source, step, key, name, block, kind, every column of each table
    deltas: pd.DataFrame             # source, key, block, kind, present, <m>_ref, <m>, delta_<m>, status_ref, status
    missing: pd.DataFrame            # source, key, block, kind, present

    @property
    def reference(self) -> Entry:
        return self.entries[0]

    @property
    def labels(self) -> list[str]:
        return [e.label for e in self.entries]

    def by_kind(self, metric: str = "alpha") -> pd.DataFrame:
        """Per source and kind: the mean ``metric``, its change against the reference, and how
        many matched matrices changed status."""
        mean = (self.long.groupby(["source", "kind"], sort=False)[metric].mean().rename("mean").reset_index())
        ref = mean[mean["source"] == self.reference.label].set_index("kind")["mean"]
        mean["change"] = mean["mean"] - mean["kind"].map(ref)
        d = self.deltas[self.deltas["present"] == BOTH]
        changed = (d["status_ref"] != d["status"]).groupby([d["source"], d["kind"]]).sum().rename("status_changed")
        out = mean.merge(changed.reset_index(), on=["source", "kind"], how="left")
        out["status_changed"] = out["status_changed"].fillna(0).astype(int)
        out["source"] = pd.Categorical(out["source"], self.labels, ordered=True)
        return out.sort_values(["source"], kind="stable").reset_index(drop=True).astype({"source": str})

    def summary(self, metric: str = "alpha") -> str:
        ref = self.reference
        lines = [f"reference: {ref.label} ({len(ref.table)} matrices)"]
        for e in self.entries[1:]:
            d = self.deltas[self.deltas["source"] == e.label]
            lines.append(f"{e.label}: {int((d['present'] == BOTH).sum())} matched, "
                         f"{int((d['present'] == REFERENCE_ONLY).sum())} only in the reference, "
                         f"{int((d['present'] == SOURCE_ONLY).sum())} only in this source")
        k = self.by_kind(metric)
        wide = k.pivot_table(index="kind", columns="source", values="mean", sort=False)
        cells = {}
        for e in self.entries:
            rows = k[k["source"] == e.label].set_index("kind")
            cells[e.label] = [f"{rows.at[kind, 'mean']:.3f}" + ("" if e is ref else
                              f" ({rows.at[kind, 'change']:+.3f}, {rows.at[kind, 'status_changed']} changed)")
                              if kind in rows.index else "-" for kind in wide.index]
        table = pd.DataFrame(cells, index=wide.index)
        lines += [f"mean {metric} per kind (change against {ref.label}, matrices whose status changed):",
                  table.to_string()]
        if not self.missing.empty:
            lines.append(f"{len(self.missing)} matrices are not in every source (see the missing table)")
        return "\n".join(lines)

    def save(self, stem: str | os.PathLike, *, formats: tuple[str, ...] = ("csv",),
             overwrite: bool = False) -> list[Path]:
        """Write ``STEM-long``, ``STEM-deltas`` and ``STEM-missing`` as .csv and/or .parquet, each
        atomically; existing files are refused unless ``overwrite`` (checked for all before any is written)."""
        paths = table_files(stem, COMPARE_TABLES, formats, overwrite=overwrite)
        tables = {"long": self.long, "deltas": self.deltas, "missing": self.missing}
        return [atomic_file(path, lambda tmp, t=tables[name], f=fmt: t.to_csv(tmp, index=False) if f == "csv"
                            else t.to_parquet(tmp, index=False), overwrite=overwrite)
                for (name, fmt), path in paths.items()]


def write_html(path: str | os.PathLike, html: str, *, overwrite: bool = False) -> Path:
    """Write the report ``html`` to ``path`` (``.html``) atomically: whole or not at all (a full
    disk or a file-size limit leaves nothing); an existing file is refused unless ``overwrite``."""
    path = html_file(path, overwrite=overwrite)
    return atomic_file(path, lambda tmp: tmp.write_text(html, encoding="utf-8"), overwrite=overwrite)


def status_group(status: object) -> str:
    """ok, over-trained, under-trained or no fit (the reasons of "no fit: ..." merged)."""
    s = str(status)
    return "no fit" if s.startswith("no fit") or s in ("nan", "None") else s


def match_keys(reference: pd.DataFrame, table: pd.DataFrame) -> pd.Series:
    """The reference matrix name each row of ``table`` matches: its own name when the reference
    has it, else the reference's only matrix of the same (block, kind), else its own name."""
    names = set(reference["name"])
    by_bk = reference.groupby(["block", "kind"])["name"].agg(list)
    unique = {bk: v[0] for bk, v in by_bk.items() if len(v) == 1}
    taken = names & set(table["name"])
    keys = []
    for name, block, kind in zip(table["name"], table["block"], table["kind"]):
        alt = unique.get((block, kind))
        keys.append(name if name in names or alt is None or alt in taken else alt)
    return pd.Series(keys, index=table.index, name="key")


def _check(entry: Entry) -> None:
    """Refuse, in one line naming the source, a table that cannot be compared: a column missing,
    a ``block`` that is not a whole number, a compared metric that is not a number."""
    name = entry.source or entry.label
    fix = "give a table written by `spectrascope analyze --out`"
    t = entry.table
    missing = [c for c in ("name", "block", "kind", "status") if c not in t.columns]
    if missing:
        raise ValueError(f"{name}: the table lacks the columns {', '.join(missing)}; {fix}")
    for col in ("block", *(m for m in DELTA_METRICS if m in t.columns)):
        values = pd.to_numeric(t[col], errors="coerce")
        bad = (values.isna() | (values % 1 != 0)) if col == "block" else (values.isna() & t[col].notna())
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            v = t[col].iloc[i]
            shown = repr(v) if isinstance(v, str) else str(v)
            problem = "is empty" if pd.isna(v) else \
                f"{shown} is not {'a whole number' if col == 'block' else 'a number'}"
            raise ValueError(f"{name}, row {i + 1} ({t['name'].iloc[i]!r}): {col} {problem}; {fix}")


def compare(entries: list[Entry]) -> Comparison:
    """Compare ``entries`` (two or more; the first is the reference) matrix by matrix."""
    if len(entries) < 2:
        raise ValueError(f"a comparison needs two or more analyses, got {len(entries)}; give more sources")
    labels = [e.label for e in entries]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"sources share the labels {dup}; name them with LABEL=SOURCE")
    for e in entries:
        _check(e)
    ref = entries[0].table
    parts = []
    for e in entries:
        t = e.table.copy()
        t.insert(0, "key", t["name"] if e is entries[0] else match_keys(ref, t))
        t.insert(0, "step", e.step)
        t.insert(0, "source", e.label)
        parts.append(t)
    long = pd.concat(parts, ignore_index=True)
    long["step"] = long["step"].astype("Int64")
    deltas = pd.concat([_deltas(parts[0], p, e.label) for p, e in zip(parts[1:], entries[1:])], ignore_index=True)
    missing = deltas.loc[deltas["present"] != BOTH, ["source", "key", "block", "kind", "present"]]
    return Comparison(list(entries), long, deltas, missing.reset_index(drop=True))


def _deltas(ref: pd.DataFrame, other: pd.DataFrame, label: str) -> pd.DataFrame:
    metrics = [m for m in DELTA_METRICS if m in ref.columns and m in other.columns]
    a = ref[["key", "block", "kind", *metrics, "status"]]
    b = other[["key", "block", "kind", *metrics, "status"]]
    m = a.merge(b, on="key", how="outer", suffixes=("_ref", ""), indicator=True, sort=False)
    m["block"] = m["block_ref"].fillna(m["block"]).astype(int)
    m["kind"] = m["kind_ref"].fillna(m["kind"])
    m["present"] = m["_merge"].map({"both": BOTH, "left_only": REFERENCE_ONLY, "right_only": SOURCE_ONLY})
    out = m[["key", "block", "kind", "present"]].copy()
    out.insert(0, "source", label)
    for c in metrics:
        out[f"{c}_ref"] = m[f"{c}_ref"].astype(float)
        out[c] = m[c].astype(float)
        out[f"delta_{c}"] = out[c] - out[f"{c}_ref"]
    out["status_ref"] = m["status_ref"].map(status_group).where(m["status_ref"].notna())
    out["status"] = m["status"].map(status_group).where(m["status"].notna())
    order = {k: i for i, k in enumerate(ref["key"])}
    out["_o"] = out["key"].map(order).fillna(len(order))
    return out.sort_values(["_o", "block"], kind="stable").drop(columns="_o").reset_index(drop=True)


def delta_pivot(deltas: pd.DataFrame, source: str, metric: str = "alpha") -> pd.DataFrame:
    """``delta_<metric>`` of one source as a block x kind table (NaN where a matrix is missing)."""
    d = deltas[(deltas["source"] == source) & (deltas["present"] == BOTH)]
    kinds = list(dict.fromkeys(deltas["kind"]))
    return d.pivot_table(index="block", columns="kind", values=f"delta_{metric}", aggfunc="first").reindex(
        columns=[k for k in kinds if k in set(d["kind"])])


def series_table(long: pd.DataFrame, metric: str = "alpha") -> pd.DataFrame:
    """Mean ``metric`` per training step and kind (the sources with a step)."""
    t = long[long["step"].notna()]
    return t.groupby(["step", "kind"], sort=True)[metric].mean().reset_index()


def status_counts(long: pd.DataFrame) -> pd.DataFrame:
    """Matrices per source and status group (ok, over-trained, under-trained, no fit)."""
    g = long.assign(status=long["status"].map(status_group))
    return g.groupby(["source", "status"], sort=False).size().unstack(fill_value=0).reset_index()

