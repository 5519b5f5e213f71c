"""Blocks placed across several devices of one machine, for pruning and evaluation.

``place_blocks`` splits the blocks into contiguous ranges, one per device in the order given,
so that the largest load (parameter bytes; the input embeddings count on the first device, the
final norm and the output head on the last) is as small as it can be, within optional
per-device budgets. ``placement`` makes the ``Placement`` of a loaded model (in memory or a
skeleton: sizes from the parameters' shapes and dtypes). The pruning engine and the streamed
evaluation materialise block ``b`` on ``placement[b]`` and hand the hidden states on at the
range boundaries; ``placed`` holds an in-memory model across the devices for its own forward
(a pipeline over the windows: each block's inputs follow it to its device). One device is the
placement of every block on it: the same code, the same numbers.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..config import resolve_device
from ..models import LoadedModel, get_attr
from .engine import _BlocksDetached, _to, move_materialised


def place_blocks(sizes: Sequence[int], devices: Sequence[object], *, first: int = 0, last: int = 0,
                 budgets: Sequence[int | None] | None = None) -> list[int]:
    """The position in ``devices`` of each block (``sizes[b]``: its bytes), in contiguous
    ranges in device order, every device given at least one block.

    Minimises the largest load (``first`` bytes added to the first device, ``last`` to the
    last); ties go to the split found first (earlier cuts). Deterministic. ``budgets``: per
    device the most bytes it may hold (None: no limit); a split that keeps them all is
    chosen, or a ValueError says none does."""
    n, k = len(sizes), len(devices)
    if k == 0:
        raise ValueError("place_blocks: give at least one device")
    if n < k:
        raise ValueError(f"{n} blocks cannot be spread over {k} devices; give at most {n} devices")
    budgets = list(budgets) if budgets is not None else [None] * k
    if len(budgets) != k:
        raise ValueError(f"budgets: {len(budgets)} values for {k} devices")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + int(s))
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k)]          # best[d][i]: blocks 0..i-1 on devices 0..d
    cut = [[0] * (n + 1) for _ in range(k)]
    for d in range(k):
        extra = (first if d == 0 else 0) + (last if d == k - 1 else 0)
        for i in range(d + 1, n - (k - 1 - d) + 1):     # room for one block on every later device
            for j in range(d, i) if d else (0,):
                before = best[d - 1][j] if d else 0
                load = prefix[i] - prefix[j] + extra
                if before == inf or (budgets[d] is not None and load > budgets[d]):
                    continue
                if max(before, load) < best[d][i]:
                    best[d][i], cut[d][i] = max(before, load), j
    if best[k - 1][n] == inf:
        gib = [f"{b / 2**30:.2f} GiB" if b is not None else "no limit" for b in budgets]
        raise ValueError(f"the blocks ({prefix[-1] / 2**30:.2f} GiB, the largest {max(sizes) / 2**30:.2f} GiB) do "
                         f"not fit the devices' memory budget ({', '.join(gib)}); add devices or raise the budgets")
    slots, i = [0] * n, n
    for d in range(k - 1, -1, -1):
        j = cut[d][i]
        slots[j:i] = [d] * (i - j)
        i = j
    return slots


@dataclass(frozen=True)
class Placement:
    """Where each block of a model is: ``devices`` as given (by position: one device may be
    named twice), ``slots[b]`` the position of block ``b``'s device; ``placement[b]`` its device."""

    devices: tuple[torch.device, ...]
    slots: tuple[int, ...]

    def __getitem__(self, b: int) -> torch.device:
        return self.devices[self.slots[b]]

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def first(self) -> torch.device:
        return self.devices[self.slots[0]]

    @property
    def last(self) -> torch.device:
        return self.devices[self.slots[-1]]

    @property
    def spread(self) -> bool:
        """More than one device holds blocks."""
        return len(set(self.slots)) > 1

    def ranges(self) -> list[tuple[int, int]]:
        """Per device (in order) its first and last block."""
        return [(self.slots.index(d), len(self.slots) - 1 - self.slots[::-1].index(d))
                for d in range(len(self.devices))]

    def describe(self) -> str:
        """``cuda:0`` for one device, else ``cuda:0[blocks 0-15]+cuda:1[blocks 16-31]``."""
        if not self.spread:
            return str(self.first)
        return "+".join(f"{dev}[blocks {a}-{b}]" for dev, (a, b) in zip(self.devices, self.ranges()))

    def to_dict(self) -> dict:
        return {"devices": [str(d) for d in self.devices], "blocks": [list(r) for r in self.ranges()]}


def _bytes(params: Iterator[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def placement(loaded: LoadedModel, devices: str | torch.device | Sequence[str | torch.device] = "auto", *,
              budgets: Sequence[int | None] | None = None) -> Placement:
    """``loaded``'s blocks placed across ``devices`` (one device: every block on it), each
    device checked on this machine (``resolve_device``), by parameter bytes (``place_blocks``)."""
    many = devices if isinstance(devices, (list, tuple)) else [devices]
    resolved = tuple(resolve_device(d) for d in many)
    blocks = loaded.blocks
    if len(resolved) == 1:
        return Placement(resolved, (0,) * len(blocks))
    in_blocks = {id(p) for blk in blocks for p in blk.parameters()}
    emb = loaded.model.get_input_embeddings()
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    outside = [p for p in loaded.model.parameters() if id(p) not in in_blocks]
    first = _bytes(p for p in outside if id(p) in emb_ids)
    last = _bytes(p for p in outside if id(p) not in emb_ids)
    slots = place_blocks([_bytes(blk.parameters()) for blk in blocks], resolved, first=first, last=last,
                         budgets=budgets)
    return Placement(resolved, tuple(slots))


def _inputs_to(device: torch.device, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _to(args, device), _to(kwargs, device)


def _after_blocks(loaded: LoadedModel) -> list[nn.Module]:
    """The modules beside the block list that hold weights (embeddings, position tables, the
    final norm), and the output head: each gets a hook that brings its inputs to it."""
    parent_path = loaded.family.blocks.rpartition(".")[0]
    parent = get_attr(loaded.model, parent_path) if parent_path else loaded.model
    blocks = get_attr(loaded.model, loaded.family.blocks)
    mods = [m for m in parent.children() if m is not blocks and any(True for _ in m.parameters())]
    head = loaded.model.get_output_embeddings()
    return mods + ([head] if head is not None and all(head is not m for m in mods) else [])


def _is_final_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


@contextmanager
def placed(loaded: LoadedModel, place: Placement) -> Iterator[None]:
    """``loaded``'s model (in memory) held across ``place``'s devices for its own forward,
    then moved back where it was: block ``b`` on ``place[b]``, the modules outside the blocks
    on the first device but the final norm and the output head on the last (a head tied to the
    input embeddings stays with them on the first). A pre-hook on every block and outside
    module brings its inputs (hidden states, masks, position tables) to its device, so the
    hidden states are handed from device to device at the range boundaries. On one device it
    is ``model.to(device)``."""
    model = loaded.model
    home = next(model.parameters()).device
    handles = []
    try:
        if not place.spread:
            model.to(place.first)
            yield
            return
        with _BlocksDetached(loaded):
            move_materialised(model, place.first)
        emb = model.get_input_embeddings()
        tied = {id(p) for p in emb.parameters()} if emb is not None else set()
        head = model.get_output_embeddings()
        for mod in _after_blocks(loaded):
            goes_last = (mod is head or _is_final_norm(mod)) and not any(id(p) in tied for p in mod.parameters())
            if goes_last:
                mod.to(place.last)
            device = next(mod.parameters()).device
            handles.append(mod.register_forward_pre_hook(functools.partial(_inputs_to, device), with_kwargs=True))
        for b, blk in enumerate(loaded.blocks):
            blk.to(place[b])
            handles.append(blk.register_forward_pre_hook(functools.partial(_inputs_to, place[b]), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        model.to(home)
