"""The JSON every ``--json`` prints: strict JSON (RFC 8259), which has no NaN or Infinity, so a
missing or non-finite number (a failed fit, a failed run's perplexity) is ``null``; numpy and
pandas scalars as numbers, anything else (paths, timestamps) as text."""
from __future__ import annotations

import json
import math


def _plain(value: object) -> object:
    """``value`` with every non-finite float as None and numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if type(value).__name__ in ("NAType", "NaTType"):      # pandas' missing values
        return None
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        try:
            value = item()
        except (TypeError, ValueError):
            return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: object) -> str:
    return json.dumps(_plain(value), default=str, allow_nan=False)
