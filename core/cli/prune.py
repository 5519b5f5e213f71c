"""The ``prune``, ``eval``, ``sweep`` and ``tune`` (alias ``tune-epsilon``) sub-commands: recorded pruning and
perplexity runs, described by a ``PruneSpec`` built from the parsed options."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..checks import choice, output_file
from ..choices import ALLOCATION_METHODS, BOS_MODES, DEFAULT_EPSILONS, DEFAULT_METRIC_COLUMNS, MAPPINGS
from ..choices import PRUNE_METHODS, XMIN_METHODS
from ..config import DTYPES, atomic_file
from ..spec import ALLOCATIONS, PruneSpec
from ..progress import Progress
from ..runkey import run_key
from ..zeroshot import with_accuracy
from .analyze import add_overwrite, add_parallel, add_ray, only_with
from .zeroshot import check_zeroshot, opts_zeroshot
from .jsonout import dumps


# --- shared options ------------------------------------------------------------------------

def _opts_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="demo (default), a Hugging Face folder, a .gguf file or a hub id")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default float32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code")
    p.add_argument("--bos", default="auto", choices=BOS_MODES, help="beginning-of-sequence token of every "
                   "calibration and evaluation window: auto (default; when the tokenizer adds one), paper (only "
                   "the start of the text, the published scripts' protocol) or none")
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
    p.add_argument("--dataset", metavar="NAME|FILE",
                   help="evaluation text: wiki (embedded eval part, default), wikitext2, c4 or a text FILE")
    p.add_argument("--max-windows", type=int, help="evaluate only the first K windows (quick looks)")


def _opts_alpha(p: argparse.ArgumentParser, *, xmin: bool = True) -> None:
    p.add_argument("--mapping", default="block", choices=MAPPINGS, help="AlphaPruning mapping (default block)")
    if xmin:
        p.add_argument("--xmin", default="peak", choices=XMIN_METHODS, help="how the power-law fits behind the "
                       "metric choose xmin (default peak; see tune)")
    p.add_argument("--metrics", metavar="FILE", help="alpha from a table of `spectrascope analyze --out` "
                   "instead of analysing now")


def _opts_limits(p: argparse.ArgumentParser, *, metric: bool = True) -> None:
    """The allocation's score column and limits (prune, sweep; tune scores its own columns)."""
    if metric:
        p.add_argument("--metric", default="alpha", help="AlphaPruning's score column (default alpha)")
    p.add_argument("--r-max", type=float, help="upper bound of any ratio (default 0.99)")
    p.add_argument("--dense-kinds", default="", metavar="KINDS", help="kinds kept dense, e.g. k,v")


def _floats(text: str, name: str) -> list[float]:
    """Comma-separated fractions in [0, 1) (sparsities, epsilons), each checked before any work."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} {text!r}: give comma-separated numbers, e.g. 0.5,0.6,0.7") from None
    bad = [f"{v:g}" for v in values if not 0.0 <= v < 1.0]
    if bad or not values:
        what = f"{', '.join(bad)} not in [0, 1)" if bad else "no value"
        raise ValueError(f"{name} {text!r}: {what}; give comma-separated fractions in [0, 1), e.g. 0.5,0.6,0.7")
    return values


def alpha_options(args: argparse.Namespace, allocation: str) -> None:
    """AlphaPruning's own options are refused with another allocation (see ``core.allocation.allocate``)."""
    only_with(args, "--allocation alpha", "--metrics", "--reverse", holds=allocation == "alpha")
    only_with(args, "--allocation alpha or sensitivity", "--epsilon", holds=allocation in ("alpha", "sensitivity"))


def _zeroshot_options(args: argparse.Namespace) -> None:
    only_with(args, "--zeroshot", "--zeroshot-limit", "--task-dir")


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _epsilon(text: str) -> float | str:
    """``--epsilon``: a number, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor auto") from None


def parse_epsilons(text: str, methods: list[str]) -> dict[str, list[float | str]]:
    """``0.2,0.3`` (every method) or ``wanda=0.3,sparsegpt=0.2`` (per method; both may mix);
    ``auto`` tunes each run's epsilon (``--epsilon auto``)."""
    out: dict[str, list[float]] = {}
    for item in _names(text):
        method, _, value = item.rpartition("=")
        if method and method not in methods:
            raise ValueError(f"--epsilons {text!r}: {method!r} is not one of the methods ({', '.join(methods)})")
        for m in [method] if method else methods:
            out.setdefault(m, []).extend(["auto"] if value.strip().lower() == "auto" else _floats(value, "--epsilons"))
    return out


# --- prune ---------------------------------------------------------------------------------

def add_prune(p: argparse.ArgumentParser) -> None:
    _opts_model(p)
    p.add_argument("--method", required=True, choices=PRUNE_METHODS)
    p.add_argument("--allocation", choices=ALLOCATIONS, help="layer-wise ratios: uniform (default), alpha "
                   "(AlphaPruning), owl or sensitivity (measured by `spectrascope sensitivity`, or now; cached); file with "
                   "--ratios (the default then)")
    p.add_argument("--sparsity", type=float, default=0.5, help="target parameter-weighted sparsity (default 0.5)")
    p.add_argument("--epsilon", type=_epsilon, help="AlphaPruning's tau range, or auto (the default with the "
                   "model's own metrics: fast tuning on held-out calibration text chooses epsilon and xmin, and "
                   "uniform, epsilon 0, when no epsilon > 0 beats it; a --metrics profile or --streaming keeps 0.3)")
    _opts_alpha(p)
    _opts_limits(p)
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
    p.add_argument("--eval-bos", choices=BOS_MODES, help="BOS of the evaluation windows (default: --bos)")
    opts_zeroshot(p)
    p.add_argument("--analyze-output", action="store_true", help="analyse the pruned model too (cached; "
                   "`spectrascope compare demo run:ID` then compares it with the dense model)")
    p.add_argument("--streaming", action="store_true", help="models larger than memory: read one block at a "
                   "time from the safetensors shards and write it pruned to --save; --eval then evaluates each "
                   "pruned block as it is written (--save or --eval required)")
    _opts_placement(p)


def _opts_placement(p: argparse.ArgumentParser) -> None:
    """``--devices`` of one run (prune, eval): its blocks placed across several devices."""
    p.add_argument("--devices", dest="placement_devices", metavar="LIST",
                   help="place this run's blocks across several devices of this machine, e.g. 0,1 or cuda:0,cpu "
                   "or cuda (every visible GPU): contiguous ranges balanced by parameter bytes, each block pruned "
                   "and evaluated on its device (a model larger than one GPU; same numbers as one device). One "
                   "device is --device")


def _opts_streaming(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streaming", action="store_true", help="models larger than memory: read one block at a "
                   "time from the safetensors shards (evaluation block by block, same perplexity)")


def run_prune(args: argparse.Namespace, progress: Progress) -> str:
    only_with(args, "--eval", "--dataset", "--eval-seqlen", "--eval-bos", "--max-windows")
    _zeroshot_options(args)
    alpha_options(args, args.allocation or ("file" if args.ratios else "uniform"))
    spec = PruneSpec.from_args(args)     # the checks: a refusal loads nothing (nor torch)
    check_zeroshot(spec)
    from ..experiments import prune_and_eval

    run = prune_and_eval(spec, progress=progress)
    if args.json:
        return dumps({**run.to_dict(), "matrices": run.matrices.to_dict(orient="records")})
    m = run.matrices
    lines = [f"run {run.run_id}: {run.method} {run.allocation} requested {run.sparsity:.4f}, achieved "
             f"{run.achieved:.4f} over {len(m)} matrices in {run.prune_seconds:.1f} s",
             f"ratio range {m['ratio'].min():.4f}..{m['ratio'].max():.4f}; largest |achieved - ratio| "
             f"{(m['achieved'] - m['ratio']).abs().max():.2e}"]
    if run.perplexity is not None:
        lines.append(run.perplexity.summary())
    if run.zeroshot is not None:
        lines.append(run.zeroshot.summary())
    if run.output_dir:
        lines.append(f"saved to {run.output_dir}")
    return "\n".join(lines)


# --- eval ----------------------------------------------------------------------------------

def add_eval(p: argparse.ArgumentParser) -> None:
    _opts_model(p)
    _opts_eval(p)
    p.add_argument("--seqlen", type=int, default=2048, help="window length, capped at the context (default 2048)")
    _opts_streaming(p)
    _opts_placement(p)


def run_eval(args: argparse.Namespace, progress: Progress) -> str:
    spec = PruneSpec.from_args(args)     # the checks: a refusal loads nothing (nor torch)
    from ..experiments import eval_run
    from ..registry import Registry

    registry = Registry()
    run_id, ppl = eval_run(spec, registry=registry, progress=progress)
    if args.json:
        return dumps({"run_id": run_id, **ppl.to_dict(), **run_key(registry.get(run_id))._asdict()})
    return f"run {run_id}: {ppl.summary()}"


# --- sweep ---------------------------------------------------------------------------------

def add_sweep(p: argparse.ArgumentParser) -> None:
    _opts_model(p)
    p.add_argument("--methods", default=",".join(PRUNE_METHODS), help="comma-separated (default all)")
    p.add_argument("--allocations", default=",".join(a for a in ALLOCATION_METHODS if a != "sensitivity"),
                   help=f"comma-separated, of {','.join(ALLOCATION_METHODS)} (default all but sensitivity, which "
                   "first measures each method's sensitivities at each sparsity: minutes each, then cached)")
    p.add_argument("--sparsities", default="0.5,0.6,0.7", help="comma-separated (default 0.5,0.6,0.7)")
    p.add_argument("--epsilons", help="AlphaPruning epsilons, comma-separated, for every method "
                   "(0.2,0.3) or per method (wanda=0.3,sparsegpt=auto); default auto: each method and sparsity "
                   "tuned on held-out calibration text, uniform when no epsilon > 0 beats it (--streaming: 0.3)")
    _opts_alpha(p)
    _opts_limits(p)
    _opts_calib(p)
    _opts_eval(p)
    p.add_argument("--out", default="sweep", metavar="STEM", help="writes STEM.csv and STEM.md (default sweep)")
    p.add_argument("--resume", action="store_true", help="reuse the runs of this sweep that finished earlier "
                   "(same model, same arguments, same versions; in the registry) and run only the missing ones")
    add_overwrite(p)
    opts_zeroshot(p)
    add_parallel(p)
    _opts_streaming(p)


def run_sweep(args: argparse.Namespace, progress: Progress) -> str:
    methods, allocations = _names(args.methods), _names(args.allocations)
    for option, names, known in (("--methods", methods, PRUNE_METHODS), ("--allocations", allocations, ALLOCATION_METHODS)):
        for name in names or [""]:
            choice(option, name, known)         # every name, before the model loads
    out_csv, out_md = (output_file(Path(args.out).with_suffix(s), "--out", overwrite=args.overwrite)
                       for s in (".csv", ".md"))
    sparsities = _floats(args.sparsities, "--sparsities")
    epsilons = parse_epsilons(args.epsilons, methods) if args.epsilons else None   # None: each spec's default
    _zeroshot_options(args)
    base = PruneSpec.from_args(args, method=methods[0] if methods else "wanda")
    check_zeroshot(base)
    from ..devices import devices_of
    from ..executor import executor_for
    from ..prepare import calibration_for, load_for
    from ..registry import Registry
    from ..sweeps import sweep, sweep_jobs, sweep_report

    registry = Registry()     # a read-only or damaged registry is refused before the model loads
    # every run's spec is valid (e.g. no sparsity above r_max) before the model loads
    jobs = sweep_jobs(base, methods=methods, allocations=allocations, sparsities=sparsities, epsilons=epsilons)
    # where the runs go (one per device, one Ray actor per slot); a wrong address fails before the model loads
    executor = executor_for(args.device, devices_of(args.device, args.devices), args.ray)
    start = time.perf_counter()
    loaded = load_for(base, progress)
    for spec in (s for kind, s in jobs if kind == "prune"):   # an allocation the model cannot have, before any work
        spec.check_reachable(loaded.matrices)
    needs = any(m != "magnitude" for m in methods) or "owl" in allocations
    calib = calibration_for(base, loaded) if needs else None
    table = sweep(base, methods=methods, allocations=allocations, sparsities=sparsities, epsilons=epsilons,
                  calibration=calib, loaded=loaded, ship_model=False, registry=registry, executor=executor,
                  resume=args.resume, progress=progress)
    seconds = time.perf_counter() - start
    table = with_accuracy(table)
    atomic_file(out_csv, lambda tmp: table.to_csv(tmp, index=False), overwrite=args.overwrite)
    md = sweep_report(table, base, model=loaded.source, calibration=calib, seconds=seconds)
    atomic_file(out_md, lambda tmp: tmp.write_text(md), overwrite=args.overwrite)
    if args.json:
        return dumps({"seconds": seconds, "rows": table.to_dict(orient="records")})
    return f"{md}\nwrote {out_csv} and {out_md} (dense perplexity {table.iloc[0]['perplexity']:.3f})"


# --- tune ----------------------------------------------------------------------------------

def add_tune(p: argparse.ArgumentParser) -> None:
    _opts_model(p)
    p.add_argument("--method", default="wanda", choices=PRUNE_METHODS)
    p.add_argument("--sparsity", type=float, default=0.7, help="target sparsity (default 0.7)")
    p.add_argument("--epsilons", default=",".join(f"{e:g}" for e in DEFAULT_EPSILONS),
                   help="grid (default 0,0.1,...,0.5)")
    p.add_argument("--xmins", default=",".join(XMIN_METHODS), help="xmin methods of the power-law fits, "
                   f"comma-separated (default all: {','.join(XMIN_METHODS)}; the eigenvalues are computed once)")
    p.add_argument("--metrics-cols", default=",".join(DEFAULT_METRIC_COLUMNS), metavar="COLS",
                   help="metric columns scored, any numeric column of the analysis table (default alpha,alpha_hat)")
    _opts_alpha(p, xmin=False)
    _opts_limits(p, metric=False)
    p.add_argument("--holdout", type=float, default=0.1, help="held-out share of the calibration text (default 0.1)")
    p.add_argument("--holdout-windows", type=int, default=16, help="held-out windows scored (default 16)")
    _opts_calib(p)
    p.add_argument("--out", metavar="FILE.csv", help="write the table of all scores as CSV")
    add_overwrite(p)
    p.add_argument("--fast", action="store_true", help="score every candidate with masks from one pass of the "
                   "dense model's statistics, then confirm the best and uniform with the full protocol; chooses "
                   "uniform (epsilon 0) when no epsilon > 0 beats it (what --epsilon auto runs)")
    add_ray(p, "one epsilon per Ray actor at a time")


def run_tune(args: argparse.Namespace, progress: Progress) -> str:
    out = output_file(args.out, "--out", overwrite=args.overwrite) if args.out else None   # before the work
    spec, epsilons = PruneSpec.from_args(args, allocation="alpha"), _floats(args.epsilons, "--epsilons")
    if args.fast and args.ray:
        raise ValueError("--fast with --ray: fast tuning runs in one process (one statistics pass, then cheap "
                         "masks); drop one of them")
    grid = dict(epsilons=epsilons, xmins=_names(args.xmins), metric_columns=_names(args.metrics_cols),
                holdout=args.holdout, holdout_windows=args.holdout_windows, progress=progress)
    if args.fast:
        from ..fasttune import FAST_WINDOWS, fast_tune

        result = fast_tune(spec, confirm_windows=args.holdout_windows, **{**grid, "holdout_windows": FAST_WINDOWS})
    else:
        from ..executor import executor_for
        from ..tuning import tune

        executor = executor_for(spec.device, None, args.ray)      # a wrong address fails before the model loads
        result = tune(spec, executor=executor, **grid)
    if out is not None:
        atomic_file(out, lambda tmp: result.table.to_csv(tmp, index=False), overwrite=args.overwrite)
    if args.json:
        return dumps(result.to_dict())
    return result.summary() + (f"\nwrote {out}" if out else "")
