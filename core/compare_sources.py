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
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .adapters import adapter_analyses, is_adapter
from .analysis import COLUMNS, Analysis, analyze, cache_folder
from .compare import Entry
from .checks import model_source
from .config import home
from .metricsfile import read_metrics
from .models import REPORT_NAME, resolve_source
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


RUNS_HINT = "`spectrascope runs --status done` lists the finished runs"


def resolve_run(run_id: int, registry: Registry | None = None) -> tuple[dict, Path | None]:
    """The registry row of the run ``run:ID`` names and its saved output folder (None for a run
    pruned without ``--save`` whose analysis was recorded). Strict: only a finished prune run
    whose saved ``spectrascope_report.json`` names that run (or, unsaved, whose recorded
    analysis was made by that run); anything else is a one-line ``ValueError``, never another
    run's output under this run's label."""
    registry = registry or Registry(read_only=True)     # resolving a run only reads the registry
    found = registry.query(ids=[int(run_id)])
    name = f"run:{run_id}"
    if found.empty:
        raise ValueError(f"{name}: no run {run_id} in {registry.path}; {RUNS_HINT}")
    run = found.iloc[0].to_dict()
    if run.get("kind") != "prune":
        raise ValueError(f"{name} is an {run.get('kind')} run (the model as it is, nothing saved); compare the "
                         f"model itself, or a prune run: {RUNS_HINT}")
    if run.get("status") != "done":
        raise ValueError(f"{name} is {run.get('status')}, not done: it has no saved output to compare; {RUNS_HINT}")
    out = run.get("output_dir")
    if isinstance(out, str) and out:
        folder = Path(out)
        if not folder.is_dir():
            raise ValueError(f"{name} saved its output to {folder}, which no longer exists; {RUNS_HINT}")
        report = _saved_report(folder)
        named, model = report.get("run_id"), report.get("model_identity")
        if named != int(run_id) or (model and run.get("model_identity") and model != run["model_identity"]):
            holds = (f"no {REPORT_NAME} of a prune run" if named is None else f"the output of run {named}"
                     + ("" if named != int(run_id) else f" of another model ({model}; another registry's run?)"))
            raise ValueError(f"{name}: its output folder {folder} now holds {holds}, not run {run_id}'s; "
                             f"{RUNS_HINT}")
        return run, folder
    if _recorded_analysis(run) is None:
        raise ValueError(f"{name} saved no output (pruned without --save) and has no analysis recorded by that "
                         f"run; prune with --save DIR --analyze-output, or {RUNS_HINT}")
    return run, None


def _saved_report(folder: Path) -> dict:
    """``run_id`` (an int) and ``model_identity`` of ``folder``'s saved report ({} when unreadable)."""
    try:
        report = json.loads((folder / REPORT_NAME).read_text())
        return {"run_id": int(report["run_id"]), "model_identity": report.get("model_identity")}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _recorded_analysis(run: dict, xmin: str | None = None) -> Analysis | None:
    """The cached analysis an unsaved run recorded (``--analyze-output``): only one keyed by
    that run and its model, made while or after the run ran (a reset registry reuses ids)."""
    recorded = (run.get("allocation_params") or {}).get("analysis") or {}
    identity = recorded.get("identity")
    want = f"run{run['id']}-{str(run.get('model_identity')).replace(':', '-')}"
    if identity != want or (xmin is not None and recorded.get("xmin", "peak") != xmin):
        return None
    cached = read_cached(cache_folder(identity, recorded.get("xmin", "peak")))
    if cached is None:
        return None
    try:
        created = time.mktime(time.strptime(str(cached.meta.get("created")), "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None
    return cached if created >= float(run["started_at"]) - 1 else None


def analysis_of_run(run_id: int, *, registry: Registry | None = None, xmin: str = "peak", device: str = "auto",
                    progress: Progress = None) -> tuple[Analysis, dict]:
    """The analysis of a prune run's output (of its saved folder, else the analysis the run
    recorded) and the run's registry row; ``resolve_run`` decides which run output that is."""
    run, folder = resolve_run(run_id, registry)
    if folder is not None:
        return analyze(folder, xmin=xmin, device=device, progress=progress), run
    a = _recorded_analysis(run, xmin)
    if a is None:
        raise ValueError(f"run:{run_id} saved no output and recorded its analysis with another xmin; compare with "
                         f"--xmin {((run.get('allocation_params') or {}).get('analysis') or {}).get('xmin')}")
    return a, run


def run_label(run: dict) -> str:
    """``run 3: wanda alpha S=0.70`` (what a run is called in a comparison)."""
    s = run.get("sparsity")
    if isinstance(s, (int, float)) and np.isfinite(s):
        sparsity = f" S={s:.2f}"
    else:
        sparsity = f" {run['nm']}" if run.get("nm") else ""
    return f"run {run['id']}: {run.get('method')} {run.get('allocation')}{sparsity}"


def split_label(source: str) -> tuple[str | None, str]:
    """``(LABEL, SOURCE)`` of ``LABEL=SOURCE`` (``(None, source)`` otherwise, or for a path that exists)."""
    text = str(source).strip()
    m = _LABELLED.match(text)
    if m and not Path(text).expanduser().exists():
        return m.group(1).strip(), m.group(2).strip()
    return None, text


def load_entries(source: str, *, base: str | None = None, xmin: str = "peak", device: str = "auto",
                 first: bool = True, progress: Progress = None) -> list[Entry]:
    """The entries one command-line source stands for (a series or an adapter gives several;
    an adapter given ``first`` also gives its base, the reference)."""
    label, text = split_label(source)
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


def _check_folders(text: str, base: str | None) -> None:
    """Refuse a damaged or misnamed local model behind ``text`` (a folder, a .safetensors file,
    each folder of a checkpoint series, an adapter's base folder) before anything is analysed."""
    from .checkpoints import check_complete

    path = Path(model_source(text, "source")).expanduser()     # an empty source is a mistake, not "."
    if path.is_file() and path.suffix.lower() in (".csv", ".parquet"):
        return
    if is_adapter(path):
        models = [base] if base else []
    elif path.is_dir() and not (path / "config.json").is_file():
        models = [str(p) for _, p in checkpoint_series(path)]
    else:
        models = [text]
    for model in models:
        src = resolve_source(model)
        if src.kind == "folder":
            check_complete(src.path)


def entries_for(sources: list[str], *, base: str | None = None, xmin: str = "peak", device: str = "auto",
                progress: Progress = None) -> list[Entry]:
    """Every source's entries, in order (labels made unique by a suffix where two coincide)."""
    for s in sources:    # every run:ID resolved and every model folder checked before any analysis
        if (r := _RUN.match(split_label(s)[1])):
            resolve_run(int(r.group(1)))
        else:
            _check_folders(split_label(s)[1], base)
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
    t = (registry or Registry(read_only=True)).query(kind="prune", status="done")
    rows = []
    for run in t.to_dict("records"):
        rec = (run.get("allocation_params") or {}).get("analysis")
        if isinstance(rec, dict) and rec.get("identity"):
            rows.append({"id": int(run["id"]), "label": run_label(run), "model_identity": run["model_identity"],
                         "identity": rec["identity"], "xmin": rec.get("xmin", "peak")})
    return pd.DataFrame(rows, columns=["id", "label", "model_identity", "identity", "xmin"])
