"""Perplexity with the WikiText-2 protocol (primer section 6).

The evaluation text is tokenized once and cut into non-overlapping windows of ``seqlen``
tokens (the tail that does not fill a window is dropped); perplexity is ``exp`` of the mean
next-token negative log-likelihood over all predicted tokens (``seqlen - 1`` per window).
Logits are taken in float32 whatever the model's dtype. Windows go through the model in
batches of about ``BATCH_TOKENS`` tokens (one window at a time from that length on), which
changes nothing but speed. ``max_windows`` evaluates only
the first K windows (quick looks; the result says how many were used).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .calibration import DEFAULT_SEQLEN, cap_seqlen, tokenize
from .config import resolve_device, window_batches
from .progress import Progress, check_cancel, report
from .models import LoadedModel
from .texts import EMBEDDED, load_text

log = logging.getLogger(__name__)

_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


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

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.seqlen / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}

    def summary(self) -> str:
        part = "" if self.windows == self.total_windows else f" (first {self.windows} of {self.total_windows})"
        return (f"perplexity {self.perplexity:.3f} on {self.dataset}: {self.windows} windows of {self.seqlen} "
                f"tokens{part}, {self.tokens_per_second:.0f} tokens/s on {self.device}")


def eval_ids(tokenizer: object, dataset: str = EMBEDDED) -> torch.Tensor:
    """The evaluation text of ``dataset`` tokenized once (cached per tokenizer and dataset)."""
    key = (getattr(tokenizer, "name_or_path", None), type(tokenizer).__name__,
           getattr(tokenizer, "vocab_size", None), dataset)
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE.clear()  # one text at a time (1M tokens ~ 8 MB)
        _TOKEN_CACHE[key] = tokenize(tokenizer, load_text(dataset or EMBEDDED, split="eval"))
    return _TOKEN_CACHE[key]


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of ``windows`` (``batch x seqlen`` token ids) and the number of
    predicted tokens (``batch x (seqlen - 1)``)."""
    logits = model(input_ids=windows, use_cache=False).logits[:, :-1].float()
    target = windows[:, 1:]
    return (float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")),
            int(target.numel()))


@torch.no_grad()
def perplexity(loaded: LoadedModel, *, dataset: str = EMBEDDED, ids: torch.Tensor | None = None,
               seqlen: int = DEFAULT_SEQLEN, max_windows: int | None = None, device: str | torch.device = "auto",
               progress: Progress = None, cancel: object = None) -> Perplexity:
    """Perplexity of ``loaded`` on the evaluation part of ``dataset`` (``wiki``, ``wikitext2``,
    ``c4`` or a text file), or on given token ``ids`` (1-D). The model is moved to ``device``
    for the evaluation and back afterwards."""

    model = loaded.model
    seqlen = cap_seqlen(seqlen, model)
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows={max_windows!r}: give a whole number >= 1, or None for all windows")
    if ids is None:
        ids = eval_ids(loaded.tokenizer, dataset)
        label = dataset or EMBEDDED
    else:
        label = "given tokens"
    ids = torch.as_tensor(ids).reshape(-1).long()
    total = ids.numel() // seqlen
    if total < 1:
        raise ValueError(f"seqlen={seqlen}: the text has only {ids.numel()} tokens, not one full window")
    n = min(total, max_windows) if max_windows else total
    dev = resolve_device(device)
    home_device = next(model.parameters()).device
    was_training = model.training
    model.eval().to(dev)
    nll, count = 0.0, 0
    start = time.perf_counter()
    windows = ids[:n * seqlen].reshape(n, seqlen)
    try:
        for rows in window_batches(n, seqlen):
            check_cancel(cancel, f"at window {rows.start}")
            s, c = window_nll(model, windows[rows].to(dev))
            nll, count = nll + s, count + c
            report(progress, rows.stop, n, f"perplexity {math.exp(nll / count):.2f}")
    finally:
        model.to(home_device).train(was_training)
    seconds = time.perf_counter() - start
    mean = nll / count
    result = Perplexity(math.exp(mean), mean, count, n, total, seqlen, label, seconds, str(dev))
    log.info(result.summary())
    return result
