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

from .config import Progress


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A ``Progress`` callback drawing a tqdm bar on stderr (nothing when disabled)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=0, file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(done: int, total: int, message: str) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.n = done
        bar.set_description_str(message[:40], refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
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

    from .allocation import allocate, load_profile

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
