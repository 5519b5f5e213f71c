"""Figures of the Learn HT-SR page that the other pages do not share: the phase examples with
their MP edge, and the "watch a network learn" lesson (ESD at checkpoints, alpha and test
accuracy over the steps). Drawing only: every number comes from ``core``. Eigenvalues are those
of ``WᵀW`` (no 1/N), as everywhere in the app, and every axis says so."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.lesson_training import TrainingResult
from core.metrics import ALPHA_HIGH, ALPHA_LOW, log_histogram
from dashboard.figures import LAYOUT, log_axis, palette

EIG_AXIS = "eigenvalue λ of WᵀW"
EDGE_COLOR = "#1F2430"


def _density(eigs: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-binned density at the geometric centres of the non-empty bins (no empty bins drawn)."""
    edges, density = log_histogram(eigs, bins=bins)
    if not edges.size:
        return edges, density
    centres = np.sqrt(edges[:-1] * edges[1:])
    keep = density > 0
    return centres[keep], density[keep]


def _edge(fig: go.Figure, x: float, y0: float, y1: float, *, name: str, legend: bool,
          row: int | None = None, col: int | None = None) -> None:
    """The MP edge λ+ as a vertical two-point trace (placed in data units on log axes)."""
    trace = go.Scatter(x=[x, x], y=[y0, y1], mode="lines", name=name, showlegend=legend, legendgroup="edge",
                       line=dict(color=EDGE_COLOR, dash="longdash", width=1.5), hovertemplate=f"{name}<extra></extra>")
    fig.add_trace(trace, row=row, col=col) if row else fig.add_trace(trace)


def phases_edge_figure(examples: list[tuple[str, np.ndarray, float]]) -> go.Figure:
    """One small log-log ESD per ``(title, eigenvalues of WᵀW, λ+)``, three per row, with the
    Marchenko-Pastur edge λ+ of a random matrix of the same shape and entry variance."""
    rows = -(-len(examples) // 3)
    fig = make_subplots(rows=rows, cols=3, subplot_titles=[t for t, _, _ in examples],
                        horizontal_spacing=0.07, vertical_spacing=0.2)
    for i, (title, eigs, lam_plus) in enumerate(examples):
        r, c = i // 3 + 1, i % 3 + 1
        x, density = _density(eigs, bins=50)
        fig.add_trace(go.Scatter(x=x, y=density, mode="lines", name=title, showlegend=False,
                                 line=dict(color=palette(i), width=2),
                                 hovertemplate="λ %{x:.3g}<br>density %{y:.3g}<extra>" + title + "</extra>"),
                      row=r, col=c)
        _edge(fig, lam_plus, float(density.min()), float(density.max()), name="λ+ (MP edge)", legend=i == 0,
              row=r, col=c)
        log_axis(fig, [x, [lam_plus]], axis="x", row=r, col=c)
        log_axis(fig, [density], axis="y", row=r, col=c)
    fig.update_layout(**{**LAYOUT, "height": 290 * rows, "margin": dict(l=10, r=10, t=40, b=10)})
    fig.update_xaxes(title_text=EIG_AXIS, title_font_size=11, row=rows)
    return fig


def checkpoint_picks(result: TrainingResult, count: int = 5) -> list[int]:
    """Indices of about ``count`` checkpoints spread over the run (first and last included)."""
    n = len(result.checkpoints)
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, min(count, n))})


#: the training ESD is drawn from λ+ / ZOOM up: a square layer's MP bulk reaches down to 0 (six
#: decades below λ+ on a log axis), which would squeeze the tail that training grows into a sliver
ZOOM = 100.0


def training_esd_figure(result: TrainingResult, picks: list[int] | None = None) -> go.Figure:
    """The measured layer's ESD at several checkpoints, overlaid on log-log axes from λ+/``ZOOM``
    up, with the MP edge λ+ of the initial matrix: the bulk of step 0 ends there; training pushes
    eigenvalues past it."""
    picks = checkpoint_picks(result) if picks is None else picks
    fig = go.Figure()
    xs, ys = [[result.mp_edge0]], []
    low = result.mp_edge0 / ZOOM
    for j, i in enumerate(picks):
        cp = result.checkpoints[i]
        x, density = _density(cp.eigs, bins=120)
        x, density = x[x >= low], density[x >= low]
        alpha = f"α={cp.alpha:.2f}" if cp.fit.ok else "no fit"
        fig.add_trace(go.Scatter(x=x, y=density, mode="lines", name=f"step {cp.step} ({alpha})",
                                 line=dict(color=_ramp(j, len(picks)), width=2),
                                 hovertemplate="λ %{x:.3g}<br>density %{y:.3g}<extra>step " + str(cp.step) + "</extra>"))
        xs.append(x), ys.append(density)
    y = np.concatenate(ys) if ys else np.array([1e-3, 1.0])
    _edge(fig, result.mp_edge0, float(y.min()), float(y.max()), legend=True,
          name=f"λ+ of the initial matrix {result.mp_edge0:.3g}")
    fig.update_layout(**LAYOUT, title=f"ESD of the {result.rows} x {result.cols} {result.layer} during training "
                      f"(λ ≥ λ+/{ZOOM:g})", xaxis_title=EIG_AXIS, yaxis_title="density")
    log_axis(fig, xs, axis="x")
    log_axis(fig, ys, axis="y")
    return fig


def _ramp(j: int, n: int) -> str:
    """From light blue (early) to dark blue (late): the order of checkpoints reads at a glance."""
    t = j / max(n - 1, 1)
    lo, hi = np.array([158, 202, 225]), np.array([8, 48, 107])
    r, g, b = (lo + t * (hi - lo)).astype(int)
    return f"rgb({r},{g},{b})"


def run_label(result: TrainingResult) -> str:
    s = result.setup
    return f"lr {s.lr:g} · batch {s.batch} · noise {s.label_noise:.0%} · {s.steps} steps"


def training_curves_figure(results: list[TrainingResult]) -> go.Figure:
    """alpha (left) and test accuracy (right) against the step, one colour per run (the first
    one, the newest, drawn thicker); the well-trained alpha band 2-6 shaded."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("alpha of the layer", "test accuracy"),
                        horizontal_spacing=0.1)
    for i, result in enumerate(results):
        label, width = run_label(result), 3 if i == 0 else 1.5
        common = dict(mode="lines+markers", legendgroup=label, line=dict(color=palette(i), width=width),
                      marker=dict(size=4))
        fig.add_trace(go.Scatter(x=result.steps, y=result.alphas, name=label, **common,
                                 hovertemplate="step %{x}<br>alpha %{y:.2f}<extra>" + label + "</extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(x=result.steps, y=result.accuracies, name=label, showlegend=False, **common,
                                 hovertemplate="step %{x}<br>accuracy %{y:.1%}<extra>" + label + "</extra>"),
                      row=1, col=2)
    fig.add_hrect(y0=ALPHA_LOW, y1=ALPHA_HIGH, fillcolor="#54A24B", opacity=0.08, line_width=0, layer="below",
                  row=1, col=1)
    fig.update_layout(**{**LAYOUT, "height": 380})
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text="alpha (power-law exponent)", row=1, col=1)
    fig.update_yaxes(title_text="test accuracy", tickformat=".0%", rangemode="tozero", row=1, col=2)
    return fig
