"""Analysis: spectra + power-law fits + metrics of every prunable matrix, cached on disk.

``analyze(source)`` returns an ``Analysis`` whose ``table`` has one row per matrix with
the columns of ``COLUMNS`` (documented in the README) and whose ``eigs`` maps each
matrix name to its eigenvalues (ascending, float64). Eigenvalues at or below ``ZERO_RTOL``
times the largest (the null space of a pruned or low-rank matrix) are counted as ``n_zero``
and left out of the fit and the metrics; ``quant`` is a GGUF source's quantization type.
Results are cached under ``$SPECTRASCOPE_HOME/analyses/<key>`` keyed by the weights'
identity, the xmin method and the engine version: a second analysis of the same model
returns at once.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from .config import atomic_dir, atomic_file, home, resolve_device
from .devices import check_devices, spectra_on_devices
from .progress import Progress, report
from .fit import XMIN_METHODS, fit_power_laws
from .metrics import no_fit_status, spectral_metrics
from .models import LoadedModel, MatrixInfo, gguf_to_folder, iter_weights, load_model, resolve_source
from .quant import quant_types
from .spectra import Spectrum, compute_spectra

log = logging.getLogger(__name__)

ENGINE_VERSION = "2"   # bump when a change alters any number in the table

#: Columns of ``Analysis.table``, in order.
COLUMNS = ["name", "block", "kind", "rows", "cols", "params", "n_evals", "alpha", "xmin", "D", "sigma",
           "n_tail", "alpha_hat", "log_norm", "log_spectral_norm", "log_alpha_norm", "stable_rank",
           "entropy", "lambda_plus", "num_spikes", "mp_softrank", "rank", "w_var", "status", "n_zero", "quant"]

#: eigenvalues <= ZERO_RTOL * lambda_max count as zeros (n_zero): excluded from the fit and the metrics
#: (the smallest genuine one of the dense demo model is 1.7e-12 lambda_max)
ZERO_RTOL = 1e-12   # sigma <= 1e-6 sigma_max: below what float32 weights resolve


@dataclass
class Analysis:
    """The result of ``analyze``: the metrics table and every matrix's eigenvalues."""

    table: pd.DataFrame
    eigs: dict[str, np.ndarray]
    model: str
    identity: str
    xmin: str
    device: str
    seconds: float
    cached: bool = False
    meta: dict = field(default_factory=dict)

    def save_table(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the table as ``.csv`` or ``.parquet`` (atomically)."""
        path = Path(path)
        if path.suffix not in (".csv", ".parquet"):
            raise ValueError(f"--out {path}: use a .csv or .parquet file name")
        return atomic_file(path, lambda tmp: self.table.to_csv(tmp, index=False) if path.suffix == ".csv"
                       else self.table.to_parquet(tmp, index=False), overwrite=overwrite)

    def save_eigs(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write every matrix's eigenvalues to ``.npz`` under its name (atomically)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"--eigs {path}: use a .npz file name")

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **self.eigs)
        return atomic_file(path, write, overwrite=overwrite)

    def summary(self) -> str:
        t = self.table
        counts = t["status"].str.replace(r"^no fit.*", "no fit", regex=True).value_counts()
        lines = [f"{self.model}: {len(t)} matrices in {t['block'].nunique()} blocks, xmin={self.xmin}, "
                 f"{'cached' if self.cached else f'{self.seconds:.1f} s on {self.device}'}",
                 "status: " + ", ".join(f"{k} {v}" for k, v in counts.items())]
        if t["alpha"].notna().any():
            lines.append(f"alpha: median {t['alpha'].median():.3f}, min {t['alpha'].min():.3f}, "
                         f"max {t['alpha'].max():.3f}")
            by_kind = t.groupby("kind", sort=False)["alpha"].mean()
            lines.append("mean alpha by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items()))
        return "\n".join(lines)


def split_zeros(eigs: np.ndarray) -> tuple[np.ndarray, int]:
    """``eigs`` with every value <= ``ZERO_RTOL * max`` set to 0, and how many that are."""
    eigs = np.asarray(eigs, dtype=np.float64)
    if eigs.size == 0 or not np.all(np.isfinite(eigs)):
        return eigs, 0
    zero = eigs <= ZERO_RTOL * max(float(eigs.max()), 0.0)
    return np.where(zero, 0.0, eigs), int(zero.sum())


def build_table(spectra: list[Spectrum], *, xmin: str = "peak", device: str = "cpu",
                quant: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Fit and measure every spectrum; one row per matrix with the columns ``COLUMNS``."""
    cleaned = [split_zeros(s.eigs) for s in spectra]
    fits = fit_power_laws([e for e, _ in cleaned], xmin=xmin, device=device)
    rows = []
    for s, (eigs, n_zero), f in zip(spectra, cleaned, fits):
        i = s.info
        if s.reason:      # unusable matrix: every metric nan, the status says why
            m = spectral_metrics(np.full_like(s.eigs, np.nan), f, rows=i.rows, cols=i.cols, w_var=0.0)
            m.update({k: np.nan for k, v in m.items() if isinstance(v, float)}, status=no_fit_status(s.reason))
        else:
            m = spectral_metrics(eigs, f, rows=i.rows, cols=i.cols, w_var=s.w_var)
        rows.append({"name": i.name, "block": i.block, "kind": i.kind, "rows": i.rows, "cols": i.cols,
                     "params": i.params, "n_evals": int(s.eigs.size), "w_var": s.w_var, **m, "n_zero": n_zero,
                     "quant": (quant or {}).get(i.name, np.nan)})   # NaN (not None): a CSV round trip keeps it
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def cache_folder(identity: str, xmin: str) -> Path:
    """Where the analysis of the weights ``identity`` with ``xmin`` is cached (this engine version)."""
    key = f"{identity.replace(':', '-')}-{xmin}-v{ENGINE_VERSION}"
    return home() / "analyses" / key


_META_KEYS = {"model": str, "identity": str, "xmin": str, "device": str, "seconds": (int, float)}


def _load_cached(folder: Path, *, warn: bool = True) -> Analysis | None:
    """The cached analysis in ``folder``, or None (with a warning unless not ``warn``) if it is
    missing or damaged."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in _META_KEYS.items()):
            raise ValueError("meta.json lacks " + ", ".join(_META_KEYS))
        table = pd.read_parquet(folder / "table.parquet")
        with np.load(folder / "eigs.npz") as z:
            eigs = {k: z[k] for k in z.files}
        if list(table.columns) != COLUMNS or set(eigs) != set(table["name"]):
            raise ValueError("its table and eigenvalues do not match")
    except Exception as exc:  # noqa: BLE001 - parquet, zip and numpy raise many types for a damaged file
        if warn and (folder / "meta.json").exists():
            log.warning("ignoring the damaged analysis cache %s (%s: %s); recomputing it", folder,
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return None
    return Analysis(table, eigs, meta["model"], meta["identity"], meta["xmin"], meta["device"],
                    meta["seconds"], cached=True, meta=meta)


def _store(folder: Path, result: Analysis, *, keep_existing: bool = True) -> None:
    """Cache ``result`` in ``folder``. An existing complete entry is kept (same weights, same
    settings) unless ``keep_existing`` is False; a damaged one is always replaced."""
    def write(tmp: Path) -> None:
        result.table.to_parquet(tmp / "table.parquet", index=False)
        with open(tmp / "eigs.npz", "wb") as f:
            np.savez(f, **result.eigs)
        meta = {"model": result.model, "identity": result.identity, "xmin": result.xmin,
                "device": result.device, "seconds": result.seconds, "engine": ENGINE_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    try:
        atomic_dir(folder, write, replace=True,
                   keep=lambda d: keep_existing and _load_cached(d, warn=False) is not None)
    except OSError as exc:
        log.warning("could not cache the analysis in %s: %s", folder, exc)


def analyze(source: str | os.PathLike | LoadedModel = "demo", *, xmin: str = "peak", device: str = "auto",
            streaming: bool = False, use_cache: bool = True, trust_remote_code: bool = False,
            devices: list[str] | None = None, ray: str | bool | None = None, progress: Progress = None) -> Analysis:
    """Eigenvalues, power-law fits and shape metrics of every prunable matrix of a model.

    ``source``: ``"demo"``, a Hugging Face folder, a ``.gguf`` or ``.safetensors`` file, a hub
    id, or an already loaded ``LoadedModel``. ``streaming=True`` reads a safetensors
    checkpoint one tensor at a time instead of loading the model (bounded memory).
    ``devices`` (e.g. ``["cuda:0", "cuda:1"]``) spreads the spectra over several devices;
    ``ray`` (``True`` for a local instance, or a cluster address) computes them as Ray tasks
    (``core.cluster``; with ``streaming`` each task reads its tensors one at a time). The table
    and the cache are the same whichever way.
    """
    if xmin not in XMIN_METHODS:
        raise ValueError(f"xmin={xmin!r} is unknown; use one of {', '.join(XMIN_METHODS)}")
    dev = resolve_device(device)
    if devices:
        dev = check_devices(devices)[0]
    if isinstance(source, LoadedModel):
        label, identity = source.source, source.identity
    else:
        src = resolve_source(source)
        if streaming and src.kind != "folder":
            raise ValueError(f"--streaming reads safetensors checkpoints; {src.label!r} is a {src.kind} source")
        label, identity = src.label, src.identity()
    folder = cache_folder(identity, xmin)
    quant = quant_types(_weights_folder(source))
    stale = False
    if use_cache:
        cached = _load_cached(folder)
        # an entry written on Ray before the quantization types reached every route has none: recompute it
        stale = cached is not None and bool(quant) and cached.table["quant"].isna().all()
        if stale:
            log.warning("the cached analysis %s lacks the quantization types (written on Ray by an older "
                        "version); recomputing it", folder)
        elif cached is not None:
            log.info("analysis of %s from cache %s", label, folder)
            return cached

    items, spectra = (), None
    if ray:   # the spectra as Ray tasks (core.cluster); the table and cache as below
        from .cluster import spectra_on_ray

        loaded = source if isinstance(source, LoadedModel) else None
        spectra = spectra_on_ray(loaded or src, address=ray, device=device, trust_remote_code=trust_remote_code,
                                 keep=identity, budget_bytes=(256 << 20) if streaming else (1 << 30),
                                 progress=progress)
        infos = [s.info for s in spectra]
    elif streaming:
        from .checkpoints import open_checkpoint

        ckpt = open_checkpoint(src.path)
        items, infos = ckpt.iter_weights(), ckpt.matrices
    else:
        loaded = source if isinstance(source, LoadedModel) else load_model(
            source, device="cpu", trust_remote_code=trust_remote_code, tokenizer=False, progress=progress)
        items, infos = iter_weights(loaded), loaded.matrices
    # one table builder whichever route computed the spectra; the quantization types come from the source
    # streaming holds at most 256 MiB of weights (as float64) at once: memory follows the largest matrix
    return analyze_weights(items, infos, label=label, identity=identity, xmin=xmin, device=dev,
                           quant=quant, store=True, replace=stale or not use_cache, lookup=False,
                           budget_bytes=(256 << 20) if streaming else (1 << 30), devices=devices, spectra=spectra,
                           progress=progress)


def _weights_folder(source: str | os.PathLike | LoadedModel) -> Path | None:
    """The folder holding a source's weights (a GGUF's cached conversion, beside which its
    quantization types are kept); None for a hub model."""
    if isinstance(source, LoadedModel):
        return source.path
    src = resolve_source(source)
    return gguf_to_folder(src.path) if src.kind in ("demo", "gguf") else src.path


def analyze_copy(model: LoadedModel, saved: str | os.PathLike | None, tag: str, *, xmin: str = "peak",
                 device: str = "auto", progress: Progress = None) -> Analysis:
    """The analysis of a changed copy of a model (a pruned one): of its ``saved`` folder (cached
    under that folder's identity), else of the weights in memory, cached under ``tag`` and the
    original's identity (a copy keeps the original's identity, so ``analyze(model)`` would not do).
    The in-memory analysis is always computed and replaces an older entry of that ``tag`` (a run id
    reused after the registry was reset must not get another run's spectra)."""
    if saved is not None:
        return analyze(saved, xmin=xmin, device=device, progress=progress)
    return analyze_weights(iter_weights(model), model.matrices, label=f"{model.source} ({tag})", xmin=xmin,
                           identity=f"{tag}-{model.identity.replace(':', '-')}", device=device, replace=True,
                           progress=progress)


def analyze_weights(items: Iterable[tuple[MatrixInfo, object]], infos: list[MatrixInfo], *, label: str,
                    identity: str, xmin: str = "peak", device: str = "auto", quant: Mapping[str, str] | None = None,
                    store: bool = True, replace: bool = False, lookup: bool = True, budget_bytes: int = 1 << 30,
                    devices: list[str] | None = None, spectra: list[Spectrum] | None = None,
                    progress: Progress = None) -> Analysis:
    """The analysis of any ``(info, weight)`` pairs (a model's, an adapter's updates, ...) named
    ``label``, cached under ``identity`` when ``store`` (and read from that cache unless ``replace``).
    ``devices``: several devices share the spectra; ``spectra``: already computed (Ray)."""
    if store and lookup and not replace:     # (``analyze`` has looked already: each damage is reported once)
        cached = _load_cached(cache_folder(identity, xmin))
        if cached is not None:
            return cached
    dev = resolve_device(device)
    start = time.perf_counter()
    if spectra is None and devices and len(devices) > 1:
        spectra = spectra_on_devices(items, devices, compute=compute_spectra, infos=infos, budget_bytes=budget_bytes,
                                     progress=progress)
    elif spectra is None:
        spectra = compute_spectra(items, total=len(infos), device=dev, progress=progress, budget_bytes=budget_bytes)
    report(progress, len(infos), len(infos), "fits and metrics")
    table = build_table(spectra, xmin=xmin, device=dev, quant=quant)
    result = Analysis(table, {s.info.name: s.eigs for s in spectra}, label, identity, xmin, str(dev),
                      time.perf_counter() - start)
    if store:
        _store(cache_folder(identity, xmin), result, keep_existing=not replace)
    return result
