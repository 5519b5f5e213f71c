"""Tables as GitHub Markdown (sweep reports, tuning summaries, benchmark results)."""
from __future__ import annotations

import pandas as pd


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (numbers rounded for reading)."""
    def cell(v: object) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
