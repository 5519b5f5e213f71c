"""The ``analyze`` and ``allocate`` sub-commands: spectra and HT-SR metrics of a model's
matrices, and layer-wise sparsity ratios from such a table."""
from __future__ import annotations

import argparse

from ..checks import choice, model_source, output_file, path, target_within_bound
from ..choices import ALLOCATION_METHODS, MAPPINGS, RECIPE_METHODS, XMIN_METHODS
from ..config import DTYPES
from ..progress import Progress


def add_analyze(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="demo (default), a Hugging Face folder, a .gguf file, "
                   "a .safetensors file or a hub id")
    p.add_argument("--xmin", default="peak", choices=XMIN_METHODS, help="how xmin is chosen (default peak; see "
                   "the README)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    add_parallel(p)
    p.add_argument("--out", help="write the table to FILE.csv or FILE.parquet")
    p.add_argument("--eigs", help="write every matrix's eigenvalues to FILE.npz (key: matrix name)")
    add_overwrite(p)
    p.add_argument("--streaming", action="store_true",
                   help="read a safetensors checkpoint one tensor at a time (models larger than memory; "
                   "with --devices or --ray each device or Ray task reads its own tensors, within 256 MiB)")
    p.add_argument("--no-cache", action="store_true", help="recompute even if a cached result exists")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def run_analyze(args: argparse.Namespace, progress: Progress) -> str:
    model_source(args.model, "--model")
    out = output_file(args.out, "--out", (".csv", ".parquet"), overwrite=args.overwrite) if args.out else None
    eigs = output_file(args.eigs, "--eigs", (".npz",), overwrite=args.overwrite) if args.eigs else None
    from ..analysis import analyze
    from ..devices import devices_of

    result = analyze(args.model, xmin=args.xmin, device=args.device, streaming=args.streaming,
                     use_cache=not args.no_cache, trust_remote_code=args.trust_remote_code,
                     devices=devices_of(args.device, args.devices), ray=args.ray, progress=progress)
    if out is not None:
        result.save_table(out, overwrite=args.overwrite)
    if eigs is not None:
        result.save_eigs(eigs, overwrite=args.overwrite)
    return "" if args.quiet else result.summary()


def add_allocate(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--metrics", metavar="FILE", help="a table written by `spectrascope analyze --out` "
                        "(.csv or .parquet)")
    source.add_argument("--profile", metavar="NAME", help="a published LLaMA alpha profile, e.g. llama-7b-hf "
                        "(an unknown name lists them all)")
    p.add_argument("--metric", default="alpha", help="the score column (default alpha)")
    # OWL and sensitivity need a model and calibration text, which a metrics table does not have: `prune` does it
    methods = [m for m in ALLOCATION_METHODS if m not in ("owl", "sensitivity")]
    p.add_argument("--method", default="alpha", choices=methods, help="default alpha (AlphaPruning)")
    p.add_argument("--mapping", default="block", choices=MAPPINGS,
                   help="block (default): each matrix takes its block's mean metric; matrix: its own")
    p.add_argument("--sparsity", type=float, required=True, help="target parameter-weighted sparsity S, 0 <= S < 1")
    p.add_argument("--epsilon", type=float, help="tau range: ratios span about S(1 - eps)..S(1 + eps) (default 0.3)")
    p.add_argument("--r-max", type=float, help="upper bound of any ratio (default 0.99)")
    p.add_argument("--dense-kinds", default="", metavar="KINDS",
                   help="comma-separated kinds kept dense, e.g. k,v (the mean over all matrices is still S)")
    p.add_argument("--reverse", action="store_true", help="prune lower-metric matrices more (ablation)")
    p.add_argument("--out", metavar="FILE.csv", help="write name, block, kind, params, metric, ratio")
    p.add_argument("--recipe", metavar="FILE.yaml", help="write the allocation as an llm-compressor recipe (each "
                   "matrix a target with its own sparsity; see docs/recipes.md)")
    p.add_argument("--recipe-method", metavar="METHOD", help="the recipe's pruner: wanda (default; "
                   "WandaPruningModifier) or sparsegpt (SparseGPTModifier)")
    p.add_argument("--nm", metavar="N:M", help="a semi-structured recipe: keep N of every M inputs, e.g. 2:4 "
                   "(llm-compressor's mask_structure; the ratios are then not used)")
    add_overwrite(p)
    p.add_argument("--quiet", action="store_true", help="no summary")


def run_allocate(args: argparse.Namespace, progress: Progress) -> str:
    only_with(args, "--method alpha", "--epsilon", "--reverse", holds=args.method == "alpha")
    only_with(args, "--recipe", "--recipe-method", "--nm")
    if args.out:     # the same check as every --out: a .csv, not into a model's folder, not over a file
        output_file(args.out, "--out", (".csv",), overwrite=args.overwrite)
    if args.recipe:
        output_file(args.recipe, "--recipe", (".yaml", ".yml"), overwrite=args.overwrite)
    recipe_method = args.recipe_method or "wanda"
    choice("--recipe-method", recipe_method, RECIPE_METHODS)
    if args.nm:
        from ..pruning.methods import parse_nm     # torch: only for a recipe with --nm
    nm = parse_nm(args.nm) if args.nm else None
    path("--metrics", args.metrics, must_exist=True)      # before the imports: a refusal answers at once
    target_within_bound(args.sparsity, args.epsilon, args.r_max)
    from ..allocation import allocate
    from ..metricsfile import read_metrics
    from ..profiles import load_profile
    from ..recipes import build_recipe

    table = load_profile(args.profile) if args.profile else read_metrics(args.metrics, args.metric)
    options = {k: v for k, v in {"epsilon": args.epsilon, "r_max": args.r_max}.items() if v is not None}
    result = allocate(table, sparsity=args.sparsity, method=args.method, metric=args.metric, mapping=args.mapping,
                      dense_kinds=args.dense_kinds, reverse=args.reverse, **options)
    recipe = build_recipe(result, recipe_method, nm=nm) if args.recipe else None   # refusals before any write
    if args.out:
        result.to_csv(args.out, overwrite=args.overwrite)
    if recipe is not None:
        recipe.write(args.recipe, overwrite=args.overwrite)
    if args.quiet:
        return ""
    return result.summary() + (f"\nrecipe: {recipe.modifier}, {len(recipe.targets)} targets -> {args.recipe}"
                               if recipe is not None else "")


def add_run_options(p: argparse.ArgumentParser, json_help: str) -> None:
    """``--device``, ``--dtype``, ``--trust-remote-code``, ``--json`` and ``--quiet`` of a command
    that loads a model and prints a result (sensitivity, zeroshot)."""
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default float32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code")
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_overwrite(p: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace existing output files (atomically; a symbolic link itself, never its target)."""
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (by default an existing "
                   "file is refused before any work; a symbolic link is replaced itself, never its target)")


def add_parallel(p: argparse.ArgumentParser) -> None:
    """``--devices`` and ``--ray [ADDRESS]`` (analyze and sweep)."""
    p.add_argument("--devices", metavar="LIST", help="several devices at once: GPU numbers (0,1,2,3), names "
                   "(cuda:0,cuda:1) or cuda for every visible GPU")
    add_ray(p, "run on Ray (one actor per GPU, else per CPU)")


def add_ray(p: argparse.ArgumentParser, what: str) -> None:
    """``--ray [ADDRESS]``: the one rule of every sub-command (``core.cluster.connect``)."""
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help=f"{what} (pip install 'spectrascope[cluster]'): --ray alone or --ray local starts a new "
                   "local Ray instance (even if a cluster runs here); --ray HOST:PORT joins the cluster whose head was "
                   "started with `ray start --head --port PORT`; --ray auto joins $RAY_ADDRESS or the cluster `ray "
                   "start` runs on this machine. A cluster with token authentication needs RAY_AUTH_MODE=token and "
                   "its token (RAY_AUTH_TOKEN) here too; ray:// (Ray Client) addresses are not supported")


def only_with(args: argparse.Namespace, needed: str, *options: str, holds: bool | None = None) -> None:
    """Refuse ``options`` given while ``needed`` (what they only matter with) does not hold: they
    would silently do nothing. ``holds`` defaults to whether the option ``needed`` is given;
    options are named as on the command line (``--max-windows``)."""
    if holds is None:
        holds = bool(getattr(args, _dest(needed), None))
    given = [o for o in options if getattr(args, _dest(o), None) not in (None, False)]
    if given and not holds:
        raise ValueError(f"{', '.join(given)} only matter{'s' if len(given) == 1 else ''} with {needed}, which is "
                         f"not given; add {needed} or drop {', '.join(given)}")


def _dest(option: str) -> str:
    return option.split()[0].lstrip("-").replace("-", "_")
