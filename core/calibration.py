"""Calibration data: ``nsamples`` random windows of ``seqlen`` tokens from a text.

The text is the calibration part of the embedded corpus (``wiki``), ``wikitext2`` / ``c4``
where the ``datasets`` library can load them, or a user's text file (``core.texts``). The
text is tokenized once; window starts are drawn with a seeded ``torch.Generator`` so the
same seed gives the same windows on every machine. Defaults follow the paper (128 windows
of 2048 tokens, seed 0); ``seqlen`` is capped at the model's context length.

Beginning-of-sequence token (``bos``, one of ``BOS_MODES``; shared with ``core.evaluation``):

- ``auto`` (default): when the model's tokenizer adds BOS by default (Gemma, LLaMA-3, ...),
  every window is BOS + ``seqlen - 1`` text tokens; otherwise windows are as for ``none``.
- ``paper``: the published scripts' protocol: the text is tokenized once with the
  tokenizer's defaults (so only the start of the stream holds BOS) and cut as for ``none``.
- ``none``: the text is tokenized without special tokens and windows are cut from it as is.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .choices import BOS_MODES, DEFAULT_NSAMPLES, DEFAULT_SEED, DEFAULT_SEQLEN
from .texts import EMBEDDED, load_text

if TYPE_CHECKING:
    from .models import LoadedModel
    from .spec import PruneSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BosPlan:
    """How a ``bos`` mode applies to one tokenizer: ``token_id`` is prepended to every window
    (``auto`` on a tokenizer that adds BOS), ``defaults`` tokenizes the text with the
    tokenizer's defaults (``paper``); ``prepended``: windows (``auto``) or the token stream
    (``paper``) start with BOS."""

    mode: str
    token_id: int | None = None
    defaults: bool = False
    prepended: bool = False

    def settings(self) -> dict:
        return {"bos": self.mode, "bos_prepended": self.prepended}


def default_bos(tokenizer: object) -> int | None:
    """The BOS id when ``tokenizer`` adds it by default (a short text tokenized with the
    tokenizer's defaults starts with ``bos_token_id``), else ``None``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None:
        return None
    ids = tokenizer("Hello world", return_attention_mask=False)["input_ids"]
    return int(bos) if len(ids) > 0 and int(ids[0]) == int(bos) else None


def bos_plan(tokenizer: object, bos: str = "auto") -> BosPlan:
    """``bos`` (one of ``BOS_MODES``) resolved for ``tokenizer`` (``None``: never BOS)."""
    if bos not in BOS_MODES:
        raise ValueError(f"bos={bos!r}: use one of {', '.join(BOS_MODES)}")
    token = default_bos(tokenizer) if bos != "none" else None
    if bos == "auto":
        return BosPlan(bos, token, False, token is not None)
    return BosPlan(bos, None, bos == "paper", token is not None)


def prepend(windows: torch.Tensor, token_id: int | None) -> torch.Tensor:
    """``windows`` (``n x L``) with a first column of ``token_id`` (``n x (L+1)``); as is for ``None``."""
    if token_id is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), int(token_id), dtype=windows.dtype), windows], dim=1)


@dataclass(frozen=True)
class Calibration:
    """``input_ids``: ``nsamples x seqlen`` token ids (int64, CPU) and how they were drawn."""

    input_ids: torch.Tensor
    dataset: str
    seed: int
    text_tokens: int              # tokens in the whole source text
    bos: str = "none"             # the requested mode (BOS_MODES)
    bos_prepended: bool = False   # BosPlan.prepended

    @property
    def nsamples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    def settings(self) -> dict:
        return {"dataset": self.dataset, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "bos": self.bos, "bos_prepended": self.bos_prepended}


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


def tokenize(tokenizer: object, text: str, *, defaults: bool = False) -> torch.Tensor:
    """The whole text as one 1-D int64 tensor of token ids: no special tokens added, or with
    ``defaults`` the tokenizer's own (e.g. a leading BOS, the ``paper`` protocol)."""
    if tokenizer is None:
        raise ValueError("tokenizer=None: this model has no tokenizer; load it with tokenizer=True "
                         "or pass token ids directly")
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)  # "longer than max"
    ids = tokenizer(text, add_special_tokens=defaults, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def sample_windows(ids: torch.Tensor, *, nsamples: int, seqlen: int, seed: int = DEFAULT_SEED,
                   bos_id: int | None = None) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens with seeded random starts: consecutive text
    tokens, or with ``bos_id`` that token followed by ``seqlen - 1`` text tokens."""
    if not isinstance(nsamples, int) or isinstance(nsamples, bool) or nsamples < 1:
        raise ValueError(f"nsamples={nsamples!r}: give a whole number of windows >= 1, e.g. 128")
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 2:
        raise ValueError(f"seqlen={seqlen!r}: give a whole number of tokens >= 2, e.g. 2048")
    ids = ids.reshape(-1)
    span = seqlen - (bos_id is not None)
    if ids.numel() <= span:
        raise ValueError(f"seqlen={seqlen}: the text has only {ids.numel()} tokens; use a shorter seqlen "
                         "or a longer text")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - span, (nsamples,), generator=gen)
    return prepend(torch.stack([ids[s:s + span] for s in starts.tolist()]), bos_id)


def calibration_data(tokenizer: object, *, dataset: str = EMBEDDED, nsamples: int = DEFAULT_NSAMPLES,
                     seqlen: int = DEFAULT_SEQLEN, seed: int = DEFAULT_SEED,
                     model: torch.nn.Module | None = None, split: str = "calib", bos: str = "auto") -> Calibration:
    """Seeded calibration windows from the ``calib`` part of ``dataset`` (never the eval text).

    ``model`` (optional) caps ``seqlen`` at its context length. ``split="eval"`` exists only
    for experiments; pruning and epsilon tuning always use ``calib``. ``bos``: one of
    ``BOS_MODES`` (module docstring).
    """
    plan = bos_plan(tokenizer, bos)
    if model is not None:
        seqlen = cap_seqlen(seqlen, model)
    text = load_text(dataset or EMBEDDED, split=split)
    ids = tokenize(tokenizer, text, defaults=plan.defaults)
    windows = sample_windows(ids, nsamples=nsamples, seqlen=seqlen, seed=seed, bos_id=plan.token_id)
    log.info("calibration: %d windows x %d tokens from %s (%d tokens, seed %d, bos %s%s)",
             nsamples, seqlen, dataset, ids.numel(), seed, bos, " prepended" if plan.prepended else "")
    return Calibration(windows, dataset or EMBEDDED, int(seed), int(ids.numel()), bos, plan.prepended)


def holdout_split(base: "PruneSpec", loaded: "LoadedModel", holdout: float) -> tuple[Calibration, torch.Tensor]:
    """The calibration text of ``base`` tokenized (by its BOS mode) and cut in two: calibration
    windows drawn from the first ``1 - holdout`` of the tokens, and the held-out rest."""
    c = base.calibration
    if c.dataset == base.evaluation.dataset and Path(c.dataset).expanduser().is_file():
        raise ValueError(f"calibration.dataset={c.dataset!r}: a text file is used whole for calibration and "
                         "evaluation, so held-out text would be evaluation text; calibrate on another text")
    plan = bos_plan(loaded.tokenizer, c.bos)
    seqlen = cap_seqlen(c.seqlen, loaded.model)
    ids = tokenize(loaded.tokenizer, load_text(c.dataset, split="calib"), defaults=plan.defaults)
    cut = int(ids.numel() * (1 - holdout))
    windows = sample_windows(ids[:cut], nsamples=c.nsamples, seqlen=seqlen, seed=c.seed, bos_id=plan.token_id)
    return Calibration(windows, c.dataset, c.seed, cut, c.bos, plan.prepended), ids[cut:]
