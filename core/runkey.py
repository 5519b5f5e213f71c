"""A run's comparison key: which recorded perplexities may be compared with each other (same
model, evaluation text, window length, windows and BOS; for pruned runs also the same
calibration text, windows, seqlen, seed and BOS)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, NamedTuple


class RunKey(NamedTuple):
    """A run's comparison key: ``eval_key`` (model and evaluation), ``key`` (with the
    calibration for prune runs; equal to ``eval_key`` for eval runs) and ``settings``, a
    short label such as "wiki · 24×256 · BOS none · calib wiki 16×256 seed 0"."""

    eval_key: str
    key: str
    settings: str


def missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _bos(mode: object, prepended: object) -> str:
    """The protocol a run used: ``auto``/``paper`` when BOS was prepended, else ``none``."""
    if missing(mode):
        return "?"
    return str(mode) if not missing(prepended) and bool(prepended) else "none"


def _value(value: object) -> str:
    if missing(value):
        return "?"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _short(dataset: object) -> str:
    text = _value(dataset)
    return Path(text).name if ("/" in text or os.sep in text) else text


def run_key(row: Mapping[str, object]) -> RunKey:
    """The comparison key of a run (a registry row, or a mapping with its columns)."""
    seqlen, windows = _value(row.get("eval_seqlen")), _value(row.get("eval_windows"))
    bos = _bos(row.get("eval_bos"), row.get("eval_bos_prepended"))
    eval_key = "|".join([_value(row.get("model_identity")), f"eval={_value(row.get('eval_dataset'))}",
                         f"seqlen={seqlen}", f"windows={windows}", f"bos={bos}"])
    settings = f"{_short(row.get('eval_dataset'))} · {windows}×{seqlen} · BOS {bos}"
    if row.get("kind") != "prune":
        return RunKey(eval_key, eval_key, settings)
    calib = row.get("calibration")
    if not isinstance(calib, Mapping) or not calib:
        return RunKey(eval_key, f"{eval_key}|calib=none", f"{settings} · no calibration")
    mode, prepended = row.get("calib_bos"), row.get("calib_bos_prepended")
    if missing(mode):      # a row written without the columns: the calibration's own record
        mode, prepended = calib.get("bos"), calib.get("bos_prepended")
    cbos = _bos(mode, prepended)
    dataset = _value(calib.get("dataset", "given"))   # token ids passed in: no text recorded
    n, L, seed = (_value(calib.get(k)) for k in ("nsamples", "seqlen", "seed"))
    key = f"{eval_key}|calib={dataset}|nsamples={n}|calib_seqlen={L}|seed={seed}|calib_bos={cbos}"
    label = f"calib {_short(dataset)} {n}×{L} seed {seed}" + (f" BOS {cbos}" if cbos not in (bos, "?") else "")
    return RunKey(eval_key, key, f"{settings} · {label}")
