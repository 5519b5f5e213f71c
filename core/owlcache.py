"""OWL's outlier scores cached on disk, so they are computed once (by a background job) and
read by anyone: ``$SPECTRASCOPE_HOME/owl/<key>.json``, keyed by the model's identity, the
calibration settings (text, windows, tokens per window, seed, BOS mode) and the outlier
multiple ``m``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .calibration import DEFAULT_SEED, Calibration, calibration_data
from .config import atomic_file, home
from .models import LoadedModel
from .progress import Progress
from .pruning import OWL_M, owl_scores
from .texts import EMBEDDED

log = logging.getLogger(__name__)

OWL_CACHE_VERSION = "1"   # bump when a change alters the scores


@dataclass(frozen=True)
class OwlSettings:
    """What the scores depend on besides the weights: the calibration windows and ``m``."""

    dataset: str = EMBEDDED
    nsamples: int = 16
    seqlen: int = 128
    seed: int = DEFAULT_SEED
    bos: str = "auto"
    m: float = OWL_M

    def label(self) -> str:
        return f"{self.nsamples} x {self.seqlen} tokens of {self.dataset}, seed {self.seed}, BOS {self.bos}, M {self.m:g}"


@dataclass
class OwlScores:
    """Per block the share D_l of outlier Wanda scores, and where they come from."""

    identity: str
    settings: OwlSettings
    scores: dict[int, float]
    path: Path
    cached: bool
    seconds: float

    def to_dict(self) -> dict:
        return {"identity": self.identity, "settings": vars(self.settings), "scores": self.scores,
                "path": str(self.path), "cached": self.cached, "seconds": self.seconds}


def cache_path(identity: str, settings: OwlSettings) -> Path:
    """The cache file of ``identity`` (a model's weights identity) with ``settings``."""
    if not identity:
        raise ValueError("identity='': give the model's weights identity (LoadedModel.identity)")
    key = json.dumps({"identity": identity, **vars(settings), "version": OWL_CACHE_VERSION}, sort_keys=True)
    return home() / "owl" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def read_owl_scores(identity: str, settings: OwlSettings) -> dict[int, float] | None:
    """The cached scores of ``identity`` with ``settings``, or ``None`` when not computed yet."""
    path = cache_path(identity, settings)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {int(block): float(share) for block, share in data["scores"].items()}


def settings_of(calibration: Calibration, m: float = OWL_M) -> OwlSettings:
    """The cache settings of scores computed on ``calibration``."""
    return OwlSettings(calibration.dataset, calibration.nsamples, calibration.seqlen, calibration.seed,
                       calibration.bos, m)


def owl_scores_cached(loaded: LoadedModel, settings: OwlSettings = OwlSettings(), *, device: str = "auto",
                      progress: Progress = None, cancel: object = None,
                      calibration: Calibration | None = None) -> OwlScores:
    """OWL's scores of ``loaded`` with ``settings``: from the cache, or computed (on the
    ``calib`` part of the text, never the evaluation text; on ``calibration`` when given, whose
    settings must be ``settings``) and cached."""
    path = cache_path(loaded.identity, settings)
    start = time.perf_counter()
    scores = read_owl_scores(loaded.identity, settings)
    if scores is not None:
        log.info("OWL scores of %s (%s) read from %s", loaded.source, settings.label(), path)
        return OwlScores(loaded.identity, settings, scores, path, True, time.perf_counter() - start)
    calib = calibration or calibration_data(loaded.tokenizer, dataset=settings.dataset, nsamples=settings.nsamples,
                                            seqlen=settings.seqlen, seed=settings.seed, model=loaded.model,
                                            bos=settings.bos)
    scores = owl_scores(loaded, calib, m=settings.m, device=device, progress=progress, cancel=cancel)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"identity": loaded.identity, "model": loaded.source, **vars(settings),
              "calibration": calib.settings(), "scores": scores}
    atomic_file(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)), overwrite=True)
    log.info("OWL scores of %s (%s) cached in %s", loaded.source, settings.label(), path)
    return OwlScores(loaded.identity, settings, scores, path, False, time.perf_counter() - start)


def owl_scores_for(loaded: LoadedModel, calibration: object, *, device: str = "auto", progress: Progress = None,
                   cancel: object = None) -> dict[int, float]:
    """OWL's scores on ``calibration``: through the disk cache when it is a ``Calibration`` (so a
    prune job reuses the statistics the Allocation page computed with the same windows), else
    computed (bare token ids carry no settings to key a cache by)."""
    if isinstance(calibration, Calibration) and loaded.identity:
        return owl_scores_cached(loaded, settings_of(calibration), device=device, progress=progress, cancel=cancel,
                                 calibration=calibration).scores
    return owl_scores(loaded, calibration, device=device, progress=progress, cancel=cancel)
