"""Plotly figures and number formatting for the pages. Drawing only: every number comes from ``core``."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.metrics import log_histogram, mp_bulk_edges, mp_density

COLORS = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D"]
LAYOUT = dict(template="plotly_white", margin=dict(l=10, r=10, t=50, b=10), height=420,
              legend=dict(orientation="v", yanchor="top", y=1, xanchor="left", x=1.02))


def palette(i: int) -> str:
    """The ``i``-th trace colour (the palette repeats)."""
    return COLORS[i % len(COLORS)]


def kind_order(table: pd.DataFrame) -> list[str]:
    """Kinds in the order they appear in a block (q, k, v, o, gate, up, down for LLaMA)."""
    return list(dict.fromkeys(table["kind"].tolist()))


def fmt_params(n: int | float) -> str:
    """A parameter count with a unit: 1.23 B, 4.56 M, 7.89 k."""
    n = float(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _vmark(fig: go.Figure, x: float, y0: float, y1: float, *, name: str, color: str, dash: str,
           group: str | None = None, row: int | None = None, col: int | None = None) -> None:
    """A vertical marker drawn as a two-point line trace: unlike shapes and annotations, a trace
    is placed in data units on linear and log axes alike, and it gets a legend entry."""
    trace = go.Scatter(x=[x, x], y=[y0, y1], mode="lines", name=name, legendgroup=group,
                       line=dict(color=color, dash=dash, width=1.5), hovertemplate=f"{name}<extra></extra>")
    fig.add_trace(trace, row=row, col=col) if row else fig.add_trace(trace)


def _hist(eigs: np.ndarray, linear: bool, bins: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of the positive eigenvalues: log bins (core) or linear bins."""
    x = np.asarray(eigs, dtype=np.float64)
    x = x[np.isfinite(x) & (x > 0)]
    if linear:
        density, edges = np.histogram(x, bins=bins, density=True)
        return edges, density
    return log_histogram(x, bins=bins)


def esd_figure(items: list[dict], *, linear: bool = False, show_fit: bool = True, show_mp: bool = True,
               bins: int = 80) -> go.Figure:
    """ESD of one or several matrices. ``items``: dicts with name, eigs, row (table row as dict)."""
    fig = go.Figure()
    for i, it in enumerate(items):
        color = palette(i)
        row, eigs, label = it["row"], np.asarray(it["eigs"], dtype=np.float64), it["label"]
        pos = eigs[np.isfinite(eigs) & (eigs > 0)]
        if pos.size == 0:
            continue
        edges, density = _hist(pos, linear, bins)
        shown = density[density > 0]
        y0, y1 = (float(shown.min()), float(shown.max())) if shown.size else (1e-6, 1.0)
        fig.add_trace(go.Scatter(x=edges, y=np.append(density, density[-1] if len(density) else 0),
                                 mode="lines", line=dict(shape="hv", color=color, width=2),
                                 name=f"{label} ESD", legendgroup=label))
        alpha, xmin, n_tail = row.get("alpha"), row.get("xmin"), row.get("n_tail")
        if show_fit and alpha is not None and np.isfinite(alpha) and np.isfinite(xmin) and n_tail:
            lam = np.geomspace(xmin, pos.max(), 60)
            share = float(n_tail) / pos.size
            pdf = share * (alpha - 1) / xmin * (lam / xmin) ** (-alpha)
            fig.add_trace(go.Scatter(x=lam, y=pdf, mode="lines", line=dict(color=color, dash="dash", width=2),
                                     name=f"{label} power law α={alpha:.2f}", legendgroup=label))
            _vmark(fig, xmin, y0, y1, name=f"{label} xmin {xmin:.3g}", color=color, dash="dot", group=label)
        if show_mp and np.isfinite(row.get("w_var", np.nan)) and row.get("w_var", 0) > 0:
            lo, hi = mp_bulk_edges(rows=int(row["rows"]), cols=int(row["cols"]), w_var=float(row["w_var"]))
            lam = np.linspace(max(lo, 1e-12), hi, 300)[1:-1] if linear else np.geomspace(max(lo, hi * 1e-4), hi, 300)[1:-1]
            rho = mp_density(lam, rows=int(row["rows"]), cols=int(row["cols"]), w_var=float(row["w_var"]))
            fig.add_trace(go.Scatter(x=lam, y=rho, mode="lines", line=dict(color="#888888", width=1.5),
                                     name=f"{label} MP (shuffled)", legendgroup=label, opacity=0.8))
            _vmark(fig, hi, y0, y1, name=f"{label} λ+ (MP edge) {hi:.3g}", color="#888888", dash="dash", group=label)
    axis = "linear" if linear else "log"
    fig.update_layout(**LAYOUT, title="Empirical spectral density", xaxis_title="eigenvalue λ of WᵀW",
                      yaxis_title="density")
    fig.update_xaxes(type=axis)
    fig.update_yaxes(type=axis)
    return fig


def xmin_scan_figure(scans: list[tuple[str, pd.DataFrame, float]]) -> go.Figure:
    """D and alpha against the candidate xmin (as powerlaw/WeightWatcher draw them)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("KS distance D vs xmin", "alpha vs xmin"))
    for i, (label, scan, chosen) in enumerate(scans):
        color = palette(i)
        if scan.empty:
            continue
        fig.add_trace(go.Scatter(x=scan["xmin"], y=scan["D"], mode="lines", name=f"{label} D",
                                 line=dict(color=color)), row=1, col=1)
        fig.add_trace(go.Scatter(x=scan["xmin"], y=scan["alpha"], mode="lines", name=f"{label} alpha",
                                 line=dict(color=color, dash="dot")), row=1, col=2)
        if chosen is not None and np.isfinite(chosen):
            d = scan["D"][np.isfinite(scan["D"])]
            for c, (y0, y1) in ((1, (float(d.min()), float(d.max())) if d.size else (0.0, 1.0)), (2, (0.0, 12.0))):
                _vmark(fig, chosen, y0, y1, name=f"{label} chosen xmin {chosen:.3g}", color=color, dash="dash",
                       group=label, row=1, col=c)
    fig.update_layout(**{**LAYOUT, "height": 340})
    fig.update_xaxes(type="log", title_text="xmin")
    fig.update_yaxes(title_text="D", row=1, col=1)
    fig.update_yaxes(title_text="alpha", range=[0, 12], row=1, col=2)
    return fig


def heatmap_figure(pivot: pd.DataFrame, metric: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=pivot.to_numpy().T, x=pivot.index.astype(str), y=list(pivot.columns),
                               colorscale="RdYlBu_r" if metric == "alpha" else "Viridis",
                               colorbar=dict(title=metric),
                               hovertemplate="block %{x}<br>kind %{y}<br>" + metric + " %{z:.3f}<extra></extra>"))
    fig.update_layout(**{**LAYOUT, "height": 320}, title=f"{metric} by block and kind",
                      xaxis_title="block", yaxis_title="kind")
    return fig


def depth_figure(table: pd.DataFrame, metric: str, kinds: list[str]) -> go.Figure:
    fig = go.Figure()
    for i, kind in enumerate(kinds):
        t = table[table["kind"] == kind].sort_values("block")
        fig.add_trace(go.Scatter(x=t["block"], y=t[metric], mode="lines+markers", name=kind,
                                 line=dict(color=palette(i)),
                                 customdata=t["name"], hovertemplate="%{customdata}<br>" + metric
                                 + " %{y:.3f}<extra></extra>"))
    if metric == "alpha":
        fig.add_hrect(y0=2, y1=6, fillcolor="#54A24B", opacity=0.08, line_width=0,
                      annotation_text="well trained (2-6)", annotation_position="top left")
    fig.update_layout(**LAYOUT, title=f"{metric} against depth", xaxis_title="block", yaxis_title=metric)
    return fig


def distribution_figure(table: pd.DataFrame, metric: str, kinds: list[str]) -> go.Figure:
    fig = go.Figure()
    for i, kind in enumerate(kinds):
        fig.add_trace(go.Histogram(x=table.loc[table["kind"] == kind, metric], name=kind, opacity=0.75,
                                   marker_color=palette(i), nbinsx=30))
    fig.update_layout(**LAYOUT, barmode="stack", title=f"distribution of {metric}", xaxis_title=metric,
                      yaxis_title="matrices")
    return fig


def ratios_figure(ratios: pd.DataFrame, sparsity: float, kinds: list[str], title: str) -> go.Figure:
    """Per-matrix ratios in model order, coloured by kind, with the target line."""
    fig = go.Figure()
    r = ratios.reset_index(drop=True)
    for i, kind in enumerate(kinds):
        sel = r[r["kind"] == kind]
        fig.add_trace(go.Bar(x=sel.index, y=sel["ratio"], name=kind, marker_color=palette(i),
                             customdata=sel["name"], hovertemplate="%{customdata}<br>ratio %{y:.3f}<extra></extra>"))
    fig.add_hline(y=sparsity, line=dict(color="#1F2430", dash="dash"), annotation_text=f"target S={sparsity:.2f}")
    fig.update_layout(**{**LAYOUT, "height": 340}, title=title, xaxis_title="matrix (model order)",
                      yaxis_title="sparsity ratio", bargap=0.05, yaxis_range=[0, 1])
    return fig


def block_ratios_figure(series: dict[str, pd.Series], sparsity: float) -> go.Figure:
    """Parameter-weighted sparsity of each block, one line per allocation."""
    fig = go.Figure()
    for i, (label, s) in enumerate(series.items()):
        fig.add_trace(go.Scatter(x=s.index, y=s.values, mode="lines+markers", name=label,
                                 line=dict(color=palette(i), width=2)))
    fig.add_hline(y=sparsity, line=dict(color="#1F2430", dash="dash"), annotation_text="mean")
    fig.update_layout(**{**LAYOUT, "height": 340}, title="sparsity per block (parameter-weighted)",
                      xaxis_title="block", yaxis_title="sparsity")
    return fig


def kind_box_figure(table: pd.DataFrame, metric: str, kinds: list[str]) -> go.Figure:
    """One box of ``metric`` per kind (the Home page's overview)."""
    fig = go.Figure()
    for i, kind in enumerate(kinds):
        t = table[table["kind"] == kind]
        fig.add_trace(go.Box(y=t[metric], name=kind, marker_color=palette(i),
                             boxpoints="all", jitter=0.4, pointpos=0, customdata=t["name"],
                             hovertemplate="%{customdata}<br>" + metric + " %{y:.3f}<extra></extra>"))
    if metric == "alpha":
        fig.add_hrect(y0=2, y1=6, fillcolor="#54A24B", opacity=0.08, line_width=0)
    fig.update_layout(**{**LAYOUT, "height": 320}, title=f"{metric} of every matrix, by kind", showlegend=False,
                      yaxis_title=metric)
    return fig


def perplexity_figure(pruned: pd.DataFrame, dense: float | None) -> go.Figure:
    """Perplexity against sparsity, one line per "method · allocation" setting (the last run of
    each sparsity), with the dense model's perplexity as a dashed line."""
    fig = go.Figure()
    for i, (setting, t) in enumerate(pruned.sort_values("sparsity").groupby("setting", sort=True)):
        t = t.groupby("sparsity", as_index=False)["perplexity"].last()
        fig.add_trace(go.Scatter(x=t["sparsity"], y=t["perplexity"], mode="lines+markers", name=setting,
                                 line=dict(color=palette(i), width=2)))
    if dense is not None:
        fig.add_hline(y=float(np.log10(dense)), line=dict(dash="dash", color="#1F2430"),  # log axis: shapes take log10
                      annotation_text=f"dense {dense:.2f}")
    fig.update_layout(**LAYOUT, title="perplexity against sparsity", xaxis_title="sparsity", yaxis_title="perplexity")
    fig.update_yaxes(type="log")
    fig.update_xaxes(range=[-0.02, 1.0])
    return fig
