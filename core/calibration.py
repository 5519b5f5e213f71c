"""Calibration data: ``nsamples`` random windows of ``seqlen`` tokens from a text.

The text is the calibration part of the embedded corpus (``wiki``), ``wikitext2`` / ``c4``
where the ``datasets`` library can load them, or a user's text file (``core.texts``). The
text is tokenized once; window starts are drawn with a seeded ``torch.Generator`` so the
same seed gives the same windows on every machine. Defaults follow the paper (128 windows
of 2048 tokens, seed 0); ``seqlen`` is capped at the model's context length.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .texts import EMBEDDED, load_text

log = logging.getLogger(__name__)

DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 2048
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Calibration:
    """``input_ids``: ``nsamples x seqlen`` token ids (int64, CPU) and how they were drawn."""

    input_ids: torch.Tensor
    dataset: str
    seed: int
    text_tokens: int              # tokens in the whole source text

    @property
    def nsamples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    def settings(self) -> dict:
        return {"dataset": self.dataset, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's positions allow (``None`` if the config does not say)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def cap_seqlen(seqlen: int, model: torch.nn.Module) -> int:
    """``seqlen`` checked (>= 2) and capped at the model's context length (logged when capped)."""
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 2:
        raise ValueError(f"seqlen={seqlen!r}: give a whole number of tokens >= 2, e.g. 2048")
    limit = context_length(model)
    if limit is not None and seqlen > limit:
        log.info("seqlen %d capped at the model's context length %d", seqlen, limit)
        return limit
    return seqlen


def tokenize(tokenizer: object, text: str) -> torch.Tensor:
    """The whole text as one 1-D int64 tensor of token ids (no special tokens added)."""
    if tokenizer is None:
        raise ValueError("tokenizer=None: this model has no tokenizer; load it with tokenizer=True "
                         "or pass token ids directly")
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)  # "longer than max"
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def sample_windows(ids: torch.Tensor, *, nsamples: int, seqlen: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` consecutive tokens with seeded random starts."""
    if not isinstance(nsamples, int) or isinstance(nsamples, bool) or nsamples < 1:
        raise ValueError(f"nsamples={nsamples!r}: give a whole number of windows >= 1, e.g. 128")
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 2:
        raise ValueError(f"seqlen={seqlen!r}: give a whole number of tokens >= 2, e.g. 2048")
    ids = ids.reshape(-1)
    if ids.numel() <= seqlen:
        raise ValueError(f"seqlen={seqlen}: the text has only {ids.numel()} tokens; use a shorter seqlen "
                         "or a longer text")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def calibration_data(tokenizer: object, *, dataset: str = EMBEDDED, nsamples: int = DEFAULT_NSAMPLES,
                     seqlen: int = DEFAULT_SEQLEN, seed: int = DEFAULT_SEED,
                     model: torch.nn.Module | None = None, split: str = "calib") -> Calibration:
    """Seeded calibration windows from the ``calib`` part of ``dataset`` (never the eval text).

    ``model`` (optional) caps ``seqlen`` at its context length. ``split="eval"`` exists only
    for experiments; pruning and epsilon tuning always use ``calib``.
    """
    if model is not None:
        seqlen = cap_seqlen(seqlen, model)
    text = load_text(dataset or EMBEDDED, split=split)
    ids = tokenize(tokenizer, text)
    windows = sample_windows(ids, nsamples=nsamples, seqlen=seqlen, seed=seed)
    log.info("calibration: %d windows x %d tokens from %s (%d tokens, seed %d)",
             nsamples, seqlen, dataset, ids.numel(), seed)
    return Calibration(windows, dataset or EMBEDDED, int(seed), int(ids.numel()))
