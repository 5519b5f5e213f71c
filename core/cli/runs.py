"""The ``runs`` and ``clean`` sub-commands: list the runs registry (with runs whose process
is gone shown as interrupted), and remove the temporaries that killed processes left (only
those recorded when they were created: look-alikes are listed and left alone)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..checks import whole
from ..choices import STATUSES
from ..config import home
from ..housekeeping import clean, default_roots, human_size, left_alone
from ..progress import Progress
from .jsonout import dumps

if TYPE_CHECKING:
    import pandas as pd

    from ..registry import Registry

log = logging.getLogger(__name__)

#: Columns of the ``runs`` table (``--json`` gives every recorded column).
RUNS_COLUMNS = ["id", "kind", "status", "model", "settings", "perplexity", "started", "output_dir"]


def add_runs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", choices=STATUSES, help="only runs with this status (interrupted: the process "
                   "ended without finishing, e.g. killed)")
    p.add_argument("--model", metavar="TEXT", help="only runs whose model contains TEXT (or whose identity is TEXT)")
    p.add_argument("--last", type=int, metavar="N", help="only the N newest runs (after the other filters)")
    p.add_argument("--json", action="store_true", help="every recorded column, one JSON object per run in a list")


def _settings(run: pd.Series) -> str:
    """What was run, in a few words: ``wanda alpha S=0.7 eps=0.3`` or ``dense``."""
    import pandas as pd

    if run["kind"] == "eval":
        return str(run["method"] or "dense")
    words = [str(run["method"]), str(run["allocation"])]
    words += [f"S={run['sparsity']:g}"] if pd.notna(run["sparsity"]) else []
    words += [f"eps={run['epsilon']:g}"] if pd.notna(run["epsilon"]) else []
    words += [f"nm={run['nm']}"] if isinstance(run["nm"], str) and run["nm"] else []
    return " ".join(words)


def select_runs(registry: Registry, *, status: str | None = None, model: str | None = None,
                last: int | None = None) -> pd.DataFrame:
    """The registry's runs (oldest first), filtered like ``spectrascope runs``."""
    whole("--last", last, 1, optional=True)
    table = registry.query(status=status)
    if model:
        table = table[table["model"].fillna("").str.contains(model, regex=False) | (table["model_identity"] == model)]
    return table.tail(last) if last else table


def run_runs(args: argparse.Namespace, progress: Progress) -> str:
    whole("--last", args.last, 1, optional=True)     # before the imports: a refusal answers at once
    import pandas as pd

    from ..registry import Registry

    registry = Registry(read_only=True)      # listing works on a registry the user cannot write
    table = select_runs(registry, status=args.status, model=args.model, last=args.last)
    if args.json:
        rows = table.astype(object).where(table.notna(), None).to_dict(orient="records")
        return dumps(rows)
    if table.empty:
        return f"no runs{' matching' if args.status or args.model else ''} in {registry.path}"
    shown = pd.DataFrame({
        "id": table["id"], "kind": table["kind"], "status": table["status"], "model": table["model"].fillna("-"),
        "settings": table.apply(_settings, axis=1),
        "perplexity": table["perplexity"].map(lambda v: f"{v:.3f}" if pd.notna(v) else "-"),
        "started": pd.to_datetime(table["started_at"], unit="s").dt.strftime("%Y-%m-%d %H:%M"),
        "output_dir": table["output_dir"].fillna("-")}, columns=RUNS_COLUMNS)
    return shown.to_string(index=False)


def add_clean(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")


def clean_roots() -> list[Path]:
    """Where look-alikes of temporaries are looked for (to list them, never to remove them):
    Spectrascope's folder and its subfolders (not through symbolic links), and the folders that
    recorded runs saved models into."""
    from ..registry import Registry

    roots = default_roots(home())
    try:
        saved = Registry(read_only=True).query(kind="prune")["output_dir"].dropna()
    except ValueError as exc:         # an unusable registry: still clean Spectrascope's own folder
        log.warning("%s; only %s is cleaned", exc, home())
        return roots
    return roots + sorted({Path(d).parent for d in saved if d} - set(roots))


def run_clean(args: argparse.Namespace, progress: Progress) -> str:
    freed = clean(dry_run=args.dry_run)            # every recorded temporary of an ended process
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"{verb} {item}" for item in freed] or ["nothing to clean: no leftovers of ended processes"]
    if freed:
        lines.append(f"{'would free' if args.dry_run else 'freed'} {human_size(sum(i.bytes for i in freed))} "
                     f"in {len(freed)} leftover{'s' if len(freed) > 1 else ''}")
    lines += [f"left alone  {path}  (named like a temporary, but Spectrascope did not record creating it: "
              "yours, or an older version's leftover to delete by hand)" for path in left_alone(clean_roots())]
    return "\n".join(lines)
