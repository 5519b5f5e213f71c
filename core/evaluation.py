"""Perplexity with the WikiText-2 protocol (primer section 6).

The evaluation text is tokenized once and cut into non-overlapping windows of ``seqlen``
tokens (the tail that does not fill a window is dropped); perplexity is ``exp`` of the mean
next-token negative log-likelihood over all predicted tokens (``seqlen - 1`` per window).
``bos`` (``core.calibration.BOS_MODES``): with ``auto`` on a tokenizer that adds BOS, each
window is BOS + ``seqlen - 1`` text tokens and only those text tokens are scored (the BOS
position is input, never a target), so the count stays ``seqlen - 1`` per window; ``paper``
tokenizes with the tokenizer's defaults (BOS only at the start of the first window).

The loss is computed in chunks: the hidden states that feed the model's output head are
caught by a pre-hook (which lets the head compute the last position only), then the head is
applied ``chunk_tokens`` tokens at a time (default: about ``CHUNK_ELEMENTS`` logits) with
``cross_entropy(reduction="sum")`` in float32, so memory stays bounded whatever the
vocabulary. Final-logit soft-capping (Gemma-2/3) and logit scaling (Cohere, Granite) are
applied as the model does; the head's last-position output is checked against the model's
own logits and any unknown structure falls back to full logits (logged). ``chunk_tokens=None``
is the plain full-logits path. Logits are float32 whatever the model's dtype. Windows go
through the model in batches of about ``BATCH_TOKENS`` tokens (one window at a time from that
length on), which changes nothing but speed. ``max_windows`` evaluates only the first K
windows (quick looks; the result says how many were used).

A model larger than memory (``core.models.load_skeleton``) is evaluated block by block
(``StreamedPerplexity``), with the pruning engine's memory bound: the windows' hidden states
are captured at block 0 and carried through each block as it is read from the checkpoint
(``core.pruning.streaming``), or as it is pruned (``along``); then the model's own forward,
its blocks stood in by the carried states, gives the final norm and the head's chunked loss
as above. Same windows, same batches, same loss: the perplexity of the loaded model.

Several devices (``devices``, ``core.pruning.placement``): an in-memory model's blocks are
held across them in contiguous ranges (``placed``: embeddings on the first, final norm and
head on the last) and every batch of windows runs through the model's own forward, its hidden
states handed from device to device; a streamed model reads each block onto its device and
carries the hidden states on at the range boundaries. The numbers are those of one device.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from .calibration import DEFAULT_SEQLEN, bos_plan, cap_seqlen, prepend, tokenize
from .config import window_batches
from .progress import Progress, check_cancel, report
from .models import LoadedModel, is_skeleton
from .pruning.engine import BlockSource, _Windows, capture_inputs, handed_to
from .pruning.placement import placed, placement
from .pruning.streaming import block_source
from .texts import EMBEDDED, load_text

log = logging.getLogger(__name__)

_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}

#: Default chunk of the chunked loss: about this many logits at a time (256 MiB in float32;
#: 256 tokens of a 262k vocabulary, a whole 1024-token batch of the demo model's 49k).
CHUNK_ELEMENTS = 2**26


@dataclass(frozen=True)
class Perplexity:
    """``perplexity = exp(nll)``; ``tokens``: predicted tokens; ``windows`` of ``seqlen``."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    total_windows: int
    seqlen: int
    dataset: str
    seconds: float
    device: str
    bos: str = "none"              # the requested mode (core.calibration.BOS_MODES)
    bos_prepended: bool = False    # core.calibration.BosPlan.prepended

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.seqlen / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}

    def summary(self) -> str:
        part = "" if self.windows == self.total_windows else f" (first {self.windows} of {self.total_windows})"
        bos = f"bos {self.bos}" + (" (BOS prepended)" if self.bos_prepended else "")
        return (f"perplexity {self.perplexity:.3f} on {self.dataset}: {self.windows} windows of {self.seqlen} "
                f"tokens{part}, {bos}, {self.tokens_per_second:.0f} tokens/s on {self.device}")


def eval_ids(tokenizer: object, dataset: str = EMBEDDED, *, bos: str = "auto") -> torch.Tensor:
    """The evaluation text of ``dataset`` tokenized once (cached per tokenizer, dataset and
    tokenization): without special tokens, or with the tokenizer's defaults for ``bos="paper"``
    (``auto`` adds its BOS per window when the windows are cut, ``eval_windows``)."""
    plan = bos_plan(tokenizer, bos)
    defaults = plan.defaults
    key = (getattr(tokenizer, "name_or_path", None), type(tokenizer).__name__,
           getattr(tokenizer, "vocab_size", None), dataset, defaults, defaults and plan.prepended)
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE.clear()  # one text at a time (1M tokens ~ 8 MB)
        _TOKEN_CACHE[key] = tokenize(tokenizer, load_text(dataset or EMBEDDED, split="eval"), defaults=defaults)
    return _TOKEN_CACHE[key]


def eval_windows(ids: torch.Tensor, seqlen: int, *, bos_id: int | None = None,
                 max_windows: int | None = None) -> tuple[torch.Tensor, int]:
    """Non-overlapping windows of ``seqlen`` tokens cut from ``ids`` (1-D), the first
    ``max_windows`` of them, and how many the text holds. With ``bos_id`` each window is that
    token + ``seqlen - 1`` text tokens (window ``i`` holds text ``i*(seqlen-1) .. (i+1)*(seqlen-1)``)."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    span = seqlen - (bos_id is not None)
    total = ids.numel() // span
    if total < 1:
        raise ValueError(f"seqlen={seqlen}: the text has only {ids.numel()} tokens, not one full window")
    n = min(total, max_windows) if max_windows else total
    return prepend(ids[:n * span].reshape(n, span), bos_id), total


def _output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, torch.nn.Module) else None


def _finish(logits: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """What the model does to its head's output: logit scaling (Cohere ``logit_scale``, Granite
    ``logits_scaling``) and final soft-capping (Gemma-2/3 ``final_logit_softcapping``)."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    divisor = getattr(cfg, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and divisor:
        logits = logits / divisor
    cap = getattr(cfg, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class _HeadInput:
    """Forward pre-hook on the output head: keeps the hidden states (``batch x seqlen x
    hidden``) and lets the head compute the last position only."""

    def __init__(self, shape: tuple[int, int]):
        self.shape, self.hidden, self.calls = shape, None, 0

    def __call__(self, module: torch.nn.Module, args: tuple):
        self.calls += 1
        h = args[0] if args else None
        if self.calls > 1 or not torch.is_tensor(h) or h.dim() != 3 or tuple(h.shape[:2]) != self.shape:
            return None
        self.hidden = h
        return (h[:, -1:],) + tuple(args[1:])


_FALLBACK_LOGGED: set[str] = set()


def _log_fallback(model: torch.nn.Module, why: str) -> None:
    name = type(model).__name__
    if name not in _FALLBACK_LOGGED:       # once per model class
        _FALLBACK_LOGGED.add(name)
        log.info("%s: %s; the loss uses the full logits", name, why)


def _full_nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    logits = logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).to(logits.device),
                                 reduction="sum"))


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, *,
               chunk_tokens: int | str | None = "auto") -> tuple[float, int]:
    """Summed next-token NLL of ``windows`` (``batch x seqlen`` token ids) and the number of
    predicted tokens (``batch x (seqlen - 1)``). ``chunk_tokens``: tokens per chunk of the
    loss (``auto``: about ``CHUNK_ELEMENTS`` logits), ``None``: the full logits at once."""
    target = windows[:, 1:]
    head = _output_head(model) if chunk_tokens is not None else None
    catch = _HeadInput(tuple(windows.shape))
    handle = head.register_forward_pre_hook(catch) if head is not None else None
    try:
        logits = model(input_ids=windows, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if chunk_tokens is None or catch.hidden is None or catch.calls != 1:
        if chunk_tokens is not None:
            _log_fallback(model, "output head not found as expected")
        if logits.shape[1] == windows.shape[1]:
            return _full_nll(logits, target), int(target.numel())
        return window_nll(model, windows, chunk_tokens=None)
    hidden = catch.hidden
    last = _finish(head(hidden[:, -1:]).float(), model)
    ref = logits.float()
    tol = max(4 * torch.finfo(logits.dtype).eps, 1e-5) * max(1.0, float(ref.abs().max()))
    if last.shape != ref.shape or float((last - ref).abs().max()) > tol:
        _log_fallback(model, "logits are not the output head's (unknown post-processing)")
        return window_nll(model, windows, chunk_tokens=None)
    del logits, ref
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    t = target.reshape(-1).to(last.device)       # the head's device (the last of a placement)
    step = chunk_tokens if isinstance(chunk_tokens, int) else max(1, CHUNK_ELEMENTS // last.shape[-1])
    total = 0.0
    for i in range(0, t.numel(), step):
        chunk = _finish(head(h[i:i + step]).float(), model)
        total += float(F.cross_entropy(chunk, t[i:i + step], reduction="sum"))
    return total, int(t.numel())


def _windows(loaded: LoadedModel, dataset: str, ids: torch.Tensor | None, seqlen: int, max_windows: int | None,
             bos: str, chunk_tokens: int | str | None) -> tuple[torch.Tensor, int, int, str, object]:
    """The evaluation windows of ``perplexity``'s arguments (checked): windows, how many the
    text holds, the window length (capped at the context), the dataset's label, the BOS plan."""
    seqlen = cap_seqlen(seqlen, loaded.model)
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows={max_windows!r}: give a whole number >= 1, or None for all windows")
    if chunk_tokens not in (None, "auto") and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens={chunk_tokens!r}: give a whole number >= 1, 'auto', or None for full logits")
    plan = bos_plan(loaded.tokenizer, bos)
    if ids is None:
        ids = eval_ids(loaded.tokenizer, dataset, bos=bos)
        label = dataset or EMBEDDED
    else:
        label = "given tokens"
        plan = plan if not plan.defaults else replace(plan, prepended=False)
    windows, total = eval_windows(ids, seqlen, bos_id=plan.token_id, max_windows=max_windows)
    return windows, total, seqlen, label, plan


@torch.no_grad()
def perplexity(loaded: LoadedModel, *, dataset: str = EMBEDDED, ids: torch.Tensor | None = None,
               seqlen: int = DEFAULT_SEQLEN, max_windows: int | None = None, device: str | torch.device = "auto",
               progress: Progress = None, cancel: object = None, bos: str = "auto",
               chunk_tokens: int | str | None = "auto", devices: Sequence[str] | None = None) -> Perplexity:
    """Perplexity of ``loaded`` on the evaluation part of ``dataset`` (``wiki``, ``wikitext2``,
    ``c4`` or a text file), or on given token ``ids`` (1-D; ``bos="paper"`` cuts them as given
    and reports no BOS). The model is moved to ``device`` for the evaluation and back
    afterwards; a model without its weights (``load_skeleton``) is evaluated block by block
    from its checkpoint (``StreamedPerplexity``). ``bos``: ``core.calibration.BOS_MODES``;
    ``chunk_tokens``: ``window_nll``. ``devices``: instead of ``device``, the blocks placed
    across these devices (``core.pruning.placement``; the same perplexity)."""
    if is_skeleton(loaded):
        streamed = StreamedPerplexity(loaded, block_source(loaded), dataset=dataset, ids=ids, seqlen=seqlen,
                                      max_windows=max_windows, device=device, cancel=cancel, bos=bos,
                                      chunk_tokens=chunk_tokens, devices=devices)
        n = len(loaded.blocks)
        for b in range(n):
            check_cancel(cancel, f"before block {b}")
            with streamed.source.materialised(b, streamed.place[b]):
                streamed.block(b)
            report(progress, b + 1, n + 1, f"perplexity: block {b + 1}/{n}")
        result = streamed.result()
        report(progress, n + 1, n + 1, f"perplexity {result.perplexity:.2f}")
        return result
    model = loaded.model
    windows, total, seqlen, label, plan = _windows(loaded, dataset, ids, seqlen, max_windows, bos, chunk_tokens)
    n = windows.shape[0]
    place = placement(loaded, devices or device)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    start = time.perf_counter()
    try:
        with placed(loaded, place):
            for rows in window_batches(n, seqlen):
                check_cancel(cancel, f"at window {rows.start}")
                s, c = window_nll(model, windows[rows].to(place.first), chunk_tokens=chunk_tokens)
                nll, count = nll + s, count + c
                report(progress, rows.stop, n, f"perplexity {math.exp(nll / count):.2f}")
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    mean = nll / count
    result = Perplexity(math.exp(mean), mean, count, n, total, seqlen, label, seconds, place.describe(), bos,
                        plan.prepended)
    log.info(result.summary())
    return result


def _streamed_chunk(loaded: LoadedModel) -> int:
    """Tokens per chunk of a streamed loss: about ``CHUNK_ELEMENTS`` logits, and no more
    than the largest matrix of a block holds (the memory bound of the streamed pipeline)."""
    head = _output_head(loaded.model)
    vocab = head.weight.shape[0] if head is not None else 1
    largest = max((m.params for m in loaded.matrices), default=CHUNK_ELEMENTS)
    return max(1, min(CHUNK_ELEMENTS, largest) // vocab)


class StreamedPerplexity:
    """``perplexity`` of a model whose blocks come one at a time from ``source``.

    Built (same arguments as ``perplexity``): the windows' inputs of block 0 are captured.
    ``block(b)``, while block ``b`` is on ``device`` (``source.materialised``, or a pruning
    run's ``along``), carries the windows' hidden states through it. ``result()``, after the
    last block, loads the tensors outside the blocks with the output head (``source.outside``)
    and runs the model's forward with every block standing in for the carried states, so the
    final norm and the head's chunked loss are the model's own (chunks of at most the largest
    matrix's size in logits, ``_streamed_chunk``). Memory: one block (the embeddings at the
    capture, the head at the end), and two buffers of ``windows x seqlen x hidden``. With
    ``devices`` block ``b`` is on ``place[b]`` (``core.pruning.placement``): the hidden states
    move on at a range boundary, the head computes on the last device.
    """

    def __init__(self, loaded: LoadedModel, source: BlockSource, *, dataset: str = EMBEDDED,
                 ids: torch.Tensor | None = None, seqlen: int = DEFAULT_SEQLEN, max_windows: int | None = None,
                 device: str | torch.device = "auto", cancel: object = None, bos: str = "auto",
                 chunk_tokens: int | str | None = "auto", devices: Sequence[str] | None = None) -> None:
        self.loaded, self.source, self.cancel, self.bos = loaded, source, cancel, bos
        self.chunk_tokens = _streamed_chunk(loaded) if chunk_tokens == "auto" else chunk_tokens
        self.windows, self.total, self.seqlen, self.label, self.plan = _windows(
            loaded, dataset, ids, seqlen, max_windows, bos, chunk_tokens)
        self.place = placement(loaded, devices or device)
        self.passes = _Windows()
        self.structure: tuple | None = None        # a block's output other than the hidden states
        self.next_block = 0
        start = time.perf_counter()
        captured = capture_inputs(loaded, self.windows, self.place, cancel, source)
        self.args, self.kwargs, self.hidden = captured.args, captured.kwargs, captured.inputs
        self.spare = torch.empty_like(self.hidden)
        self.seconds = time.perf_counter() - start

    @torch.no_grad()
    def block(self, b: int) -> None:
        """Carry the hidden states through block ``b`` (on the device now)."""
        if b != self.next_block:
            raise ValueError(f"block {b} given to the streamed evaluation, block {self.next_block} expected")
        start = time.perf_counter()
        blk = self.loaded.blocks[b]
        self.hidden, self.spare = handed_to(self.place[b], self.hidden, self.spare)
        handle = blk.register_forward_hook(self._keep_structure)
        try:
            self.passes.run(blk, self.hidden, self.spare, self.args[b], self.kwargs[b])
        finally:
            handle.remove()
        self.hidden, self.spare = self.spare, self.hidden
        self.next_block += 1
        self.seconds += time.perf_counter() - start

    def _keep_structure(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        if self.structure is None:
            self.structure = () if torch.is_tensor(output) else (type(output), tuple(output[1:]))

    def _stand_in(self, *args: object, **kwargs: object) -> object:
        """Every block in the final forward: the carried states of this batch of windows."""
        hidden = self.hidden[self.rows]
        return hidden if not self.structure else self.structure[0]((hidden, *self.structure[1]))

    @torch.no_grad()
    def result(self) -> Perplexity:
        """The perplexity, once every block has been through ``block``."""
        blocks = self.loaded.blocks
        if self.next_block != len(blocks):
            raise ValueError(f"the streamed evaluation saw {self.next_block} of {len(blocks)} blocks")
        start = time.perf_counter()
        self.spare = None
        model, n = self.loaded.model, self.windows.shape[0]
        for blk in blocks:
            blk.forward = self._stand_in                # an instance attribute, removed below
        nll, count = 0.0, 0
        try:
            with self.source.outside(self.place.last, head=True):
                for rows in window_batches(n, self.seqlen):
                    check_cancel(self.cancel, f"at window {rows.start}")
                    self.rows = rows
                    s, c = window_nll(model, self.windows[rows].to(self.place.last), chunk_tokens=self.chunk_tokens)
                    nll, count = nll + s, count + c
        finally:
            for blk in blocks:
                blk.__dict__.pop("forward", None)
        self.hidden = None
        seconds = self.seconds + time.perf_counter() - start
        mean = nll / count
        result = Perplexity(math.exp(mean), mean, count, n, self.total, self.seqlen, self.label, seconds,
                            self.place.describe(), self.bos, self.plan.prepended)
        log.info("%s (streamed block by block)", result.summary())
        return result
