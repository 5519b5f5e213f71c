"""Published LLaMA alpha profiles: the per-matrix alphas released with AlphaPruning, as metric tables.

The files ship in ``core/data/profiles`` (MIT licence); :func:`load_profile` turns one into a
table with the columns of ``spectrascope analyze`` (name, block, kind, rows, cols, params,
alpha) so that ``allocation.allocate`` works on models too large to load here.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np
import pandas as pd

from .models import FAMILIES

#: Module path inside a LLaMA block -> kind (q, k, v, o, gate, up, down), in the published
#: (module) order: the LLaMA family adapter's own map.
_LLAMA_KINDS: dict[str, str] = next(f.kinds for f in FAMILIES if f.name == "llama")
#: profile name: (blocks, hidden, intermediate, k/v out features), from the published README.
PROFILE_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "llama-7b-hf": (32, 4096, 11008, 4096),
    "llama-13b-hf": (40, 5120, 13824, 5120),
    "llama-30b-hf": (60, 6656, 17920, 6656),
    "llama-65b-hf": (80, 8192, 22016, 8192),
    "llama2-7b-hf": (32, 4096, 11008, 4096),
    "llama2-13b-hf": (40, 5120, 13824, 5120),
    "llama2-70b-hf": (80, 8192, 28672, 1024),
}


def list_profiles() -> list[str]:
    """Names of the published alpha profiles that ship with Spectrascope."""
    return sorted(PROFILE_SHAPES)


def load_profile(name: str) -> pd.DataFrame:
    """A published LLaMA alpha profile as a metrics table, in the published order.

    Columns: name (``model.layers.{b}.self_attn.q_proj`` ...), block, kind (q, k, v, o,
    gate, up, down), rows and cols (the weight's out x in features), params, alpha.
    """
    if name not in PROFILE_SHAPES:
        raise ValueError(f"profile={name!r} is not a published profile; use one of {', '.join(list_profiles())}")
    return _build_profile(name).copy()


@lru_cache(maxsize=None)
def _build_profile(name: str) -> pd.DataFrame:
    blocks, hidden, inter, kv = PROFILE_SHAPES[name]
    with resources.as_file(resources.files(__package__) / "data" / "profiles" / f"{name}.npy") as path:
        alpha = np.load(path)
    per_block = len(_LLAMA_KINDS)
    if alpha.shape != (blocks * per_block,):
        raise ValueError(f"profile {name!r}: expected {blocks * per_block} alphas, found shape {alpha.shape}; "
                         "the packaged file is damaged, reinstall Spectrascope")
    # (out_features, in_features) of each kind, in module order: q, k, v, o, gate, up, down
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
              (inter, hidden), (inter, hidden), (hidden, inter)]
    rows, cols = (np.tile(np.array(side, dtype=np.int64), blocks) for side in zip(*shapes))
    block = np.repeat(np.arange(blocks, dtype=np.int64), per_block)
    paths, kinds = list(_LLAMA_KINDS) * blocks, list(_LLAMA_KINDS.values()) * blocks
    names = [f"model.layers.{b}.{p}" for b, p in zip(block.tolist(), paths)]
    return pd.DataFrame({"name": names, "block": block, "kind": kinds, "rows": rows, "cols": cols,
                         "params": rows * cols, "alpha": alpha.astype(np.float64)})
