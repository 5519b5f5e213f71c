"""The Prune page's results: runs grouped by comparison key (like with like), "vs dense" and
"vs uniform" within a key, the perplexity chart of one key, and file names for downloads.
Drawing and table shaping only: every number comes from the runs registry."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.figures import palette

#: legend under the plot, so a narrow window keeps the plot's width
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0)
DENSE_COLOR = "#1F2430"


def _calib(value: object) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def comparison_keys(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` (``Registry.query`` rows) with ``eval_key``, ``key`` and ``settings`` columns.

    Local stand-in until the registry's ``compare`` returns them (branch ``evalkey``): the
    evaluation key is model identity, evaluation text, seqlen and windows (and BOS when
    recorded); a pruned run's key adds its calibration text, windows, seqlen and seed."""
    out = runs.copy()
    eval_keys, keys, settings = [], [], []
    for row in out.itertuples(index=False):
        calib = _calib(getattr(row, "calibration", None))
        bos = calib.get("bos", "?")
        eval_key = f"{row.model_identity}|eval={row.eval_dataset}|seqlen={row.eval_seqlen}|windows={row.eval_windows}"
        label = f"{row.eval_dataset} · {row.eval_windows}×{row.eval_seqlen}"
        key = eval_key
        if row.kind == "prune":
            if calib:
                key += (f"|calib={calib.get('dataset')}|nsamples={calib.get('nsamples')}"
                        f"|calib_seqlen={calib.get('seqlen')}|seed={calib.get('seed')}|bos={bos}")
                label += f" · calib {calib.get('nsamples')}×{calib.get('seqlen')} seed {calib.get('seed')}"
            else:
                key += "|calib=none"
                label += " · no calibration"
        eval_keys.append(eval_key)
        keys.append(key)
        settings.append(label)
    return out.assign(eval_key=eval_keys, key=keys, settings=settings)


def _same(a: pd.Series, value: object) -> pd.Series:
    """Rows of ``a`` equal to ``value`` (NaN equals NaN; floats compared with a tolerance)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return a.isna()
    if isinstance(value, (int, float)):
        return pd.Series(np.isclose(a.astype(float).fillna(np.inf), float(value)), index=a.index)
    return a == value


def with_baselines(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` (with comparison keys) plus ``vs dense %`` (against the latest dense run of the
    same ``eval_key``) and ``vs uniform %`` (against the latest uniform run of the same
    ``key``, method, N:M and sparsity). NaN where no such baseline exists."""
    dense = runs[runs["kind"] == "eval"]
    uniform = runs[(runs["kind"] == "prune") & (runs["allocation"] == "uniform")]
    vs_dense, vs_uniform = [], []
    for _, row in runs.iterrows():
        d = dense[dense["eval_key"] == row["eval_key"]]
        vs_dense.append(100.0 * (row["perplexity"] / d["perplexity"].iloc[-1] - 1.0)
                        if row["kind"] == "prune" and not d.empty else np.nan)
        u = uniform[(uniform["key"] == row["key"]) & (uniform["method"] == row["method"])
                    & _same(uniform["sparsity"], row["sparsity"]) & _same(uniform["nm"], row["nm"])]
        vs_uniform.append(100.0 * (row["perplexity"] / u["perplexity"].iloc[-1] - 1.0)
                          if row["kind"] == "prune" and row["allocation"] != "uniform" and not u.empty else np.nan)
    return runs.assign(**{"vs dense %": vs_dense, "vs uniform %": vs_uniform})


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
    fig.update_yaxes(type="log")
    fig.update_xaxes(range=[-0.02, 1.0])
    return fig


def file_name(*parts: object, ext: str = "csv") -> str:
    """A download's (or folder's) name from its parts (model, table, settings): safe characters
    only; ``ext=""`` for none."""
    stem = "_".join(str(p) for p in parts if p not in (None, ""))
    stem = re.sub(r"[^A-Za-z0-9.=-]+", "_", stem).strip("_.")[:180] or "table"
    return f"{stem}.{ext}" if ext else stem
