"""Pruning models larger than memory: the blocks of a weightless model (``load_skeleton``)
come from its checkpoint's safetensors shards one at a time (``ShardBlocks``: read onto the
device, written to the output checkpoint when pruned, then freed), and ``CheckpointWriter``
writes the output as sharded safetensors with its index.

Memory holds one block and the calibration activations; the embeddings are loaded only to
compute block 0's inputs, the output head only for a streamed evaluation's loss
(``core.evaluation``), which ``along`` lets run through each pruned block as it is written.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from ..checkpoints import TORCH_DTYPES, read_tensor, tensor_index, write_safetensors
from ..models import LoadedModel, is_skeleton
from .engine import BlockSource, InMemoryBlocks, move_materialised

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


class CheckpointWriter:
    """Writes a checkpoint as ``parts`` safetensors shards (``model-0000i-of-0000n``), one
    call of ``write`` per shard, and the index JSON that maps every tensor to its shard."""

    def __init__(self, folder: Path, parts: int) -> None:
        self.folder, self.parts = Path(folder), parts
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, part: int, tensors: dict[str, torch.Tensor | None], dtypes: dict[str, torch.dtype],
              shapes: dict[str, tuple[int, ...]], read: object = None) -> None:
        """Shard ``part`` (0-based) with ``tensors`` (a ``None`` value is asked of ``read(key)``
        when its turn comes, so that one tensor at a time is in memory)."""
        name = f"model-{part + 1:05d}-of-{self.parts:05d}.safetensors"
        items = [(key, dtypes[key], shapes[key]) for key in tensors]
        self.total_size += write_safetensors(self.folder / name, items,
                                             lambda key: tensors[key] if tensors[key] is not None else read(key))
        self.weight_map.update({key: name for key in tensors})

    def finish(self) -> None:
        """The index JSON (call after the last shard)."""
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


class ShardBlocks:
    """The blocks of a skeleton model, materialised one at a time from its checkpoint's shards.

    ``outside`` loads the tensors outside the blocks but the output head, which the pruning
    engine never runs (embeddings, position tables, final norm), for the capture; with
    ``head=True`` the head too (an evaluation's loss). ``done(b)`` first calls ``along(b)``
    (block ``b`` is still on the device, as it is then: pruned); with a ``writer`` it writes
    block ``b`` as shard ``b``, and ``write_rest`` copies every other tensor of the checkpoint
    as the last shard.
    """

    def __init__(self, loaded: LoadedModel, writer: CheckpointWriter | None = None,
                 along: Callable[[int], None] | None = None) -> None:
        if loaded.path is None:
            raise ValueError(f"model {loaded.source!r} has no checkpoint folder; load it with load_skeleton")
        self.loaded, self.writer, self.along, self.model = loaded, writer, along, loaded.model
        self.dtype = next(self.model.parameters()).dtype
        self.index = tensor_index(loaded.path)
        names = set(self.model.state_dict())
        prefix = getattr(self.model, "base_model_prefix", "")
        renamed = _renaming(self.model)
        self.name_of: dict[str, str] = {}                        # checkpoint key -> model tensor name
        for key in self.index:
            for name in (key, f"{prefix}.{key}", renamed(key)):  # older checkpoints lack the prefix
                if name in names:
                    self.name_of[key] = name
                    break
        n = len(loaded.blocks)
        self.block_keys: list[list[str]] = [[] for _ in range(n)]
        head = _module_name(self.model, self.model.get_output_embeddings())
        self.before: list[str] = []                              # checkpoint keys the capture needs
        self.head_keys: list[str] = []                           # the output head's (a loss needs them)
        for key, name in self.name_of.items():
            b = _block_of(name, loaded.family.blocks)
            if b is not None and b < n:
                self.block_keys[b].append(key)
            elif head and name.startswith(head + "."):
                self.head_keys.append(key)
            else:
                self.before.append(key)
        mapped = set(self.name_of.values())
        missing = [name for name in names if _block_of(name, loaded.family.blocks) is not None and name not in mapped]
        if missing:
            raise ValueError(f"{loaded.path}: the checkpoint has no tensor for {missing[0]} ({len(missing)} block "
                             "tensors missing); is it the complete model?")

    def _read(self, key: str, device: torch.device) -> torch.Tensor:
        t = read_tensor(self.index[key])
        return t.to(device, self.dtype) if t.is_floating_point() else t.to(device)

    @contextmanager
    def _loaded(self, module: nn.Module, keys: list[str], device: torch.device) -> Iterator[None]:
        """The tensors ``keys`` read onto ``device`` (with ``module``'s own buffers, which are
        not in the checkpoint), then freed."""
        for key in keys:
            _set(self.model, self.name_of[key], self._read(key, device))
        move_materialised(module, device)
        try:
            yield
        finally:
            move_materialised(module, torch.device("cpu"))
            for key in keys:
                name = self.name_of[key]
                _set(self.model, name, torch.empty_like(_get(self.model, name), device="meta"))
            release_memory()

    @contextmanager
    def materialised(self, b: int, device: torch.device) -> Iterator[nn.Module]:
        blk = self.loaded.blocks[b]
        with self._loaded(blk, self.block_keys[b], device):
            yield blk

    def outside(self, device: torch.device, head: bool = False) -> ContextManager[None]:
        if not head:
            return self._loaded(self.model, self.before, device)    # the blocks are meta: they stay
        return self._with_head(device)

    @contextmanager
    def _with_head(self, device: torch.device) -> Iterator[None]:
        """The tensors outside the blocks with the output head, for a loss computed from hidden
        states carried through the blocks (which stand in for them): a head the checkpoint does
        not store is the input embeddings' when the config ties them (else refused); input
        embeddings that are not the head stay unloaded and give zeros (their output is unused)."""
        out, emb = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        keys = self.before + self.head_keys
        emb_name = _module_name(self.model, emb) if self.head_keys else None
        if emb_name:
            keys = [key for key in keys if not self.name_of[key].startswith(emb_name + ".")]
        with self._loaded(self.model, keys, device):
            tied = out is not None and out.weight.is_meta
            if tied:
                cfg = self.model.config
                cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
                if not getattr(cfg, "tie_word_embeddings", False):
                    raise ValueError(f"{self.loaded.path}: the checkpoint has no output head weight and the config "
                                     "does not tie it to the embeddings; is it the complete model?")
                out.weight = emb.weight
            if emb_name:
                width = emb.weight.shape[-1]
                emb.forward = lambda ids, *a, **k: torch.zeros(*ids.shape, width, dtype=self.dtype, device=device)
            try:
                yield
            finally:
                if tied:
                    out.weight = nn.Parameter(torch.empty_like(out.weight, device="meta"), requires_grad=False)
                emb.__dict__.pop("forward", None)

    def done(self, b: int) -> None:
        if self.along is not None:
            self.along(b)
        if self.writer is None:
            return
        tensors = {key: _get(self.model, self.name_of[key]) for key in self.block_keys[b]}
        self.writer.write(b, tensors, {k: t.dtype for k, t in tensors.items()},
                          {k: tuple(t.shape) for k, t in tensors.items()})

    def write_rest(self) -> None:
        """Every checkpoint tensor outside the blocks (one at a time, converted to the model's
        dtype like a loaded model's), as the last shard; then the index."""
        in_blocks = {key for keys in self.block_keys for key in keys}
        keys = [key for key in self.index if key not in in_blocks]
        dtypes = {key: TORCH_DTYPES[self.index[key].dtype] for key in keys}
        dtypes = {key: self.dtype if dt.is_floating_point else dt for key, dt in dtypes.items()}
        self.writer.write(len(self.block_keys), dict.fromkeys(keys), dtypes,
                          {key: self.index[key].shape for key in keys},
                          read=lambda key: self._read(key, torch.device("cpu")))
        self.writer.finish()


def block_source(loaded: LoadedModel, writer: CheckpointWriter | None = None,
                 along: Callable[[int], None] | None = None) -> BlockSource:
    """Where ``loaded``'s blocks are: its checkpoint's shards for a skeleton, else memory."""
    if is_skeleton(loaded):
        return ShardBlocks(loaded, writer, along)
    if writer is not None:
        raise ValueError(f"model {loaded.source!r} is loaded in memory; stream it with load_skeleton")
    return InMemoryBlocks(loaded)


def release_memory() -> None:
    """Hand the heap memory freed with a block back to the system (glibc keeps it otherwise,
    and the resident set creeps up block after block)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _renaming(model: nn.Module) -> Callable[[str], str]:
    """The checkpoint key renamings transformers applies when it loads ``model``'s class
    (GPT-NeoX: ``embed_out.`` -> ``lm_head.``), as one function of a key."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        rules = get_checkpoint_conversion_mapping(type(model).__name__) or []
    except ImportError:
        rules = []
    pairs = [(re.compile(src), tgt) for r in rules if type(r).__name__ == "WeightRenaming"
             for src, tgt in zip(r.source_patterns, r.target_patterns)]

    def rename(key: str) -> str:
        for src, tgt in pairs:
            key = src.sub(tgt, key)
        return key
    return rename


def _block_of(name: str, blocks: str) -> int | None:
    """The block index of a tensor name under ``blocks`` (``model.layers.3.mlp...`` -> 3)."""
    if not name.startswith(blocks + "."):
        return None
    head = name[len(blocks) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


def _get(model: nn.Module, name: str) -> torch.Tensor:
    path, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(path), leaf)


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter (kept a frozen ``Parameter``) or buffer by ``value``."""
    path, _, leaf = name.rpartition(".")
    mod = model.get_submodule(path)
    setattr(mod, leaf, nn.Parameter(value, requires_grad=False) if leaf in mod._parameters else value)
