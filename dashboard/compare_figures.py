"""Plotly figures of a comparison (``core.compare``) and its self-contained HTML report.
Drawing only: every number comes from ``core``."""
from __future__ import annotations

import html
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.analysis import ZERO_RTOL
from core.checks import html_file
from core.compare import Comparison, delta_pivot, series_table, write_html
from dashboard.figures import LAYOUT, clickable_cells, esd_figure, kind_order, palette


def depth_overlay_figure(long: pd.DataFrame, metric: str, sources: list[str]) -> go.Figure:
    """``metric`` against block, one panel per kind, one line per source (customdata: key, source)."""
    kinds = kind_order(long)
    cols = min(len(kinds), 4)
    rows = math.ceil(len(kinds) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=kinds, shared_xaxes=True,
                        vertical_spacing=0.12 if rows > 1 else 0.05, horizontal_spacing=0.05)
    for s_i, source in enumerate(sources):
        for k_i, kind in enumerate(kinds):
            t = long[(long["source"] == source) & (long["kind"] == kind)].sort_values("block")
            fig.add_trace(go.Scatter(x=t["block"], y=t[metric], mode="lines+markers", name=source,
                                     legendgroup=source, showlegend=k_i == 0, line=dict(color=palette(s_i)),
                                     marker=dict(size=5), customdata=np.stack([t["key"], t["source"]], axis=-1),
                                     hovertemplate="%{customdata[1]}<br>%{customdata[0]}<br>" + metric
                                     + " %{y:.3f}<extra></extra>"),
                          row=k_i // cols + 1, col=k_i % cols + 1)
    fig.update_layout(**{**LAYOUT, "height": 260 * rows + 80}, title=f"{metric} against depth, per kind")
    fig.update_xaxes(title_text="block", row=rows)
    return fig


def delta_heatmap_figure(deltas: pd.DataFrame, source: str, metric: str, reference: str) -> go.Figure:
    """Change of ``metric`` (source minus reference) per block and kind, diverging around 0; a
    click on a cell selects its marker, whose first customdata is the matrix key (``clickable_cells``)."""
    pivot = delta_pivot(deltas, source, metric)
    z = pivot.to_numpy(float).T
    top = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    keys = deltas[(deltas["source"] == source)].pivot_table(index="block", columns="kind", values="key",
                                                           aggfunc="first").reindex(index=pivot.index,
                                                                                    columns=pivot.columns)
    x, y = [str(b) for b in pivot.index], [str(k) for k in pivot.columns]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, zmid=0, zmin=-top, zmax=top, hoverinfo="skip",
                               colorscale="RdBu_r", colorbar=dict(title=f"Δ {metric}")))
    clickable_cells(fig, x, y, [keys.to_numpy(object).T, z],
                    "%{customdata[0]}<br>Δ " + metric + " %{customdata[1]:+.3f}<br>click: open below<extra></extra>")
    fig.update_layout(**{**LAYOUT, "height": 320}, title=f"Δ {metric}: {source} minus {reference}",
                      xaxis_title="block", yaxis_title="kind")
    return fig


def esd_overlay_figure(items: list[dict], *, show_fit: bool = True, show_mp: bool = False) -> go.Figure:
    """The same matrix's ESD and fit in several sources. ``items``: label, eigs, row. Eigenvalues
    at or below ``ZERO_RTOL * max`` (``n_zero`` of the table, out of the fit) are not drawn."""
    drawn = []
    for it in items:
        eigs = np.asarray(it["eigs"], dtype=np.float64)
        top = float(np.nanmax(eigs)) if eigs.size and np.isfinite(eigs).any() else 0.0
        drawn.append({**it, "eigs": eigs[eigs > ZERO_RTOL * top]})
    fig = esd_figure(drawn, show_fit=show_fit, show_mp=show_mp)
    fig.update_layout(title="ESD and power-law fit across sources")
    return fig


def distribution_figure(long: pd.DataFrame, metric: str, sources: list[str]) -> go.Figure:
    """Boxes of ``metric`` per kind, one colour per source."""
    fig = go.Figure()
    for i, source in enumerate(sources):
        t = long[long["source"] == source]
        fig.add_trace(go.Box(x=t["kind"], y=t[metric], name=source, marker_color=palette(i), boxpoints="outliers",
                             customdata=np.stack([t["key"], t["source"]], axis=-1),
                             hovertemplate="%{customdata[0]}<br>" + metric + " %{y:.3f}<extra></extra>"))
    if metric == "alpha":
        fig.add_hrect(y0=2, y1=6, fillcolor="#54A24B", opacity=0.08, line_width=0)
    fig.update_layout(**LAYOUT, boxmode="group", title=f"distribution of {metric} per source and kind",
                      xaxis_title="kind", yaxis_title=metric)
    return fig


def series_figure(long: pd.DataFrame, metric: str) -> go.Figure:
    """Mean ``metric`` per kind against training step (the sources with a step)."""
    t = series_table(long, metric)
    fig = go.Figure()
    for i, kind in enumerate(kind_order(t)):
        s = t[t["kind"] == kind]
        fig.add_trace(go.Scatter(x=s["step"], y=s[metric], mode="lines+markers", name=kind,
                                 line=dict(color=palette(i))))
    fig.update_layout(**LAYOUT, title=f"mean {metric} per kind against training step", xaxis_title="step",
                      yaxis_title=metric)
    return fig


def comparison_figures(result: Comparison, metric: str) -> list[tuple[str, go.Figure]]:
    """The report's figures: depth overlay, one delta heatmap per other source, distributions,
    and the training series when the sources have steps."""
    figs = [("Against depth", depth_overlay_figure(result.long, metric, result.labels))]
    for label in result.labels[1:]:
        figs.append((f"Δ {label}", delta_heatmap_figure(result.deltas, label, metric, result.reference.label)))
    figs.append(("Distributions", distribution_figure(result.long, metric, result.labels)))
    if result.long["step"].notna().sum() and result.long["step"].nunique() > 1:
        figs.append(("Training series", series_figure(result.long, metric)))
    return figs


def report_html(result: Comparison, metric: str = "alpha") -> str:
    """A self-contained HTML page (plotly.js inline: works offline) with the figures, the per-kind
    summary and the missing matrices."""
    parts = [f"<h1>Spectrascope comparison</h1><p>{html.escape(', '.join(result.labels))} · reference "
             f"<b>{html.escape(result.reference.label)}</b> · {time.strftime('%Y-%m-%d %H:%M')}</p>",
             "<h2>Mean per kind</h2>", result.by_kind(metric).to_html(index=False, float_format="%.4f")]
    for i, (title, fig) in enumerate(comparison_figures(result, metric)):
        parts += [f"<h2>{html.escape(title)}</h2>",
                  fig.to_html(full_html=False, include_plotlyjs=True if i == 0 else False)]
    parts += ["<h2>Matrices not in every source</h2>",
              result.missing.to_html(index=False) if not result.missing.empty else "<p>none</p>"]
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Spectrascope comparison</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>" + "".join(parts) + "</body></html>")


def write_report(result: Comparison, path: str | os.PathLike, metric: str = "alpha", *,
                 overwrite: bool = False) -> Path:
    """The HTML report, written atomically (``core.compare.write_html``)."""
    html_file(path, overwrite=overwrite)          # before building the report
    return write_html(path, report_html(result, metric), overwrite=overwrite)
