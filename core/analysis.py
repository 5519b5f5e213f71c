"""Analysis: spectra + power-law fits + metrics of every prunable matrix, cached on disk.

``analyze(source)`` returns an ``Analysis`` whose ``table`` has one row per matrix with
the columns of ``COLUMNS`` (documented in the README) and whose ``eigs`` maps each
matrix name to its eigenvalues (ascending, float64). Eigenvalues at or below ``ZERO_RTOL``
times the largest (the null space of a pruned or low-rank matrix) are counted as ``n_zero``
and left out of the fit and the metrics; ``quant`` is a GGUF source's quantization type.
Results are cached under ``$SPECTRASCOPE_HOME/analyses/<key>`` keyed by the weights'
identity, the xmin method and the engine version: a second analysis of the same model
returns at once.

Where the spectra are computed is an ``Executor`` (``core.executor``: this thread, several
devices, Ray): the matrices are split into groups of about equal cost (``plan_devices``), one
per slot, and each group reads its own tensors, one at a time within the memory budget (a Ray
worker reads them from the safetensors checkpoint when it sees the same files, else the driver
ships that group's tensors). Finished groups are kept under ``analyses/partial`` as they end,
so after a failure a rerun computes only what is missing. The table is the same whichever way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd

from .config import atomic_dir, atomic_file, home, resolve_device
from .checkpoints import open_checkpoint
from .devices import check_devices, plan_devices
from .executor import Executor, Local, executor_for
from .progress import Progress, report
from .fit import XMIN_METHODS, fit_power_laws
from .metrics import no_fit_status, spectral_metrics
from .models import LoadedModel, MatrixInfo, gguf_to_folder, iter_weights, load_model, resolve_source
from .quant import quant_alpha_message, quant_types
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
        if note := quant_alpha_message(t):
            lines.append(f"note: {note}")
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


@dataclass
class Weights:
    """The matrices of one analysis: ``infos`` in order, ``items`` their ``(info, weight)``
    pairs read lazily in that order, ``read`` one weight by name (several slots read their own;
    without it ``items`` is read once into memory), ``folder`` a safetensors checkpoint of
    ``nbytes`` bytes that Ray workers may read themselves, ``quant`` a GGUF's quantization types."""

    infos: list[MatrixInfo]
    label: str
    identity: str
    items: Iterable[tuple[MatrixInfo, object]] | None = None
    read: Callable[[str], object] | None = None
    folder: str | None = None
    nbytes: int = 0
    quant: Mapping[str, str] | None = None

    @classmethod
    def of_model(cls, loaded: LoadedModel, *, label: str | None = None, identity: str | None = None,
                 quant: Mapping[str, str] | None = None) -> "Weights":
        return cls(loaded.matrices, label or loaded.source, identity or loaded.identity, iter_weights(loaded),
                   lambda name: loaded.weight(name).detach().cpu(), quant=quant)

    @classmethod
    def of_checkpoint(cls, path: str | os.PathLike, *, label: str, identity: str,
                      quant: Mapping[str, str] | None = None) -> "Weights":
        ckpt = open_checkpoint(path)
        return cls(ckpt.matrices, label, identity, ckpt.iter_weights(), ckpt.read, str(path), ckpt.nbytes, quant)


def analyze(source: str | os.PathLike | LoadedModel = "demo", *, xmin: str = "peak", device: str = "auto",
            streaming: bool = False, use_cache: bool = True, trust_remote_code: bool = False,
            devices: list[str] | None = None, ray: str | bool | None = None, executor: Executor | None = None,
            progress: Progress = None) -> Analysis:
    """Eigenvalues, power-law fits and shape metrics of every prunable matrix of a model.

    ``source``: ``"demo"``, a Hugging Face folder, a ``.gguf`` or ``.safetensors`` file, a hub
    id, or an already loaded ``LoadedModel``. ``streaming=True`` reads a safetensors
    checkpoint one tensor at a time instead of loading the model (bounded memory).
    ``executor`` computes the spectra (``core.executor``); ``devices`` (e.g. ``["cuda:0",
    "cuda:1"]``) and ``ray`` (``True`` for a local instance, or a cluster address) build one
    (``executor_for``). On Ray each task of a safetensors folder reads its own tensors. The
    table and the cache are the same whichever way.
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
    quant = quant_types(_weights_folder(source, progress))
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

    executor = executor or executor_for(device, devices, ray)      # a wrong Ray address fails here
    if isinstance(source, LoadedModel):
        weights = Weights.of_model(source, quant=quant)
    elif src.kind == "folder" and (streaming or executor.remote):   # Ray workers read the folder themselves
        weights = Weights.of_checkpoint(src.path, label=label, identity=identity, quant=quant)
    else:
        loaded = load_model(source, device="cpu", trust_remote_code=trust_remote_code, tokenizer=False,
                            progress=progress)
        weights = Weights.of_model(loaded, label=label, identity=identity, quant=quant)
    # streaming holds at most 256 MiB of weights (as float64) at once: memory follows the largest matrix
    return analyze_weights(weights, xmin=xmin, device=dev, store=True, replace=stale or not use_cache, lookup=False,
                           keep=True, budget_bytes=(256 << 20) if streaming else (1 << 30), executor=executor,
                           progress=progress)


def _weights_folder(source: str | os.PathLike | LoadedModel, progress: Progress = None) -> Path | None:
    """The folder holding a source's weights (a GGUF's cached conversion, beside which its
    quantization types are kept, converted now if needed, reporting to ``progress``); None for a hub model."""
    if isinstance(source, LoadedModel):
        return source.path
    src = resolve_source(source)
    return gguf_to_folder(src.path, progress=progress) if src.kind in ("demo", "gguf") else src.path


def analyze_copy(model: LoadedModel, saved: str | os.PathLike | None, tag: str, *, xmin: str = "peak",
                 device: str = "auto", progress: Progress = None) -> Analysis:
    """The analysis of a changed copy of a model (a pruned one): of its ``saved`` folder (cached
    under that folder's identity), else of the weights in memory, cached under ``tag`` and the
    original's identity (a copy keeps the original's identity, so ``analyze(model)`` would not do).
    The in-memory analysis is always computed and replaces an older entry of that ``tag`` (a run id
    reused after the registry was reset must not get another run's spectra)."""
    if saved is not None:
        return analyze(saved, xmin=xmin, device=device, progress=progress)
    weights = Weights.of_model(model, label=f"{model.source} ({tag})",
                               identity=f"{tag}-{model.identity.replace(':', '-')}")
    return analyze_weights(weights, xmin=xmin, device=device, replace=True, progress=progress)


def analyze_weights(weights: Weights, *, xmin: str = "peak", device: str = "auto", store: bool = True,
                    replace: bool = False, lookup: bool = True, keep: bool = False, budget_bytes: int = 1 << 30,
                    executor: Executor | None = None, progress: Progress = None) -> Analysis:
    """The analysis of any ``weights`` (a model's, an adapter's updates, ...), its spectra
    computed by ``executor`` (default: ``device``, in this thread), cached under its identity
    when ``store`` (and read from that cache unless ``replace``). ``keep``: finished groups of
    spectra are kept for a rerun (``spectra_on``)."""
    if store and lookup and not replace:     # (``analyze`` has looked already: each damage is reported once)
        cached = _load_cached(cache_folder(weights.identity, xmin))
        if cached is not None:
            return cached
    dev = resolve_device(device)
    start = time.perf_counter()
    spectra = spectra_on(executor or Local(device), weights, keep=keep, budget_bytes=budget_bytes, progress=progress)
    report(progress, len(weights.infos), len(weights.infos), "fits and metrics")
    table = build_table(spectra, xmin=xmin, device=dev, quant=weights.quant)
    result = Analysis(table, {s.info.name: s.eigs for s in spectra}, weights.label, weights.identity, xmin, str(dev),
                      time.perf_counter() - start)
    if store:
        _store(cache_folder(weights.identity, xmin), result, keep_existing=not replace)
    return result


# --- the spectra on an executor ----------------------------------------------------------------

@dataclass
class _Group:
    """One slot's matrices: read from ``folder`` (a Ray worker that sees it), else ``items``."""

    infos: list[MatrixInfo]
    folder: str | None
    nbytes: int
    items: object
    budget_bytes: int
    workers: int | None = None
    progress: Progress = None


def _group_spectra(group: _Group, device: str) -> list[Spectrum] | None:
    """The spectra of one group on ``device``, one tensor at a time within its budget; ``None``
    when the group names a checkpoint this process does not see (no such folder, other files)."""
    items = group.items
    if group.folder is not None:
        try:
            ckpt = open_checkpoint(group.folder)
            if ckpt.nbytes != group.nbytes:
                return None
        except (OSError, ValueError):
            return None
        items = ((info, ckpt.read(info.name)) for info in group.infos)
    return compute_spectra(items, total=len(group.infos), device=device, workers=group.workers,
                           budget_bytes=group.budget_bytes, progress=group.progress)


def spectra_on(executor: Executor, weights: Weights, *, groups: int | None = None, ship: bool = False,
               keep: bool = False, budget_bytes: int = 1 << 30, progress: Progress = None,
               cancel: object = None) -> list[Spectrum]:
    """The spectra of ``weights`` on ``executor``, in the model's order.

    The matrices are split into ``groups`` (default one per slot) of about equal estimated
    cost; each group reads its own tensors, one at a time within ``budget_bytes`` (divided
    among local devices). On Ray a group of a safetensors folder is read by its worker when it
    sees the same files; a worker that does not hands back and the driver ships that group's
    tensors through the object store (``ship``: every group). ``keep``: each finished group is
    stored as it ends (under the weights' identity), so after a failure (raised once every
    other group ended) a rerun computes only the missing matrices."""
    infos = weights.infos
    read = weights.read
    if read is None and (len(executor.slots) > 1 or executor.remote):
        held = {info.name: w for info, w in weights.items}          # no reader by name: read once
        read = held.__getitem__
    kind = getattr(executor, "device_kind", None) or executor.slots[0].split(":")[0]
    kept = _kept_folder(weights.identity, kind) if keep else None
    done: dict[str, Spectrum] = _kept(kept, infos) if kept else {}
    if done:
        log.info("%d of %d spectra kept from an earlier run in %s", len(done), len(infos), kept)
    todo = [i for i in infos if i.name not in done]
    slots = [str(k) for k in range(groups or len(executor.slots))]
    plan = plan_devices([(i.rows, i.cols) for i in todo], slots)
    parts = [p for p in ([i for i, d in zip(todo, plan) if d == k] for k in slots) if p]
    local_budget = max(1, budget_bytes // max(1, min(len(parts), len(executor.slots))))
    counts = [0] * len(parts)
    lock = threading.Lock()
    what = "eigenvalues (Ray)" if executor.remote else "eigenvalues"

    def counted(k: int) -> Progress:
        def tell(n: int, _total: int, _message: str = "") -> None:
            with lock:
                counts[k] = n
                report(progress, len(done) + sum(counts), len(infos), what)
        return tell

    def group(k: int, part: list[MatrixInfo], ship_it: bool) -> _Group:
        if executor.remote:
            tensors = [(i, read(i.name)) for i in part] if ship_it else None
            return _Group(part, None if ship_it else weights.folder, weights.nbytes, tensors, budget_bytes,
                          workers=1 if executor.slots[0] == "cpu" else None)
        lazy = weights.items if read is None else ((i, read(i.name)) for i in part)
        return _Group(part, None, 0, lazy, local_budget, progress=counted(k) if progress else None)

    failed: list[BaseException] = []
    blind: list[int] = []

    def take(results: Iterator, order: list[int]) -> None:
        for j, result in results:
            k = order[j]
            if result is None:
                log.info("a Ray worker does not see %s; shipping %d tensors through the object store",
                         weights.folder, len(parts[k]))
                blind.append(k)
            elif isinstance(result, BaseException):
                failed.append(result)
            else:
                if kept:
                    _keep(kept, result)
                with lock:
                    done.update((s.info.name, s) for s in result)
                    counts[k] = 0
                    report(progress, len(done) + sum(counts), len(infos), what)

    report(progress, len(done), len(infos), what)
    first = ship or weights.folder is None
    order = list(range(len(parts)))
    take(executor.map(_group_spectra, (group(k, parts[k], first) for k in order), cancel=cancel), order)
    if blind:         # workers that do not see the checkpoint: their groups' tensors shipped
        order, blind[:] = list(blind), []
        take(executor.map(_group_spectra, (group(k, parts[k], True) for k in order), cancel=cancel), order)
    if failed:
        rest = "" if not kept else (f"; the {len(done)} of {len(infos)} finished spectra are kept and a rerun "
                                    "computes only the rest")
        if not executor.remote:
            if rest:
                log.warning("spectra failed%s", rest)
            raise failed[0]
        raise RuntimeError(f"a Ray spectra task failed: {executor.failure(failed[0])}{rest}") from failed[0]
    if kept and kept.is_dir():
        shutil.rmtree(kept, ignore_errors=True)
    return [done[i.name] for i in infos]


def _kept_folder(identity: str, device: str) -> Path:
    """Where the finished spectra of the weights ``identity`` wait for a rerun."""
    return home() / "analyses" / "partial" / f"{identity.replace(':', '-')}-{device}-v{ENGINE_VERSION}"


def _keep(folder: Path, spectra: list[Spectrum]) -> None:
    """Store finished spectra (one file per group, atomically) so a rerun skips them."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, names=np.array([s.info.name for s in spectra]), w_var=np.array([s.w_var for s in spectra]),
                     reasons=np.array([s.reason for s in spectra]),
                     **{f"e{k}": s.eigs for k, s in enumerate(spectra)})
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha1("\n".join(s.info.name for s in spectra).encode()).hexdigest()[:16]
        atomic_file(folder / f"{key}.npz", write, overwrite=True)
    except OSError as exc:
        log.warning("could not keep finished spectra in %s: %s", folder, exc)


def _kept(folder: Path, infos: list[MatrixInfo]) -> dict[str, Spectrum]:
    """The spectra kept in ``folder`` of the matrices ``infos`` (a damaged file is skipped)."""
    by_name = {i.name: i for i in infos}
    out: dict[str, Spectrum] = {}
    for file in sorted(folder.glob("*.npz")) if folder.is_dir() else ():
        try:
            with np.load(file, allow_pickle=False) as z:
                for k, (name, w_var, reason) in enumerate(zip(z["names"], z["w_var"], z["reasons"])):
                    info = by_name.get(str(name))
                    eigs = z[f"e{k}"]
                    if info is not None and eigs.shape == (min(info.rows, info.cols),):
                        out[info.name] = Spectrum(info, eigs, float(w_var), str(reason))
        except Exception as exc:  # noqa: BLE001 - a damaged zip raises many types
            log.warning("ignoring the damaged kept spectra %s (%s)", file, exc)
    return out
