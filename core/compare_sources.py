"""Sources of a comparison, turned into ``core.compare.Entry`` objects: models (anything
``load_model`` loads), saved tables (``spectrascope analyze --out``), pruned outputs of the
runs registry (``run:ID``), a folder of ``checkpoint-*`` subfolders (a training series),
``LABEL=SOURCE`` (an integer label is a training step) and LoRA adapters; and the analyses
already in the disk cache, for pickers.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .adapters import adapter_analyses, is_adapter
from .analysis import COLUMNS, Analysis, analyze, cache_folder
from .compare import Entry
from .config import home
from .experiments import read_metrics
from .progress import Progress
from .registry import Registry

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
_LABELLED = re.compile(r"^([^=/\\]+)=(.+)$")
_RUN = re.compile(r"^run:(\d+)$")


def checkpoint_series(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``checkpoint-N`` subfolders of ``folder``, by step."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def _entry(a: Analysis, label: str, source: str, kind: str, step: int | None = None) -> Entry:
    return Entry(label, a.table, a.eigs, source, kind, a.identity, a.xmin, step)


def analysis_of_run(run_id: int, *, registry: Registry | None = None, xmin: str = "peak", device: str = "auto",
                    progress: Progress = None) -> tuple[Analysis, dict]:
    """The analysis of a prune run's output (recorded by ``--analyze-output``, else of its saved
    folder) and the run's registry row."""
    run = (registry or Registry()).get(int(run_id))
    recorded = (run.get("allocation_params") or {}).get("analysis") or {}
    if recorded.get("identity") and recorded.get("xmin", "peak") == xmin:
        cached = read_cached(cache_folder(recorded["identity"], xmin))
        if cached is not None:
            return cached, run
    out = run.get("output_dir")
    if not out or not Path(out).is_dir():
        raise ValueError(f"run:{run_id} has no analysed or saved output; prune with --save DIR --analyze-output")
    return analyze(out, xmin=xmin, device=device, progress=progress), run


def run_label(run: dict) -> str:
    """``run 3: wanda alpha S=0.70`` (what a run is called in a comparison)."""
    s = run.get("sparsity")
    if isinstance(s, (int, float)) and np.isfinite(s):
        sparsity = f" S={s:.2f}"
    else:
        sparsity = f" {run['nm']}" if run.get("nm") else ""
    return f"run {run['id']}: {run.get('method')} {run.get('allocation')}{sparsity}"


def load_entries(source: str, *, base: str | None = None, xmin: str = "peak", device: str = "auto",
                 first: bool = True, progress: Progress = None) -> list[Entry]:
    """The entries one command-line source stands for (a series or an adapter gives several;
    an adapter given ``first`` also gives its base, the reference)."""
    text = str(source).strip()
    label = None
    m = _LABELLED.match(text)
    if m and not Path(text).expanduser().exists():
        label, text = m.group(1).strip(), m.group(2).strip()
    step = int(label) if label is not None and label.lstrip("-").isdigit() else None
    if (r := _RUN.match(text)):
        a, run = analysis_of_run(int(r.group(1)), xmin=xmin, device=device, progress=progress)
        return [_entry(a, label or run_label(run), text, "run", step)]
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() in (".csv", ".parquet"):
        return [Entry(label or path.stem, read_metrics(path), {}, text, "table", None, None, step)]
    if is_adapter(path):
        b, merged, update = adapter_analyses(path, base, xmin=xmin, device=device, progress=progress)
        out = [_entry(merged, f"{label or path.name} merged", text, "adapter-merged"),
               _entry(update, f"{label or path.name} update", text, "adapter-update")]
        return ([_entry(b, "base", base or "adapter base", "model")] if first else []) + out
    series = checkpoint_series(path) if not (path / "config.json").is_file() else []
    if series:
        return [_entry(analyze(p, xmin=xmin, device=device, progress=progress), f"step {n}", str(p), "checkpoint", n)
                for n, p in series]
    a = analyze(text, xmin=xmin, device=device, progress=progress)
    return [_entry(a, label or a.model, text, "checkpoint" if step is not None else "model", step)]


def entries_for(sources: list[str], *, base: str | None = None, xmin: str = "peak", device: str = "auto",
                progress: Progress = None) -> list[Entry]:
    """Every source's entries, in order (labels made unique by a suffix where two coincide)."""
    out: list[Entry] = []
    for i, s in enumerate(sources):
        out += load_entries(s, base=base, xmin=xmin, device=device, first=i == 0, progress=progress)
    seen: dict[str, int] = {}
    for e in out:
        n = seen[e.label] = seen.get(e.label, 0) + 1
        if n > 1:
            e.label = f"{e.label} ({n})"
    return out


# --- the disk cache ------------------------------------------------------------------------

def read_cached(folder: str | Path) -> Analysis | None:
    """A cached analysis of any engine version (columns it lacks are empty), or None."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        table = pd.read_parquet(folder / "table.parquet")
        with np.load(folder / "eigs.npz") as z:
            eigs = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - a damaged entry is skipped, whatever broke
        log.warning("skipping the cached analysis %s (%s)", folder, type(exc).__name__)
        return None
    extra = [c for c in table.columns if c not in COLUMNS]
    return Analysis(table.reindex(columns=COLUMNS + extra), eigs, meta.get("model", folder.name),
                    meta.get("identity", folder.name), meta.get("xmin", "?"), meta.get("device", "?"),
                    float(meta.get("seconds", 0.0)), cached=True, meta=meta)


def cached_analyses() -> pd.DataFrame:
    """Every analysis in the disk cache: folder, model, identity, xmin, engine, created, label
    (``model · xmin · date``), newest first."""
    rows = []
    for meta_file in (home() / "analyses").glob("*/meta.json"):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        created = str(meta.get("created", ""))
        when = created.replace("T", " ")
        rows.append({"folder": str(meta_file.parent), "model": meta.get("model", "?"),
                     "identity": meta.get("identity", ""), "xmin": meta.get("xmin", "?"),
                     "engine": str(meta.get("engine", "1")), "created": created,
                     "label": f"{meta.get('model', '?')} · xmin {meta.get('xmin', '?')} · {when}"})
    cols = ["folder", "model", "identity", "xmin", "engine", "created", "label"]
    return pd.DataFrame(rows, columns=cols).sort_values("created", ascending=False).reset_index(drop=True)


def analysed_runs(registry: Registry | None = None) -> pd.DataFrame:
    """Finished prune runs whose output was analysed: id, label, model_identity, identity, xmin."""
    t = (registry or Registry()).query(kind="prune", status="done")
    rows = []
    for run in t.to_dict("records"):
        rec = (run.get("allocation_params") or {}).get("analysis")
        if isinstance(rec, dict) and rec.get("identity"):
            rows.append({"id": int(run["id"]), "label": run_label(run), "model_identity": run["model_identity"],
                         "identity": rec["identity"], "xmin": rec.get("xmin", "peak")})
    return pd.DataFrame(rows, columns=["id", "label", "model_identity", "identity", "xmin"])
