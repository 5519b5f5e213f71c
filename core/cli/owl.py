"""The ``owl-scores`` sub-command: OWL's per-block outlier scores of a model, computed once
and cached on disk (``core.owlcache``) for the dashboard's Allocation page and for scripts."""
from __future__ import annotations

import argparse

from ..choices import OWL_M
from ..progress import Progress
from ..spec import PruneSpec
from .prune import _opts_calib, _opts_model
from .jsonout import dumps


def add_owl_scores(p: argparse.ArgumentParser) -> None:
    _opts_model(p)
    _opts_calib(p)
    p.add_argument("--m", type=float, default=OWL_M, help=f"outlier threshold multiple (default {OWL_M:g}, OWL's M)")


def run_owl_scores(args: argparse.Namespace, progress: Progress) -> str:
    spec = PruneSpec.from_args(args, method="wanda", allocation="owl")   # validates model, calibration, device
    if not args.m > 0:
        raise ValueError(f"--m {args.m!r}: the outlier threshold multiple must be positive (OWL uses 5)")
    from ..prepare import load_for
    from ..owlcache import OwlSettings, owl_scores_cached

    c = spec.calibration
    settings = OwlSettings(dataset=c.dataset, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed, bos=c.bos,
                           m=args.m)
    result = owl_scores_cached(load_for(spec, progress), settings, device=spec.device, progress=progress)
    if args.json:
        return dumps(result.to_dict())
    shares = ", ".join(f"{b}: {s:.4f}" for b, s in result.scores.items())
    return (f"OWL scores ({settings.label()}) {'from cache' if result.cached else 'computed'} in "
            f"{result.seconds:.1f} s, {result.path}\n{shares}")
