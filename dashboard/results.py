"""The Prune page's results: "vs dense" and "vs uniform" within a comparison key (like with
like), the perplexity chart of one key, and file names for downloads. Drawing and table
shaping only: every number and key comes from the runs registry."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core.registry import Registry
from dashboard.figures import palette, perplexity_axis

#: legend under the plot, so a narrow window keeps the plot's width
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0)
DENSE_COLOR = "#1F2430"


def with_baselines(runs: pd.DataFrame, registry: Registry) -> pd.DataFrame:
    """``runs`` (rows of ``Registry.compare``) plus ``vs dense %`` and ``vs uniform %``: against
    the registry's baseline of the same comparison key (``Registry.baseline``); NaN without one."""
    def change(row: dict, kind: str) -> float:
        if row["kind"] != "prune" or (kind == "uniform" and row["allocation"] == "uniform"):
            return np.nan
        base = registry.baseline(row, kind)
        return 100.0 * (row["perplexity"] / base["perplexity"] - 1.0) if base else np.nan

    rows = runs.to_dict(orient="records")
    return runs.assign(**{"vs dense %": [change(r, "dense") for r in rows],
                          "vs uniform %": [change(r, "uniform") for r in rows]})


def results_figure(runs: pd.DataFrame, title: str = "perplexity against sparsity") -> go.Figure:
    """Perplexity against sparsity for the runs of one comparison key: one line per
    (method, allocation), the last run of each sparsity; the dense run of the same
    evaluation settings as a dashed line at its perplexity (a trace: placed at the value
    itself on the log axis, with a legend entry)."""
    fig = go.Figure()
    pruned = runs[runs["kind"] == "prune"].dropna(subset=["sparsity"])
    for i, ((method, allocation), t) in enumerate(pruned.sort_values("sparsity").groupby(["method", "allocation"])):
        t = t.groupby("sparsity", as_index=False)["perplexity"].last()
        fig.add_trace(go.Scatter(x=t["sparsity"], y=t["perplexity"], mode="lines+markers",
                                 name=f"{method} · {allocation}", line=dict(color=palette(i), width=2)))
    dense = runs[runs["kind"] == "eval"]
    if not dense.empty:
        ppl = float(dense["perplexity"].iloc[-1])
        fig.add_trace(go.Scatter(x=[0.0, 1.0], y=[ppl, ppl], mode="lines", name=f"dense {ppl:.2f}",
                                 line=dict(color=DENSE_COLOR, dash="dash", width=1.5),
                                 hovertemplate=f"dense perplexity {ppl:.3f}<extra></extra>"))
    fig.update_layout(template="plotly_white", margin=dict(l=10, r=10, t=50, b=10), height=420, title=title,
                      xaxis_title="sparsity", yaxis_title="perplexity", legend=LEGEND_BELOW)
    perplexity_axis(fig, [trace.y for trace in fig.data])      # 20, 30, 40, 50, ...: every value readable
    fig.update_xaxes(range=[-0.02, 1.0])
    return fig


def file_name(*parts: object, ext: str = "csv") -> str:
    """A download's (or folder's) name from its parts (model, table, settings): safe characters
    only; ``ext=""`` for none."""
    stem = "_".join(str(p) for p in parts if p not in (None, ""))
    stem = re.sub(r"[^A-Za-z0-9.=-]+", "_", stem).strip("_.")[:180] or "table"
    return f"{stem}.{ext}" if ext else stem
