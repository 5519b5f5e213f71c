"""The block-sequential engine every pruning method and OWL share: it captures what block 0
receives, then walks the blocks one at a time, collecting statistics of every matrix's
inputs, handing them to the caller (which prunes the block) and running the windows through
the changed block to form the next block's inputs.

1. ``capture_inputs``: the inputs of block 0 for every calibration window (a pre-hook that
   stops the forward there) and the arguments each block receives (attention mask,
   position embeddings, ...) from one pass of the first window in which only block 0
   computes;
2. ``BlockPipeline.run``, for each block: bring it to its device (its ``BlockSource``: the
   model in memory, or a checkpoint's shards for a model larger than memory,
   ``streaming.py``; ``device`` is one device or a ``Placement`` of the blocks across several,
   ``placement.py``, and the hidden states follow the blocks to their devices); run the windows through it
   (in batches of about ``BATCH_TOKENS`` tokens) with pre-hooks that feed each matrix's
   ``Collector`` and end each call once the last matrix has its input; call
   ``on_block(b, stats)`` (a method's rule per matrix); run the windows through the pruned
   block to form the next block's inputs (not after the last block); ``source.done(b)``
   (a streamed block is written out); move it back (a streamed block is freed).

Memory stays at one block plus two activation buffers (``nsamples x seqlen x hidden``).
"""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Protocol, Sequence, TypeVar

import torch
from torch import nn

from ..config import BATCH_TOKENS, window_batches
from ..models import LoadedModel, get_attr
from ..progress import Progress, check_cancel, report

log = logging.getLogger(__name__)

T = TypeVar("T")


class Collector(Protocol):
    """Statistics of one matrix's inputs: built as ``Collector(cols, device)``, fed every
    input by ``add(x)`` (x: tokens x cols), ``tokens`` counts them."""

    tokens: int

    def add(self, x: torch.Tensor) -> None: ...


class StopForward(Exception):
    """Ends a model's or a block's forward from inside a forward pre-hook: once a hook has what
    it needs (block 0's inputs; every matrix's input in a statistics pass) the rest of the
    forward would be wasted work, and PyTorch gives a hook no other way to stop it. Always
    caught where the forward was started; never leaves this module."""


class BlockSource(Protocol):
    """Where the weights are: ``materialised(b, device)`` holds block ``b`` on ``device`` for
    the duration (then back where it was, or freed), ``outside(device)`` the rest of the
    model that computes before the blocks (embeddings; for the capture), with ``head`` the
    output head too (an evaluation's loss); ``done(b)``, called inside, says block ``b`` is
    final (a streamed source writes it out)."""

    def materialised(self, b: int, device: torch.device) -> ContextManager[nn.Module]: ...

    def outside(self, device: torch.device, head: bool = False) -> ContextManager[None]: ...

    def done(self, b: int) -> None: ...


class InMemoryBlocks:
    """The blocks of a model in memory: moved to the device and back, nothing written."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @contextmanager
    def materialised(self, b: int, device: torch.device) -> Iterator[nn.Module]:
        blk = self.loaded.blocks[b]
        home = _model_device(blk)
        blk.to(device)
        try:
            yield blk
        finally:
            blk.to(home)

    @contextmanager
    def outside(self, device: torch.device, head: bool = False) -> Iterator[None]:
        model = self.loaded.model
        home = _model_device(model)
        with _BlocksDetached(self.loaded):
            move_materialised(model, device)    # embeddings, rotary tables, final norm, head
        try:
            yield
        finally:
            if home != device:
                with _BlocksDetached(self.loaded):
                    move_materialised(model, home)

    def done(self, b: int) -> None:
        pass


def move_materialised(module: nn.Module, device: torch.device) -> None:
    """``module``'s parameters and buffers to ``device``, except those never materialised
    (``meta``: a streamed model's blocks and output head)."""
    module._apply(lambda t: t if t.is_meta else t.to(device))


# --- 1. capture ---------------------------------------------------------------------------

@dataclass
class Captured:
    """What the blocks receive: block 0's inputs for every window, the rest for every block."""

    inputs: torch.Tensor                       # nsamples x seqlen x hidden, on device
    args: list[tuple]                          # per block: positional args after hidden states
    kwargs: list[dict]                         # per block: keyword args (hidden states removed)


class _CaptureHooks:
    """Pre-hooks on every block and a stand-in forward for blocks 1.. used by ``capture_inputs``."""

    def __init__(self, n_blocks: int, n_windows: int, device: torch.device) -> None:
        self.n_blocks, self.n_windows, self.device = n_blocks, n_windows, device
        self.rows = slice(0, 1)                                  # the windows of the current forward
        self.inputs: torch.Tensor | None = None
        self.per_block: list[tuple[tuple, dict] | None] = [None] * n_blocks
        self.template: object = None                            # block 0's output, for its structure

    def pre_hook(self, b: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, rest, kw = _split_hidden(args, kwargs)
        if b == 0:
            if self.inputs is None:
                self.inputs = torch.empty((self.n_windows,) + tuple(hidden.shape[1:]), dtype=hidden.dtype,
                                          device=self.device)
            self.inputs[self.rows] = hidden.to(self.device)
        if self.rows.start != 0:                                # later windows: block 0's input is all
            raise StopForward
        self.per_block[b] = (rest, kw)
        if b == self.n_blocks - 1:
            raise StopForward

    def first_output(self, module: nn.Module, args: tuple, output: object) -> None:
        self.template = output

    def stand_in(self, *args: object, **kwargs: object) -> object:
        """Blocks 1.. during the capture: pass the hidden states on in block 0's output structure."""
        hidden = _split_hidden(args, kwargs)[0]
        out = self.template
        return hidden if isinstance(out, torch.Tensor) else type(out)((hidden, *out[1:]))


@torch.no_grad()
def capture_inputs(loaded: LoadedModel, ids: torch.Tensor, device: torch.device | Sequence[torch.device],
                   cancel: object, source: BlockSource | None = None) -> Captured:
    """Block-0 inputs of every window, and every block's other arguments from window 0, each
    on its block's device (``device``: one, or a ``Placement``: one per block; the capture
    computes on block 0's).

    Window 0 goes through the model's own forward so that pre-hooks record what every block
    receives (masks differ between sliding-window and global layers in some families), but
    only block 0 computes: the later blocks are stand-ins that pass the hidden states on
    (in the structure block 0 returned), and the pass ends at the last block (the final
    norm and head never compute: a streamed model leaves them unloaded). Later
    windows, in batches, stop at block 0. The arguments recorded for one window serve
    batches of windows too (they broadcast over the batch: rotary tables, causal masks).
    """
    model, blocks = loaded.model, loaded.blocks
    source = source or InMemoryBlocks(loaded)
    devices = per_block(device, len(blocks))
    device = devices[0]
    hooks = _CaptureHooks(len(blocks), ids.shape[0], device)
    first = blocks[0]
    handles = [blk.register_forward_pre_hook(functools.partial(hooks.pre_hook, b), with_kwargs=True)
               for b, blk in enumerate(blocks)]
    handles.append(first.register_forward_hook(hooks.first_output))
    for blk in blocks[1:]:
        blk.forward = hooks.stand_in            # an instance attribute: hooks still run
    try:
        with source.outside(device), source.materialised(0, device):
            for rows in [slice(0, 1)] + window_batches(ids.shape[0], ids.shape[1], start=1):
                check_cancel(cancel, "while capturing calibration inputs")
                hooks.rows = rows
                try:
                    model(input_ids=ids[rows].to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
        for blk in blocks[1:]:
            blk.__dict__.pop("forward", None)
    missing = [b for b, v in enumerate(hooks.per_block) if v is None]
    if missing:
        raise ValueError(f"blocks {missing[:5]} were never called in a forward pass; this architecture is "
                         "not supported by the pruning engine")
    return Captured(hooks.inputs, [_to(a, devices[b]) for b, (a, _) in enumerate(hooks.per_block)],
                    [_to(k, devices[b]) for b, (_, k) in enumerate(hooks.per_block)])


# --- 2. statistics of one block's matrices ---------------------------------------------------

class _BlockStatistics:
    """Pre-hooks on one block's matrices that feed every matrix's collector with its inputs.

    Matrices fed the very same tensor (q, k, v; gate, up) share one collector: found in the
    first call, where the first such matrix becomes the leader (the tensors of a call are held
    until it ends so that no memory address is reused within it). With ``stop_early`` (the
    block's output is computed again after pruning) a call ends as soon as every matrix has
    seen its input: the last matrix (down_proj, fc2, ...) is never multiplied in this pass.
    """

    def __init__(self, loaded: LoadedModel, block: int, collector: Callable[[int, torch.device], Collector],
                 device: torch.device, stop_early: bool) -> None:
        self.infos = [m for m in loaded.matrices if m.block == block]
        self.modules = [loaded.module(m.name) for m in self.infos]
        self.collector, self.device, self.stop_early = collector, device, stop_early
        self.reset()

    def reset(self) -> None:
        """Empty collectors (the pass starts again)."""
        self.collectors = {m.name: self.collector(m.cols, self.device) for m in self.infos}
        self.leader: dict[str, str] = {}                         # matrix -> whose collector it feeds
        self._held: dict[tuple, tuple[str, torch.Tensor]] = {}   # this call's inputs, by address
        self._seen: set[str] = set()                             # matrices reached in this call

    def start_call(self) -> None:
        self._seen.clear()

    def end_call(self) -> None:
        self._held.clear()

    def _pre_hook(self, name: str, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if name not in self.leader:
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            self.leader[name] = self._held.setdefault(key, (name, x))[0]
        if self.leader[name] == name:
            self.collectors[name].add(x.reshape(-1, x.shape[-1]))
        self._seen.add(name)
        if self.stop_early and len(self._seen) == len(self.infos):
            raise StopForward

    @contextmanager
    def attached(self) -> Iterator[None]:
        handles = [mod.register_forward_pre_hook(functools.partial(self._pre_hook, m.name))
                   for m, mod in zip(self.infos, self.modules)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def result(self) -> dict[str, Collector]:
        """Every matrix's collector (shared ones appear under each of their matrices)."""
        return {name: self.collectors[self.leader.get(name, name)] for name in self.collectors}


# --- 3. running the windows through a block --------------------------------------------------

class _Windows:
    """Runs every window through one block, in batches (``window_batches``). If the first
    batch fails (a family whose recorded arguments do not broadcast over a batch, or a batch
    that does not fit in memory), it goes one window per call from then on and runs the pass
    again."""

    def __init__(self) -> None:
        self.tokens = BATCH_TOKENS

    def run(self, blk: nn.Module, inps: torch.Tensor, outs: torch.Tensor, args: tuple, kwargs: dict,
            stats: _BlockStatistics | None = None) -> None:
        """One pass of every window through ``blk`` (``outs`` = its outputs unless ``stats``
        stops the calls early), feeding ``stats`` if given."""
        if not self._try(blk, inps, outs, args, kwargs, stats):
            if stats is not None:
                stats.reset()
            self._try(blk, inps, outs, args, kwargs, stats)

    def _try(self, blk: nn.Module, inps: torch.Tensor, outs: torch.Tensor, args: tuple, kwargs: dict,
             stats: _BlockStatistics | None) -> bool:
        """False when the first batch failed and the batch size went down to one window."""
        for k, rows in enumerate(window_batches(inps.shape[0], inps.shape[1], tokens=self.tokens)):
            if stats is not None:
                stats.start_call()
            try:
                outs[rows] = _call_block(blk, inps[rows], args, kwargs)
            except StopForward:
                pass
            except RuntimeError as exc:
                if k or rows.stop - rows.start == 1:
                    raise
                log.warning("windows go one at a time from now on: a batch of %d failed (%s)",
                            rows.stop - rows.start, str(exc).splitlines()[0][:200])
                self.tokens = 1
                return False
            finally:
                if stats is not None:
                    stats.end_call()
        return True


# --- 4. the loop ---------------------------------------------------------------------------

class BlockPipeline:
    """The block-by-block loop: statistics pass -> ``on_block`` -> pass through the changed block.

    ``collector``: the statistics class of the method (None: no data flows, each block is
    only moved to its device and handed to ``on_block`` with no statistics). ``device``: one
    device, or a ``Placement`` (block ``b`` on ``devices[b]``, with its statistics; the
    windows' hidden states move on at a range boundary). ``label`` starts the progress
    messages. ``source``: where the blocks' weights are (default: in memory).
    """

    def __init__(self, loaded: LoadedModel, ids: torch.Tensor | None, *,
                 collector: Callable[[int, torch.device], Collector] | None,
                 device: torch.device | Sequence[torch.device], progress: Progress = None, cancel: object = None,
                 label: str = "", source: BlockSource | None = None) -> None:
        self.loaded, self.ids, self.collector = loaded, ids, collector
        self.devices = per_block(device, len(loaded.blocks))
        self.source = source or InMemoryBlocks(loaded)
        self.progress, self.cancel, self.label = progress, cancel, label
        self.windows = _Windows()

    @torch.no_grad()
    def run(self, on_block: Callable[[int, dict[str, Collector]], T], *, forward_after: bool) -> list[T]:
        """``on_block(b, {matrix name: collector})`` for every block in order; its results.

        ``forward_after``: ``on_block`` changes the block, so the windows go through it again
        to form the next block's inputs (and the statistics pass may stop early). Without it
        the statistics pass itself forms them.
        """
        blocks = self.loaded.blocks
        if self.collector is None:
            return [self._block_without_data(b, blk, on_block) for b, blk in enumerate(blocks)]
        report(self.progress, 0, len(blocks), f"{self.label}: capturing inputs")
        captured = capture_inputs(self.loaded, self.ids, self.devices, self.cancel, self.source)
        inps, outs = captured.inputs, torch.empty_like(captured.inputs)
        results = []
        for b, blk in enumerate(blocks):
            check_cancel(self.cancel, f"before block {b}")
            args, kwargs, device = captured.args[b], captured.kwargs[b], self.devices[b]
            inps, outs = handed_to(device, inps, outs)
            with self.source.materialised(b, device):
                stats = _BlockStatistics(self.loaded, b, self.collector, device, stop_early=forward_after)
                with stats.attached():
                    self.windows.run(blk, inps, outs, args, kwargs, stats)
                results.append(on_block(b, stats.result()))
                del stats                                         # the Hessians go before the next pass
                if forward_after and b + 1 < len(blocks):        # the last block's output is not used
                    self.windows.run(blk, inps, outs, args, kwargs)
                self.source.done(b)
            inps, outs = outs, inps
            self._report(b)
        return results

    def _block_without_data(self, b: int, blk: nn.Module, on_block: Callable[[int, dict], T]) -> T:
        check_cancel(self.cancel, f"before block {b}")
        with self.source.materialised(b, self.devices[b]):
            result = on_block(b, {})
            self.source.done(b)
        self._report(b)
        return result

    def _report(self, b: int) -> None:
        n = len(self.loaded.blocks)
        report(self.progress, b + 1, n, f"{self.label} block {b + 1}/{n}")


# --- helpers -------------------------------------------------------------------------------

def per_block(device: torch.device | Sequence[torch.device], n: int) -> list[torch.device]:
    """The device of each of ``n`` blocks: one device for all, or a ``Placement`` (a sequence)."""
    if isinstance(device, torch.device):
        return [device] * n
    devices = [device[b] for b in range(len(device))]
    if len(devices) != n:
        raise ValueError(f"a placement of {len(devices)} blocks given for a model of {n} blocks")
    return devices


def handed_to(device: torch.device, hidden: torch.Tensor, spare: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The hidden states (and a spare buffer of their shape) on ``device``: moved at a range
    boundary of a placement, else as they are."""
    if hidden.device == device or (device.index is None and hidden.device.type == device.type):
        return hidden, spare
    hidden = hidden.to(device)
    return hidden, (torch.empty_like(hidden) if spare is not None else None)


def _to(obj: object, device: torch.device) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _call_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _BlocksDetached:
    """Temporarily take the block list out of the model (to move the rest to a device)."""

    def __init__(self, loaded: LoadedModel) -> None:
        path = loaded.family.blocks
        parent_path, _, self.attr = path.rpartition(".")
        self.parent = get_attr(loaded.model, parent_path) if parent_path else loaded.model
        self.blocks = getattr(self.parent, self.attr)

    def __enter__(self) -> nn.ModuleList:
        setattr(self.parent, self.attr, nn.ModuleList())
        return self.blocks

    def __exit__(self, *exc: object) -> None:
        setattr(self.parent, self.attr, self.blocks)
