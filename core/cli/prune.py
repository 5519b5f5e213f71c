"""The ``prune``, ``eval``, ``sweep`` and ``tune-epsilon`` sub-commands: recorded pruning and
perplexity runs, described by a ``PruneSpec`` built from the parsed options."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..allocation import MAPPINGS
from ..allocation import METHODS as ALLOCATION_METHODS
from ..config import DTYPES
from ..experiments import ALLOCATIONS, PruneSpec, calibration_for, eval_run, load_for, prune_and_eval
from ..progress import Progress
from ..pruning import METHODS as PRUNE_METHODS
from ..sweeps import DEFAULT_EPSILONS, sweep, sweep_report, tune_epsilon


# --- shared options ------------------------------------------------------------------------

def _opts_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="demo (default), a Hugging Face folder, a .gguf file or a hub id")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default float32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _opts_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="wiki", metavar="DATASET",
                   help="calibration text: wiki (embedded, default), wikitext2, c4 or a text FILE")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window, capped at the model's context "
                   "(default 2048; also the evaluation window unless --eval-seqlen)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window starts (default 0)")


def _opts_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="wiki", metavar="NAME|FILE",
                   help="evaluation text: wiki (embedded eval part, default), wikitext2, c4 or a text FILE")
    p.add_argument("--max-windows", type=int, help="evaluate only the first K windows (quick looks)")


def _opts_alpha(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mapping", default="block", choices=MAPPINGS, help="AlphaPruning mapping (default block)")
    p.add_argument("--metrics", metavar="FILE", help="alpha from a table of `spectrascope analyze --out` "
                   "instead of analysing now")


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} {text!r}: give comma-separated numbers, e.g. 0.5,0.6,0.7") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_epsilons(text: str, methods: list[str]) -> dict[str, list[float]]:
    """``0.2,0.3`` (every method) or ``wanda=0.3,sparsegpt=0.2`` (per method; both may mix)."""
    out: dict[str, list[float]] = {}
    for item in _names(text):
        method, _, value = item.rpartition("=")
        if method and method not in methods:
            raise ValueError(f"--epsilons {text!r}: {method!r} is not one of the methods ({', '.join(methods)})")
        for m in [method] if method else methods:
            out.setdefault(m, []).extend(_floats(value, "--epsilons"))
    return out


# --- prune ---------------------------------------------------------------------------------

def add_prune(p: argparse.ArgumentParser) -> None:
    _opts_model(p)
    p.add_argument("--method", required=True, choices=PRUNE_METHODS)
    p.add_argument("--allocation", choices=ALLOCATIONS, help="layer-wise ratios: uniform (default), alpha "
                   "(AlphaPruning) or owl; file with --ratios (the default then)")
    p.add_argument("--sparsity", type=float, default=0.5, help="target parameter-weighted sparsity (default 0.5)")
    p.add_argument("--epsilon", type=float, help="AlphaPruning's tau range (default 0.3; see tune-epsilon)")
    _opts_alpha(p)
    p.add_argument("--metric", default="alpha", help="AlphaPruning's score column (default alpha)")
    p.add_argument("--r-max", type=float, help="upper bound of any ratio (default 0.99)")
    p.add_argument("--dense-kinds", default="", metavar="KINDS", help="kinds kept dense, e.g. k,v")
    p.add_argument("--reverse", action="store_true", help="prune lower-metric matrices more (ablation)")
    p.add_argument("--ratios", metavar="FILE.csv", help="per-matrix ratios (columns name, ratio) from "
                   "`spectrascope allocate --out` or the dashboard; recorded as allocation file")
    p.add_argument("--nm", metavar="N:M", help="semi-structured N:M sparsity, e.g. 2:4 or 4:8 (ratios ignored)")
    _opts_calib(p)
    p.add_argument("--save", metavar="DIR", help="write the pruned model as a Hugging Face folder (a new DIR; "
                   "missing parent folders are created)")
    p.add_argument("--eval", action="store_true", help="measure perplexity of the pruned model")
    _opts_eval(p)
    p.add_argument("--eval-seqlen", type=int, help="evaluation window (default: --seqlen)")
    p.add_argument("--streaming", action="store_true", help="models larger than memory: read one block at a "
                   "time from the safetensors shards and write it pruned to --save (required)")


def run_prune(args: argparse.Namespace, progress: Progress) -> str:
    run = prune_and_eval(PruneSpec.from_args(args), progress=progress)
    if args.json:
        return json.dumps({**run.to_dict(), "matrices": run.matrices.to_dict(orient="records")}, default=str)
    m = run.matrices
    lines = [f"run {run.run_id}: {run.method} {run.allocation} requested {run.sparsity:.4f}, achieved "
             f"{run.achieved:.4f} over {len(m)} matrices in {run.prune_seconds:.1f} s",
             f"ratio range {m['ratio'].min():.4f}..{m['ratio'].max():.4f}; largest |achieved - ratio| "
             f"{(m['achieved'] - m['ratio']).abs().max():.2e}"]
    if run.perplexity is not None:
        lines.append(run.perplexity.summary())
    if run.output_dir:
        lines.append(f"saved to {run.output_dir}")
    return "\n".join(lines)


# --- eval ----------------------------------------------------------------------------------

def add_eval(p: argparse.ArgumentParser) -> None:
    _opts_model(p)
    _opts_eval(p)
    p.add_argument("--seqlen", type=int, default=2048, help="window length, capped at the context (default 2048)")


def run_eval(args: argparse.Namespace, progress: Progress) -> str:
    run_id, ppl = eval_run(PruneSpec.from_args(args), progress=progress)
    return json.dumps({"run_id": run_id, **ppl.to_dict()}) if args.json else f"run {run_id}: {ppl.summary()}"


# --- sweep ---------------------------------------------------------------------------------

def add_sweep(p: argparse.ArgumentParser) -> None:
    _opts_model(p)
    p.add_argument("--methods", default=",".join(PRUNE_METHODS), help="comma-separated (default all)")
    p.add_argument("--allocations", default=",".join(ALLOCATION_METHODS), help="comma-separated (default all)")
    p.add_argument("--sparsities", default="0.5,0.6,0.7", help="comma-separated (default 0.5,0.6,0.7)")
    p.add_argument("--epsilons", default="0.3", help="AlphaPruning epsilons, comma-separated, for every method "
                   "(0.2,0.3) or per method (wanda=0.3,sparsegpt=0.2; default 0.3)")
    _opts_alpha(p)
    _opts_calib(p)
    _opts_eval(p)
    p.add_argument("--out", default="sweep", metavar="STEM", help="writes STEM.csv and STEM.md (default sweep)")


def run_sweep(args: argparse.Namespace, progress: Progress) -> str:
    methods, allocations = _names(args.methods), _names(args.allocations)
    base = PruneSpec.from_args(args, method=methods[0] if methods else "wanda")
    start = time.perf_counter()
    loaded = load_for(base, progress)
    needs = any(m != "magnitude" for m in methods) or "owl" in allocations
    calib = calibration_for(base, loaded) if needs else None
    table = sweep(base, methods=methods, allocations=allocations, sparsities=_floats(args.sparsities, "--sparsities"),
                  epsilons=parse_epsilons(args.epsilons, methods), loaded=loaded, calibration=calib,
                  progress=progress)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    table.to_csv(out.with_suffix(".csv"), index=False)
    md = sweep_report(table, base, model=loaded.source, calibration=calib, seconds=seconds)
    out.with_suffix(".md").write_text(md)
    if args.json:
        return json.dumps({"seconds": seconds, "rows": table.to_dict(orient="records")}, default=str)
    return (f"{md}\nwrote {out.with_suffix('.csv')} and {out.with_suffix('.md')} (dense perplexity "
            f"{table.iloc[0]['perplexity']:.3f})")


# --- tune-epsilon --------------------------------------------------------------------------

def add_tune_epsilon(p: argparse.ArgumentParser) -> None:
    _opts_model(p)
    p.add_argument("--method", default="wanda", choices=PRUNE_METHODS)
    p.add_argument("--sparsity", type=float, default=0.7, help="target sparsity (default 0.7)")
    p.add_argument("--epsilons", default=",".join(f"{e:g}" for e in DEFAULT_EPSILONS),
                   help="grid (default 0,0.1,...,0.5)")
    _opts_alpha(p)
    p.add_argument("--holdout-windows", type=int, default=16, help="held-out windows scored (default 16)")
    _opts_calib(p)


def run_tune_epsilon(args: argparse.Namespace, progress: Progress) -> str:
    result = tune_epsilon(PruneSpec.from_args(args, allocation="alpha"), epsilons=_floats(args.epsilons, "--epsilons"),
                          holdout_windows=args.holdout_windows, progress=progress)
    if args.json:
        return json.dumps({"best": result.best, "rows": result.table.to_dict(orient="records"),
                           "calibration": result.calibration})
    return result.summary()
