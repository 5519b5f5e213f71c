"""The ``sensitivity`` sub-command: does the metric predict what matters on this model? Each
block (or matrix kind of each block) pruned alone, the rise in held-out loss, and its Spearman
correlation with a metric of the analysis table (``core.sensitivity``)."""
from __future__ import annotations

import argparse

from ..checks import choice, fraction, model_source, output_file, path, whole
from ..choices import BOS_MODES, PRUNE_METHODS, XMIN_METHODS
from ..progress import Progress
from .analyze import add_overwrite, add_run_options
from .jsonout import dumps


def add_sensitivity(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="demo", help="demo (default), a Hugging Face folder, a .gguf file "
                   "or a hub id")
    p.add_argument("--method", default="wanda", choices=PRUNE_METHODS, help="pruning method (default wanda)")
    p.add_argument("--sparsity", type=float, default=0.5, help="sparsity of each part pruned alone, 0 < S < 1 "
                   "(default 0.5)")
    p.add_argument("--per", default="block", choices=("block", "matrix"), help="block (default): each block "
                   "pruned alone; matrix: each matrix kind of each block (7x the parts; correlations per kind too)")
    p.add_argument("--metric", default="alpha", help="any numeric column of the analysis table (default alpha)")
    p.add_argument("--xmin", default="peak", choices=XMIN_METHODS, help="xmin method of the fits behind the metric "
                   "(default peak)")
    p.add_argument("--metrics", metavar="FILE", help="the metric from a table of `spectrascope analyze --out` "
                   "instead of analysing now")
    p.add_argument("--calib", default="wiki", metavar="DATASET", help="calibration text: wiki (embedded, default), "
                   "wikitext2, c4 or a text FILE; the held-out windows are its last --holdout share")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows for Wanda/SparseGPT (default 16)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration and held-out window (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window starts and the bootstrap (default 0)")
    p.add_argument("--bos", default="auto", choices=BOS_MODES, help="beginning-of-sequence token (default auto)")
    p.add_argument("--holdout", type=float, default=0.1, help="held-out share of the calibration text (default 0.1)")
    p.add_argument("--holdout-windows", type=int, default=4, help="held-out windows scored (default 4)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the 95%% interval "
                   "(default 1000)")
    p.add_argument("--out", metavar="FILE.csv", help="write one row per part: block, kind, the metric, delta_loss")
    add_overwrite(p)
    p.add_argument("--no-cache", action="store_true", help="measure again even if cached")
    add_run_options(p, "print the correlations as JSON")


def run_sensitivity(args: argparse.Namespace, progress: Progress) -> str:
    model = model_source(args.model, "MODEL")
    fraction("--sparsity", args.sparsity, low_open=True)
    whole("--bootstrap", args.bootstrap, 1)
    choice("--per", args.per, ("block", "matrix"))
    out = output_file(args.out, "--out", (".csv",), overwrite=args.overwrite) if args.out else None
    metrics_file = path("--metrics", args.metrics, must_exist=True)
    from ..spec import CalibrationSpec, PruneSpec

    spec = PruneSpec(model=model, method=args.method, sparsity=args.sparsity, metric=args.metric, xmin=args.xmin,
                     mapping=args.per, metrics_file=metrics_file, device=args.device, dtype=args.dtype,
                     trust_remote_code=args.trust_remote_code,
                     calibration=CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed, args.bos))
    from ..sensitivity import SensitivitySettings, check_metric, correlate, sensitivity_for

    settings = SensitivitySettings(method=args.method, sparsity=args.sparsity, per=args.per, dataset=args.calib,
                                   nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, bos=args.bos,
                                   holdout=args.holdout, holdout_windows=args.holdout_windows)
    from ..prepare import alpha_metrics, load_for

    loaded = load_for(spec, progress)
    metrics = alpha_metrics(spec, loaded, None, progress)
    check_metric(metrics, args.metric)      # an unknown or non-numeric column, before the measurement
    sens = sensitivity_for(loaded, settings, device=args.device, use_cache=not args.no_cache, progress=progress)
    report = correlate(sens, metrics, args.metric, bootstrap=args.bootstrap, seed=args.seed)
    if out is not None:
        report.to_csv(out, overwrite=args.overwrite)
    if args.json:
        return dumps({**report.to_dict(), "out": str(out) if out else None})
    return report.summary() + (f"\nwrote {out}" if out else "")
