"""Read prunable matrices straight from safetensors files, one tensor at a time (and write
safetensors files the same way).

This is the bounded-memory path: the model is never built, and each tensor is read
with a plain ``readinto`` (no memory map, so pages already analysed do not stay in the
process's resident set). Peak memory grows with the largest matrix, not the model.

A checkpoint is a folder with ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` files (with or without the index JSON), or a
single ``.safetensors`` file; ``config.json`` beside it names the family.
"""
from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .checks import first_line
from .families import FAMILIES, Family, MatrixInfo

log = logging.getLogger(__name__)

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_TORCH_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
#: a safetensors dtype code -> the torch dtype
TORCH_DTYPES = {code: dtype for dtype, code in _TORCH_CODES.items()}
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.(.+)\.weight$")


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int          # absolute byte offset in the file
    end: int


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _entry(path: Path, key: object, value: object, base: int, data_size: int) -> TensorEntry:
    """One header entry, checked: a dtype, a shape of non-negative ints, offsets inside the data
    that hold exactly ``prod(shape)`` elements."""
    def bad(problem: str) -> ValueError:
        return ValueError(f"{path} has a corrupt safetensors header: tensor {key!r} {problem}; "
                          "re-save or re-download this file")

    if not isinstance(value, dict):
        raise bad("is not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad("has no dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise bad("has no shape (a list of integers)")
    if any(d < 0 for d in shape):
        raise bad(f"has negative dimensions {shape}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size):
        raise bad(f"has data_offsets {offsets} outside the file's {data_size} data bytes")
    if dtype in _ITEMSIZE and offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[dtype]:   # exact, no wrap
        raise bad(f"has shape {shape} ({dtype}) that does not match its {offsets[1] - offsets[0]} bytes")
    return TensorEntry(path, str(key), dtype, tuple(shape), base + offsets[0], base + offsets[1])


def _header(path: Path) -> dict[str, TensorEntry]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {size})")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} has a corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt safetensors header: a JSON {type(header).__name__}, not an "
                         "object; re-save or re-download this file")
    base = 8 + size
    data_size = path.stat().st_size - base
    return {k: _entry(path, k, v, base, data_size) for k, v in header.items() if k != "__metadata__"}


def read_config(folder: Path) -> dict:
    """``folder``'s ``config.json`` as a dict; a file that is not a JSON object is named."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the model's config.json is damaged, re-download it") \
            from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object; the model's config.json is "
                         "damaged, re-download it")
    return config


def _family(folder: Path) -> Family:
    model_type = read_config(folder).get("model_type") if (folder / "config.json").is_file() else None
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    # Unknown or missing config: name matrices by path, assume the out x in layout.
    return Family(model_type or "unknown", (), "model.layers", {})


@dataclass
class Checkpoint:
    """The prunable matrices of a safetensors checkpoint, readable one at a time."""

    folder: Path
    family: Family
    entries: dict[str, TensorEntry]      # matrix name -> where its tensor lies
    matrices: list[MatrixInfo]

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in {e.file for e in self.entries.values()})

    def read(self, name: str) -> torch.Tensor:
        """The matrix ``out x in`` as a float32/float16/bfloat16 CPU tensor."""
        e = self.entries[name]
        if e.dtype not in ("F64", "F32", "F16", "BF16"):
            raise ValueError(f"{e.key} in {e.file.name} has dtype {e.dtype}; only F64/F32/F16/BF16 are read")
        t = read_tensor(e)
        return t.t() if self.family.transposed else t

    def iter_weights(self) -> Iterator[tuple[MatrixInfo, torch.Tensor]]:
        for info in self.matrices:
            yield info, self.read(info.name)


def read_tensor(e: TensorEntry) -> torch.Tensor:
    """One tensor as stored (a CPU tensor of its dtype), read with a plain ``readinto``."""
    if e.dtype not in _DTYPES:
        raise ValueError(f"{e.key} in {e.file.name} has dtype {e.dtype}; only {', '.join(_DTYPES)} are read")
    arr = np.empty(e.shape, dtype=_DTYPES[e.dtype])
    with open(e.file, "rb") as f:
        f.seek(e.start)
        if f.readinto(memoryview(arr.reshape(-1)).cast("B")) != e.end - e.start:
            raise ValueError(f"{e.file} is truncated: tensor {e.key} is incomplete")
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if e.dtype == "BF16" else t


def tensor_index(folder: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of the ``*.safetensors`` files of ``folder`` by its key (no data read)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no .safetensors files; the streaming path reads safetensors only")
    return {key: e for file in files for key, e in _header(file).items()}


def write_safetensors(path: Path, items: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensor: Callable[[str], torch.Tensor]) -> int:
    """Write a safetensors file of ``items`` (key, dtype, shape), asking ``tensor(key)`` for one
    tensor at a time (it must have that dtype and shape): memory holds one tensor, whatever
    the file's size. Returns the bytes of tensor data written."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in items:
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _TORCH_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, dtype, shape in items:
            t = tensor(key).detach().to("cpu").contiguous()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"tensor {key}: got {t.dtype} {tuple(t.shape)}, announced {dtype} {tuple(shape)}")
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t                       # before the next one is made
    return offset


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Index the safetensors files of ``path`` (a folder or one file) without reading weights."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    folder = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no .safetensors files; the streaming path reads safetensors only")
    family = _family(folder)
    if (folder / "config.json").is_file():   # the tensors its architecture expects are all there
        try:
            model = expected_model(folder)
        except (ValueError, KeyError, ImportError, OSError) as exc:   # an architecture only its own code builds
            log.warning("%s: cannot check that the checkpoint is complete (%s); reading its matrices as stored",
                        folder, first_line(exc))
            weight_files(folder)                                        # an absent shard is still refused
        else:
            check_complete(folder, model)
    entries: dict[str, TensorEntry] = {}
    found: list[tuple[int, int, MatrixInfo]] = []
    for file in files:
        for key, e in _header(file).items():
            m = _BLOCK.search(key)
            if m is None or len(e.shape) != 2:
                continue
            block, rel = int(m.group(1)), m.group(2)
            if family.kinds and rel not in family.kinds:
                continue
            rows, cols = (e.shape[1], e.shape[0]) if family.transposed else e.shape
            name = f"{family.blocks}.{block}.{rel}"
            entries[name] = e
            order = list(family.kinds).index(rel) if family.kinds else 0
            found.append((block, order, MatrixInfo(name, block, family.kinds.get(rel, rel), rows, cols)))
    if not found:
        raise ValueError(f"no transformer-block matrices found in {folder} (expected names like "
                         "model.layers.0.self_attn.q_proj.weight)")
    found.sort(key=lambda t: (t[0], t[1], t[2].name))
    return Checkpoint(folder, family, entries, [t[2] for t in found])


# --- completeness: the checkpoint holds every tensor its architecture expects -----------------

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _index_shards(index: Path) -> list[Path]:
    """The shard files an index JSON maps tensors to; an absent shard is refused by name."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} is not a checkpoint index (no weight_map of tensor -> shard file); "
                         "the checkpoint is damaged, re-download it")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    absent = [p for p in shards if not p.is_file()]
    if absent:
        raise ValueError(f"checkpoint {index.parent}: its index {index.name} names {len(absent)} shard file(s) that "
                         f"are absent, first {absent[0].name}: the checkpoint is incomplete; re-download it")
    return shards


def weight_files(folder: str | Path) -> list[Path]:
    """The files a load reads the weights from, as transformers chooses them: the safetensors
    index's shards (each must exist), ``model.safetensors``, any ``*.safetensors``, then the
    ``.bin`` equivalents."""
    folder = Path(folder)
    if (folder / SAFE_INDEX).is_file():
        return _index_shards(folder / SAFE_INDEX)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if (folder / BIN_INDEX).is_file():
        return _index_shards(folder / BIN_INDEX)
    return [folder / "pytorch_model.bin"] if (folder / "pytorch_model.bin").is_file() else []


def stored_keys(files: list[Path]) -> list[str]:
    """Every tensor name stored in ``files`` (headers only: no weights are read); a damaged
    safetensors header is refused naming its file and tensor."""
    keys: list[str] = []
    for file in files:
        if file.suffix == ".safetensors":
            keys += _header(file)
        else:
            try:
                keys += _pickled_keys(file)
            except Exception as exc:  # noqa: BLE001 - pickle and zip raise many types for a damaged file
                first = (str(exc).strip().splitlines() or [""])[0]
                raise ValueError(f"{file} is not a readable PyTorch checkpoint ({type(exc).__name__}: {first}); "
                                 "re-download it") from None
    return keys


def _pickled_keys(file: Path) -> list[str]:
    """The tensor names of a ``torch.save`` file (tensors on the meta device: no data read,
    except from the legacy non-zip format, which cannot be memory-mapped)."""
    import zipfile

    mmap = zipfile.is_zipfile(file)
    state = torch.load(file, map_location="meta", weights_only=True, mmap=mmap)
    if not isinstance(state, dict):
        raise ValueError(f"a {type(state).__name__}, not a state dict")
    return [str(k) for k in state]


def expected_model(folder: Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model ``folder``'s config describes, built on the meta device (no weights allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    read_config(folder)                 # a damaged config.json is named before transformers reads it
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, ImportError, OSError) as exc:   # an unknown model_type, a bad field, ...
        first = first_line(exc)
        raise ValueError(f"could not load model {folder}: its config.json describes no causal LM this "
                         f"transformers can build ({first})") from exc


def _renamer(model: torch.nn.Module, expected: dict) -> Callable[[str], str]:
    """Checkpoint key -> model tensor name, as transformers renames on load (legacy names,
    a missing or extra ``base_model_prefix``)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:   # transformers >= 5: its own renaming rules
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        return lambda key: rename_source_key(key, renamings, converters, prefix or None, expected)[0]
    except (ImportError, AttributeError, TypeError):
        pass

    def rename(key: str) -> str:
        if key in expected or not prefix:
            return key
        if f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}"
        short = key[len(prefix) + 1:] if key.startswith(prefix + ".") else key
        return short if short in expected else key
    return rename


def _tensor_groups(model: torch.nn.Module, state: dict) -> list[list[str]]:
    """The state dict's names grouped by the tensor they hold: tied names (the same object, or
    tied by the model's declaration, e.g. ``lm_head.weight`` -> the embeddings) share a group."""
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    tied = getattr(model, "all_tied_weights_keys", None)       # transformers >= 5, per the config
    if tied is None and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict):
        group_of = {name: key for key, names in groups.items() for name in names}
        for target, source in tied.items():
            a, b = group_of.get(target), group_of.get(source)
            if a is not None and b is not None and a != b:
                groups[b] += groups.pop(a)
                group_of.update((n, b) for n in groups[b])
    elif isinstance(tied, (list, tuple)):                     # older transformers: the head names
        heads = {name for name in tied if name in state}
        if heads and getattr(model, "get_input_embeddings", None) is not None:
            return [names for names in groups.values() if not set(names) <= heads]
    order = {name: i for i, name in enumerate(state)}
    return sorted(groups.values(), key=lambda names: order[names[0]])


def _ignored(patterns: object, name: str) -> bool:
    return any(re.search(p, name) for p in (patterns or ()))


def refuse_missing(label: object, model: torch.nn.Module, missing: object,
                   groups: list[list[str]] | None = None) -> None:
    """The one refusal of a checkpoint without some of the tensors ``model``'s architecture
    expects (``check_complete``'s, and that of the sources whose files are only known to
    transformers: hub downloads and GGUF files, from its loading info)."""
    missing = list(missing or ())
    if not missing:
        return
    state = model.state_dict(keep_vars=True)
    groups = groups if groups is not None else _tensor_groups(model, state)
    order = {name: i for i, name in enumerate(state)}
    missing.sort(key=lambda name: order.get(name, len(order)))
    raise ValueError(f"checkpoint {label} is missing {len(missing)} of {len(groups)} tensors the "
                     f"{type(model).__name__} config expects, first {missing[0]}: the file is damaged or "
                     "incomplete; re-download it")


def _check_shapes(files: list[Path], rename: Callable[[str], str], state: dict, arch: str) -> None:
    """Refuse a safetensors tensor whose stored shape is not the one the config expects, naming
    its file and tensor (transformers would name only the folder). Tensors that loading
    converts (fused or split: their names' last parts change) are left to transformers."""
    for file in files:
        if file.suffix != ".safetensors":
            continue
        for key, entry in _header(file).items():
            name = rename(key)
            want = state.get(name)
            if want is None or name.split(".")[-2:] != key.split(".")[-2:]:
                continue
            if tuple(want.shape) != entry.shape:
                raise ValueError(f"{file} holds tensor {key!r} with shape {list(entry.shape)}, but the {arch} of its "
                                 f"config.json needs {list(want.shape)}: the file is damaged or of another model; "
                                 "re-save or re-download this file")


def check_complete(folder: str | Path, model: torch.nn.Module | None = None, *, label: str | None = None,
                   trust_remote_code: bool = False) -> None:
    """Refuse a checkpoint that lacks a tensor its architecture expects, before any work.

    The expected names are ``model``'s state dict (default: the config's model built on the
    meta device): parameters and persistent buffers (non-persistent ones such as rotary
    tables are not stored). Tied tensors (an output head sharing the embeddings) count once:
    any one of their names suffices. The stored names come from the weight files' headers,
    renamed as transformers renames them on load. Extra tensors are reported, not fatal."""
    folder = Path(folder)
    label = label or str(folder)
    model = model if model is not None else expected_model(folder, trust_remote_code)
    state = model.state_dict(keep_vars=True)
    groups = _tensor_groups(model, state)
    files = weight_files(folder)
    if not files:
        raise ValueError(f"checkpoint {label} has no weight files (model.safetensors, sharded safetensors with "
                         "their index, or pytorch_model.bin); re-download it")
    keys = stored_keys(files)             # headers checked: a forged or truncated file is named
    if getattr(model.config, "quantization_config", None) is not None:
        log.info("%s: a quantized checkpoint; its tensor names are the quantizer's, not checked", label)
        return
    rename = _renamer(model, state)
    stored = {rename(key) for key in keys}
    _check_shapes(files, rename, state, type(model).__name__)
    ignore_missing = getattr(model, "_keys_to_ignore_on_load_missing", None)
    missing = [names[0] for names in groups
               if not any(n in stored for n in names) and not _ignored(ignore_missing, names[0])]
    refuse_missing(label, model, missing, groups)
    arch = type(model).__name__
    ignore_extra = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    extra = sorted(k for k in stored if k not in state and not _ignored(ignore_extra, k))
    if extra:
        log.warning("checkpoint %s has %d tensor%s the %s config does not expect, first %s; %s ignored", label,
                    len(extra), "s" if len(extra) > 1 else "", arch, extra[0], "they are" if len(extra) > 1 else "it is")
