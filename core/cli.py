"""The ``spectrascope`` command line: the same engine as the dashboard, with progress bars.

Each sub-command has a ``_add_<name>(subparsers)`` that declares its options and a
``_run_<name>(args)`` that calls the library and prints or writes the result. Errors a
user can fix (``ValueError``, ``FileNotFoundError``) are printed as one line, exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from typing import Iterator

from .progress import Progress


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A ``Progress`` callback drawing a tqdm bar on stderr (nothing when disabled)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = None   # drawn on the first report, so a cached result prints no empty bar

    def update(done: int, total: int, message: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
        if bar.total != total:
            bar.reset(total=total)
        bar.n = done
        bar.set_description_str(message[:40], refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


# --- analyze ---------------------------------------------------------------------------

def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="eigenvalue spectra, power-law fits and HT-SR metrics of every matrix")
    p.add_argument("--model", default="demo", help="demo (default), a Hugging Face folder, a .gguf file, "
                   "a .safetensors file or a hub id")
    p.add_argument("--xmin", default="peak", choices=["full", "peak", "peak-compat", "mid"],
                   help="how xmin is chosen (default peak; see the README)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--out", help="write the table to FILE.csv or FILE.parquet")
    p.add_argument("--eigs", help="write every matrix's eigenvalues to FILE.npz (key: matrix name)")
    p.add_argument("--streaming", action="store_true",
                   help="read a safetensors checkpoint one tensor at a time (models larger than memory)")
    p.add_argument("--no-cache", action="store_true", help="recompute even if a cached result exists")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def _run_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze

    with progress_bar(not args.quiet) as progress:
        result = analyze(args.model, xmin=args.xmin, device=args.device, streaming=args.streaming,
                         use_cache=not args.no_cache, trust_remote_code=args.trust_remote_code,
                         progress=progress)
    if args.out:
        result.save_table(args.out)
    if args.eigs:
        result.save_eigs(args.eigs)
    if not args.quiet:
        print(result.summary())
    return 0


# --- allocate --------------------------------------------------------------------------
# (layer-wise sparsity ratios; issue 3)

def _add_allocate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("allocate", help="layer-wise sparsity ratios (AlphaPruning) from a metrics table")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--metrics", metavar="FILE", help="a table written by `spectrascope analyze --out` "
                        "(.csv or .parquet)")
    source.add_argument("--profile", metavar="NAME", help="a published LLaMA alpha profile, e.g. llama-7b-hf "
                        "(an unknown name lists them all)")
    p.add_argument("--metric", default="alpha", help="the score column (default alpha)")
    p.add_argument("--method", default="alpha", choices=["alpha", "uniform"], help="default alpha (AlphaPruning)")
    p.add_argument("--mapping", default="block", choices=["block", "matrix"],
                   help="block (default): each matrix takes its block's mean metric; matrix: its own")
    p.add_argument("--sparsity", type=float, required=True, help="target parameter-weighted sparsity S, 0 <= S < 1")
    p.add_argument("--epsilon", type=float, help="tau range: ratios span about S(1 - eps)..S(1 + eps) (default 0.3)")
    p.add_argument("--r-max", type=float, help="upper bound of any ratio (default 0.99)")
    p.add_argument("--dense-kinds", default="", metavar="KINDS",
                   help="comma-separated kinds kept dense, e.g. k,v (the mean over all matrices is still S)")
    p.add_argument("--reverse", action="store_true", help="prune lower-metric matrices more (ablation)")
    p.add_argument("--out", metavar="FILE.csv", help="write name, block, kind, params, metric, ratio")
    p.add_argument("--quiet", action="store_true", help="no summary")


def _run_allocate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pandas as pd

    from .allocation import allocate
    from .profiles import load_profile

    if args.profile:
        table = load_profile(args.profile)
    else:
        path = Path(args.metrics)
        if not path.is_file():
            raise FileNotFoundError(f"--metrics {path}: no such file; write one with `spectrascope analyze --out`")
        table = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    options = {"epsilon": args.epsilon, "r_max": args.r_max}
    result = allocate(table, sparsity=args.sparsity, method=args.method, metric=args.metric, mapping=args.mapping,
                      dense_kinds=args.dense_kinds, reverse=args.reverse,
                      **{k: v for k, v in options.items() if v is not None})
    if args.out:
        result.to_csv(args.out)
    if not args.quiet:
        print(result.summary())
    return 0


# --- prune -----------------------------------------------------------------------------
# (pruning, perplexity, recorded runs, sweeps and epsilon tuning; issue 4)

def _opts_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="demo (default), a Hugging Face folder, a .gguf file or a hub id")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _opts_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="wiki", metavar="DATASET",
                   help="calibration text: wiki (embedded, default), wikitext2, c4 or a text FILE")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window, capped at the model's context "
                   "(default 2048; also the evaluation window)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window starts (default 0)")


def _opts_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="wiki", metavar="NAME|FILE",
                   help="evaluation text: wiki (embedded eval part, default), wikitext2, c4 or a text FILE")
    p.add_argument("--max-windows", type=int, help="evaluate only the first K windows (quick looks)")


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} {text!r}: give comma-separated numbers, e.g. 0.5,0.6,0.7") from None


def _epsilons(text: str, methods: list[str]) -> dict[str, list[float]]:
    """``0.2,0.3`` (every method) or ``wanda=0.3,sparsegpt=0.2`` (per method; both may mix)."""
    out: dict[str, list[float]] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        method, _, value = item.rpartition("=")
        if method and method not in methods:
            raise ValueError(f"--epsilons {text!r}: {method!r} is not one of the methods ({', '.join(methods)})")
        for m in [method] if method else methods:
            out.setdefault(m, []).extend(_floats(value, "--epsilons"))
    return out


def _load_for(args: argparse.Namespace, progress):
    from .models import load_model

    return load_model(args.model, device="cpu", dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      progress=progress)


def _calibration_for(args: argparse.Namespace, loaded, needed: bool):
    from .calibration import calibration_data

    if not needed:
        return None
    return calibration_data(loaded.tokenizer, dataset=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                            seed=args.seed, model=loaded.model)


def _metrics_for(args: argparse.Namespace):
    if not getattr(args, "metrics", None):
        return None
    from pathlib import Path

    import pandas as pd

    path = Path(args.metrics)
    if not path.is_file():
        raise FileNotFoundError(f"--metrics {path}: no such file; write one with `spectrascope analyze --out`")
    return pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model (magnitude, Wanda, SparseGPT) with uniform, AlphaPruning or "
                       "OWL ratios; optionally evaluate and save it")
    _opts_model(p)
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--allocation", default="uniform", choices=["uniform", "alpha", "owl"],
                   help="layer-wise ratios: uniform (default), alpha (AlphaPruning) or owl")
    p.add_argument("--sparsity", type=float, default=0.5, help="target parameter-weighted sparsity (default 0.5)")
    p.add_argument("--epsilon", type=float, help="AlphaPruning's tau range (default 0.3; see tune-epsilon)")
    p.add_argument("--mapping", default="block", choices=["block", "matrix"], help="AlphaPruning mapping")
    p.add_argument("--metrics", metavar="FILE", help="alpha from a table of `spectrascope analyze --out` "
                   "instead of analysing now")
    p.add_argument("--metric", default="alpha", help="AlphaPruning's score column (default alpha)")
    p.add_argument("--r-max", type=float, help="upper bound of any ratio (default 0.99)")
    p.add_argument("--dense-kinds", default="", metavar="KINDS", help="kinds kept dense, e.g. k,v")
    p.add_argument("--reverse", action="store_true", help="prune lower-metric matrices more (ablation)")
    p.add_argument("--ratios", metavar="FILE.csv", help="per-matrix ratios (columns name, ratio) from "
                   "`spectrascope allocate --out` or the dashboard; --allocation then only labels the run")
    p.add_argument("--nm", metavar="N:M", help="semi-structured N:M sparsity, e.g. 2:4 or 4:8 (ratios ignored)")
    _opts_calib(p)
    p.add_argument("--save", metavar="DIR", help="write the pruned model as a Hugging Face folder (new DIR)")
    p.add_argument("--eval", action="store_true", help="measure perplexity of the pruned model")
    _opts_eval(p)


def _run_prune(args: argparse.Namespace) -> int:
    import json

    from .runs import prune_and_eval, read_ratios

    options = {k: v for k, v in {"metric": args.metric, "r_max": args.r_max, "dense_kinds": args.dense_kinds,
                                 "reverse": args.reverse}.items() if v not in (None, "", False)}
    with progress_bar(not args.quiet) as progress:
        loaded = _load_for(args, progress)
        ratios = read_ratios(args.ratios, loaded) if args.ratios else None
        calib = _calibration_for(args, loaded, args.method != "magnitude" or (args.allocation == "owl" and not ratios))
        run = prune_and_eval(loaded, method=args.method, allocation=args.allocation, sparsity=args.sparsity,
                             epsilon=args.epsilon, mapping=args.mapping, nm=args.nm, calibration=calib,
                             evaluate=args.eval, eval_dataset=args.dataset, eval_seqlen=args.seqlen,
                             max_windows=args.max_windows, save=args.save, device=args.device,
                             metrics=None if ratios else _metrics_for(args), ratios=ratios, options=options,
                             progress=progress)
    if args.json:
        print(json.dumps({**run.to_dict(), "matrices": run.matrices.to_dict(orient="records")}, default=str))
        return 0
    m = run.matrices
    print(f"run {run.run_id}: {run.method} {run.allocation} requested {run.sparsity:.4f}, achieved "
          f"{run.achieved:.4f} over {len(m)} matrices in {run.prune_seconds:.1f} s")
    print(f"ratio range {m['ratio'].min():.4f}..{m['ratio'].max():.4f}; largest |achieved - ratio| "
          f"{(m['achieved'] - m['ratio']).abs().max():.2e}")
    if run.perplexity is not None:
        print(run.perplexity.summary())
    if run.output_dir:
        print(f"saved to {run.output_dir}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a model (WikiText-2 protocol) on the evaluation text")
    _opts_model(p)
    _opts_eval(p)
    p.add_argument("--seqlen", type=int, default=2048, help="window length, capped at the context (default 2048)")


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from .runs import eval_run

    with progress_bar(not args.quiet) as progress:
        loaded = _load_for(args, progress)
        run_id, ppl = eval_run(loaded, dataset=args.dataset, seqlen=args.seqlen, max_windows=args.max_windows,
                               device=args.device, progress=progress)
    print(json.dumps({"run_id": run_id, **ppl.to_dict()}) if args.json else f"run {run_id}: {ppl.summary()}")
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="a grid of methods x allocations x sparsities x epsilons into one "
                       "perplexity table (CSV and Markdown)")
    _opts_model(p)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt", help="comma-separated (default all three)")
    p.add_argument("--allocations", default="uniform,alpha,owl", help="comma-separated (default all three)")
    p.add_argument("--sparsities", default="0.5,0.6,0.7", help="comma-separated (default 0.5,0.6,0.7)")
    p.add_argument("--epsilons", default="0.3", help="AlphaPruning epsilons, comma-separated, for every method "
                   "(0.2,0.3) or per method (wanda=0.3,sparsegpt=0.2; default 0.3)")
    p.add_argument("--metrics", metavar="FILE", help="alpha from a table of `spectrascope analyze --out`")
    _opts_calib(p)
    _opts_eval(p)
    p.add_argument("--out", default="sweep", metavar="STEM", help="writes STEM.csv and STEM.md (default sweep)")


def _run_sweep(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from .runs import pivot, sweep, to_markdown

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    allocations = [a.strip() for a in args.allocations.split(",") if a.strip()]
    start = time.perf_counter()
    with progress_bar(not args.quiet) as progress:
        loaded = _load_for(args, progress)
        calib = _calibration_for(args, loaded, any(m != "magnitude" for m in methods) or "owl" in allocations)
        table = sweep(loaded, methods=methods, allocations=allocations,
                      sparsities=_floats(args.sparsities, "--sparsities"),
                      epsilons=_epsilons(args.epsilons, methods), calibration=calib, eval_dataset=args.dataset,
                      eval_seqlen=args.seqlen, max_windows=args.max_windows, device=args.device,
                      metrics=_metrics_for(args), progress=progress)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    table.to_csv(out.with_suffix(".csv"), index=False)
    calib_text = (f"calibration {calib.nsamples} x {calib.seqlen} tokens of {calib.dataset} (seed {calib.seed})"
                  if calib is not None else "no calibration")
    first = table.iloc[0]
    header = (f"Model {loaded.source}; evaluation {args.dataset}, windows of {args.seqlen} tokens"
              + (f" (first {args.max_windows})" if args.max_windows else "") + f"; {calib_text}; "
              f"device {args.device}; total {seconds / 60:.1f} min.")
    md = f"{header}\n\nPerplexity:\n\n{to_markdown(pivot(table))}\n\nAll runs:\n\n{to_markdown(table)}\n"
    out.with_suffix(".md").write_text(md)
    if args.json:
        print(json.dumps({"seconds": seconds, "rows": table.to_dict(orient="records")}, default=str))
    else:
        print(md)
        print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')} (dense perplexity "
              f"{first['perplexity']:.3f})")
    return 0


def _add_tune_epsilon(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune-epsilon", help="pick AlphaPruning's epsilon by perplexity on held-out calibration "
                       "text (never the evaluation text)")
    _opts_model(p)
    p.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, default=0.7, help="target sparsity (default 0.7)")
    p.add_argument("--epsilons", default="0,0.1,0.2,0.3,0.4,0.5", help="grid (default 0,0.1,...,0.5)")
    p.add_argument("--mapping", default="block", choices=["block", "matrix"])
    p.add_argument("--metrics", metavar="FILE", help="alpha from a table of `spectrascope analyze --out`")
    p.add_argument("--holdout-windows", type=int, default=16, help="held-out windows scored (default 16)")
    _opts_calib(p)


def _run_tune_epsilon(args: argparse.Namespace) -> int:
    import json

    from .runs import tune_epsilon

    with progress_bar(not args.quiet) as progress:
        loaded = _load_for(args, progress)
        result = tune_epsilon(loaded, method=args.method, sparsity=args.sparsity,
                              epsilons=_floats(args.epsilons, "--epsilons"), dataset=args.calib,
                              nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                              holdout_windows=args.holdout_windows, mapping=args.mapping, device=args.device,
                              metrics=_metrics_for(args), progress=progress)
    if args.json:
        print(json.dumps({"best": result.best, "rows": result.table.to_dict(orient="records"),
                          "calibration": result.calibration}))
    else:
        print(result.summary())
    return 0


# --- main ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectrascope", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, value in sorted(globals().items()):
        if name.startswith("_add_") and callable(value):
            value(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    runner = globals()[f"_run_{args.command.replace('-', '_')}"]
    try:
        return int(runner(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"spectrascope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spectrascope {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
