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
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .models import FAMILIES, Family, MatrixInfo

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
    if dtype in _ITEMSIZE and offsets[1] - offsets[0] != int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]:
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


def _family(folder: Path) -> Family:
    cfg = folder / "config.json"
    model_type = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
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
