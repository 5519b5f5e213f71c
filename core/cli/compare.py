"""The ``compare`` sub-command: several analyses side by side (models, saved tables, pruned
runs, checkpoint series, LoRA adapters), written as long, delta and missing tables."""
from __future__ import annotations

import argparse

from ..checks import html_file, table_files
from ..choices import COMPARE_TABLES, XMIN_METHODS
from ..progress import Progress
from .analyze import add_overwrite
from .jsonout import dumps

SOURCES_HELP = ("demo, a Hugging Face folder, a .gguf or .safetensors file, a hub id, a table of "
                "`spectrascope analyze --out` (.csv/.parquet), run:ID (a pruned output of the runs registry), "
                "a folder of checkpoint-* subfolders, a LoRA adapter folder, or LABEL=SOURCE (an integer LABEL "
                "is a training step); the first is the reference")


def add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("--base", metavar="SOURCE", help="base model of a LoRA adapter (default: the one its config names)")
    p.add_argument("--xmin", default="peak", choices=XMIN_METHODS, help="how xmin is chosen (default peak)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--metric", default="alpha", help="the metric of the summary (default alpha)")
    p.add_argument("--out", metavar="STEM", help="write STEM-long, STEM-deltas and STEM-missing tables")
    p.add_argument("--format", help="csv (default), parquet or csv,parquet for --out")
    p.add_argument("--html", metavar="FILE.html", help="a self-contained HTML report (plotly.js inline, offline)")
    p.add_argument("--json", action="store_true", help="print the per-kind summary as JSON")
    add_overwrite(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def run_compare(args: argparse.Namespace, progress: Progress) -> str:
    if args.format is not None and not args.out:
        raise ValueError(f"--format {args.format} only matters with --out, which is not given; add --out STEM "
                         "or drop --format")
    formats = tuple(f.strip() for f in (args.format or "csv").split(",") if f.strip())
    if args.out:           # every output checked before any work
        table_files(args.out, COMPARE_TABLES, formats, overwrite=args.overwrite)
    if args.html:
        html_file(args.html, overwrite=args.overwrite)
    from ..compare import compare
    from ..compare_sources import entries_for
    from ..quant import quant_alpha_message

    entries = entries_for(args.sources, base=args.base, xmin=args.xmin, device=args.device, progress=progress)
    result = compare(entries)
    if args.metric not in result.long.columns:
        raise ValueError(f"--metric {args.metric}: not a column of the tables; use e.g. alpha, log_norm")
    written = []
    if args.out:
        written = result.save(args.out, formats=formats, overwrite=args.overwrite)
    if args.html:
        from dashboard.compare_figures import write_report   # plotting stays out of the engine's import graph

        written.append(write_report(result, args.html, metric=args.metric, overwrite=args.overwrite))
    notes = [f"{e.label}: {msg}" for e in entries if (msg := quant_alpha_message(e.table, args.metric))]
    if args.json:
        return dumps({"sources": result.labels, "by_kind": result.by_kind(args.metric).to_dict(orient="records"),
                           "missing": result.missing.to_dict(orient="records"), "notes": notes,
                           "written": [str(p) for p in written]})
    if args.quiet:
        return ""
    return "\n".join([result.summary(args.metric), *notes, *(f"wrote {p}" for p in written)])
