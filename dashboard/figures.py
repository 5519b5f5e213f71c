"""Plotly figures and their readable log axes: pure builders (no Streamlit), shared by the pages
and by ``spectrascope compare --html``. Drawing only: every number comes from ``core``; how the
pages show and export a figure is ``dashboard.exports``."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.metrics import ALPHA_HIGH, ALPHA_LOW, log_histogram, mp_bulk_edges, mp_density

COLORS = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D"]
#: the font of every figure: fonts every browser has, so that a PNG/SVG export (drawn without the
#: page's web fonts) measures and draws the legend with the same font (Streamlit's "Source Sans"
#: is a web font: the export fell back to a wider font and cut legend entries)
FONT = dict(family="Arial, 'Liberation Sans', Helvetica, sans-serif")
#: legends go below the plot (horizontal, wrapping) so that narrow screens keep the plot's width;
#: anchored to the figure's bottom edge ("container"), where Plotly reserves room for them, so that
#: they never overlap the x-axis title however tall the plot area is
LAYOUT = dict(template="plotly_white", margin=dict(l=10, r=10, t=50, b=10), height=420, font=FONT,
              legend=dict(orientation="h", yref="container", yanchor="bottom", y=0, xanchor="left", x=0))
#: the x-axis title of a figure whose x is an eigenvalue: one convention in the whole app
EIG_AXIS = "eigenvalue λ of WᵀW"


#: what each metric of the analysis table is, in the eigenvalues λ of WᵀW (no 1/N)
_METRIC_DEFS = {"alpha": "ESD tail exponent", "alpha_hat": "alpha·log10 λmax", "log_norm": "log10 Σλ",
                "log_spectral_norm": "log10 λmax", "log_alpha_norm": "log10 Σλ^alpha", "stable_rank": "Σλ / λmax",
                "entropy": "entropy of λ/Σλ", "mp_softrank": "λ+ / λmax", "num_spikes": "eigenvalues above λ+",
                "D": "KS distance of the fit", "sigma": "standard error of alpha", "xmin": "start of the fitted tail",
                "rank": "positive eigenvalues", "lambda_plus": "Marchenko-Pastur edge λ+"}


def metric_title(metric: str) -> str:
    """An axis title naming ``metric`` and, in a smaller second line, what it is and the eigenvalue
    convention: ``log_spectral_norm`` over ``log10 λmax, λ: eigenvalue of WᵀW``."""
    return f"{metric}<br><sub>{metric_help(metric)}</sub>"


def metric_help(metric: str) -> str:
    """What ``metric`` is, in the eigenvalue convention: ``log10 λmax, λ: eigenvalue of WᵀW``."""
    what = _METRIC_DEFS.get(metric)
    return f"{what + ', ' if what else ''}λ: eigenvalue of WᵀW"


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


#: the longest title line: Plotly never wraps a title, and a longer one is cut in a narrow window
TITLE_CHARS = 56


def wrap_title(fig: go.Figure, chars: int = TITLE_CHARS) -> go.Figure:
    """Break ``fig``'s title into lines of at most ``chars`` characters at its spaces (a line
    starts at a word, never with a separator such as "·") and make room for the extra lines
    above the plot. Every chart the pages show goes through here (``exports.show``)."""
    title = fig.layout.title
    text = title.text if title is not None else None
    if not text or len(text) <= chars or "<br>" in text:
        return fig
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > chars and word not in ("·", "-", "–", "|"):
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    lines = [ln.removeprefix("· ") for ln in lines]
    top = fig.layout.margin.t if fig.layout.margin.t is not None else LAYOUT["margin"]["t"]
    fig.update_layout(title_text="<br>".join(lines), margin_t=top + 20 * (len(lines) - 1))
    return fig


def _mark(fig: go.Figure, x: list[float], y: list[float], *, name: str, color: str, dash: str,
          group: str | None = None, legend: bool = True, row: int | None = None, col: int | None = None) -> None:
    """A marker line drawn as a two-point trace: unlike shapes and annotations, a trace is placed
    in data units on linear and log axes alike, and it gets a legend entry (when ``legend``)."""
    trace = go.Scatter(x=x, y=y, mode="lines", name=name, legendgroup=group, showlegend=legend,
                       line=dict(color=color, dash=dash, width=1.5), hovertemplate=f"{name}<extra></extra>")
    fig.add_trace(trace, row=row, col=col) if row else fig.add_trace(trace)


def _vmark(fig: go.Figure, x: float, y0: float, y1: float, **kwargs) -> None:
    """A vertical marker at ``x`` from ``y0`` to ``y1`` (see :func:`_mark`)."""
    _mark(fig, [x, x], [y0, y1], **kwargs)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _power_label(mantissa: float, exponent: int) -> str:
    """``2×10⁻⁵``, ``10⁻⁴``; plain numbers from 0.1 to 1000 (``0.5``, ``20``)."""
    if -1 <= exponent <= 3:
        return f"{mantissa * 10.0 ** exponent:.10g}"
    power = "10" + str(exponent).translate(_SUPERSCRIPT)
    return power if mantissa == 1 else f"{mantissa:g}×{power}"


#: mantissas per decade, from sparse to dense, for log axes spanning under about two decades
_MANTISSAS = ([1], [1, 3], [1, 2, 5], [1, 2, 3, 5, 7], [1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9],
              [1, 1.2, 1.4, 1.6, 1.8, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9])


def log_ticks(lo: float, hi: float, *, max_ticks: int = 7) -> dict:
    """Tick settings of a log axis spanning ``lo``..``hi`` (positive): powers of ten, never SI
    prefixes. Over several decades one tick every ``dtick`` decades; below about two decades
    explicit ticks at 1-2-5 (or denser) mantissas labelled ``2×10⁻⁵``, so that even a range
    inside one decade has at least three readable ticks and none crowd."""
    lo, hi = (float(lo), float(hi)) if lo <= hi else (float(hi), float(lo))
    if not (np.isfinite(lo) and np.isfinite(hi) and lo > 0):
        return dict(type="log", exponentformat="power")
    decades = np.log10(hi / lo) if hi > lo else 0.0
    if decades >= 2.5:
        return dict(type="log", exponentformat="power", showexponent="all", tick0=0,
                    dtick=max(1, int(np.ceil(decades / max_ticks))), minor=dict(showgrid=False))
    if decades == 0:
        lo, hi = lo / 1.5, hi * 1.5
    e0, e1 = int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi)))
    inside = lambda v: lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)  # noqa: E731
    lists = [[(m * 10.0 ** e, e, m) for e in range(e0, e1 + 1) for m in ms if inside(m * 10.0 ** e)]
             for ms in _MANTISSAS]
    fits = [t for t in lists if 4 <= len(t) <= max_ticks] or [t for t in lists if 3 <= len(t) <= max_ticks]
    if fits:
        ticks = fits[0]
    else:                                         # a narrow range: nice linear steps (1, 2 or 5 x 10^k)
        raw = (hi - lo) / 4
        k = 10.0 ** np.floor(np.log10(raw))
        step = next(s * k for s in (1, 2, 5, 10) if s * k >= raw)
        values = np.arange(np.ceil(lo / step) * step, hi * (1 + 1e-9), step)
        exps = [int(np.floor(np.log10(v) + 1e-9)) for v in values]
        ticks = [(v, e, float(f"{v / 10.0 ** e:.4g}")) for v, e in zip(values, exps)]
    return dict(type="log", tickmode="array", tickvals=[t[0] for t in ticks],
                ticktext=[_power_label(m, e) for _, e, m in ticks])


def log_axis(fig: go.Figure, values, *, axis: str = "x", row: int | None = None, col: int | None = None) -> None:
    """Make ``axis`` ("x" or "y") of ``fig`` (or of one subplot) a log axis with readable ticks
    for the positive finite ``values`` it shows (see :func:`log_ticks`). Every log axis of the
    dashboard goes through here."""
    v = np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in values]) if len(values) else np.array([])
    v = v[np.isfinite(v) & (v > 0)]
    ticks = log_ticks(float(v.min()), float(v.max())) if v.size else dict(type="log", exponentformat="power")
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    update(**ticks, row=row, col=col)


def log_colorbar(values, title: str) -> dict:
    """The colour bar of colours drawn from ``log10(values)`` (a log colour scale), with the
    ticks a log axis over ``values`` would have (see :func:`log_ticks`)."""
    v = np.ravel(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return dict(title=dict(text=title))
    ticks = log_ticks(float(v.min()), float(v.max()))
    if "tickvals" in ticks:
        vals, text = ticks["tickvals"], ticks["ticktext"]
    else:
        exps = range(int(np.floor(np.log10(v.min()))), int(np.ceil(np.log10(v.max()))) + 1, ticks["dtick"])
        vals, text = [10.0 ** e for e in exps], [_power_label(1, e) for e in exps]
    return dict(title=dict(text=title), tickvals=np.log10(vals).tolist(), ticktext=list(text))


def _hist(eigs: np.ndarray, linear: bool, bins: int = 80, upper: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of the positive eigenvalues: log bins (core) or linear bins over ``0..upper``
    (default: the largest), the density ``counts / (n * width)`` of all ``n`` positive values
    (values above ``upper`` are counted in ``n`` but fall in no bin)."""
    x = np.asarray(eigs, dtype=np.float64)
    x = x[np.isfinite(x) & (x > 0)]
    if linear:
        top = float(upper if upper is not None else x.max()) if x.size else 1.0
        counts, edges = np.histogram(x, bins=np.linspace(0.0, top, bins + 1))
        return edges, counts / (max(x.size, 1) * np.diff(edges))
    return log_histogram(x, bins=bins)


#: the Spectra page's linear scale shows the eigenvalues up to this quantile: heavy tails reach
#: 10-1000 times the median, so an axis to the largest would squeeze the bulk into its first percent
LINEAR_QUANTILE = 0.9


def linear_upper(eigs_list, quantile: float = LINEAR_QUANTILE) -> float | None:
    """The right end of a linear ESD axis over the bulk: the largest ``quantile`` of the
    positive eigenvalues of each matrix (None: none positive)."""
    tops = []
    for eigs in eigs_list:
        x = np.asarray(eigs, dtype=np.float64)
        x = x[np.isfinite(x) & (x > 0)]
        if x.size:
            tops.append(float(np.quantile(x, quantile)))
    return max(tops) if tops else None


def density_steps(edges: np.ndarray, density: np.ndarray, *, keep_empty: bool = False) -> tuple[list, list]:
    """x and y of a step line (``shape="hv"``) over the histogram bins, without the empty bins
    (unless ``keep_empty``): on a log density axis an empty bin has no place (log 0), and a line
    down to the axis's bottom draws a comb. Runs of non-empty bins are separated by a gap (None)."""
    xs: list = []
    ys: list = []
    run: list[int] = []
    nonzero = [(i, d) for i, d in enumerate(density) if keep_empty or d > 0]
    for k, (i, d) in enumerate(nonzero):
        run.append(i)
        last = k + 1 == len(nonzero) or nonzero[k + 1][0] != i + 1
        if last:
            xs += [float(edges[j]) for j in run] + [float(edges[run[-1] + 1])]
            ys += [float(density[j]) for j in run] + [float(density[run[-1]])]
            if k + 1 < len(nonzero):
                xs.append(None), ys.append(None)
            run = []
    return xs, ys


def _axes(fig: go.Figure, xs: list, ys: list, *, linear: bool, row: int | None = None, col: int | None = None) -> None:
    """Linear axes, or log axes with readable ticks for the plotted ``xs`` and ``ys``."""
    if linear:
        fig.update_xaxes(type="linear", row=row, col=col)
        fig.update_yaxes(type="linear", row=row, col=col)
    else:
        log_axis(fig, xs, axis="x", row=row, col=col)
        log_axis(fig, ys, axis="y", row=row, col=col)


def esd_figure(items: list[dict], *, linear: bool = False, show_fit: bool = True, show_mp: bool = True,
               bins: int = 80, unit: float = 1.0, unit_label: str = "WᵀW", mp_name: str = "MP (shuffled)",
               full_legend: bool | None = None, title: str = "Empirical spectral density",
               clip: float | None = None) -> go.Figure:
    """ESD of one or several matrices. ``items``: dicts with label, eigs, row (table row as dict).

    Each matrix has one colour for its ESD and every overlay (power-law fit, xmin, MP density,
    λ+). The legend has one entry per matrix (a click hides all its lines) unless ``full_legend``
    (default: only one matrix), which names every line. ``unit``: eigenvalues are drawn divided
    by it (``unit=N`` draws X = WᵀW/N, with ``unit_label`` naming it), densities rescaled to match.
    ``clip`` (linear only): bins and axis end at that quantile of the eigenvalues (the bulk; see
    :func:`linear_upper`), the x-axis title says how many lie beyond. Log bins without an
    eigenvalue are left out (:func:`density_steps`).
    """
    fig = go.Figure()
    full = len(items) == 1 if full_legend is None else full_legend
    xs, ys = [], []
    upper = (linear_upper([np.asarray(it["eigs"], dtype=np.float64) / unit for it in items], clip)
             if linear and clip else None)
    for i, it in enumerate(items):
        color = palette(i)
        row, label = it["row"], it["label"]
        group = None if full else label        # a horizontal legend stacks a group's entries
        eigs = np.asarray(it["eigs"], dtype=np.float64)
        pos = eigs[np.isfinite(eigs) & (eigs > 0)] / unit
        if pos.size == 0:
            continue
        edges, density = _hist(pos, linear, bins, upper)
        shown = density[density > 0]
        y0, y1 = (float(shown.min()), float(shown.max())) if shown.size else (1e-6, 1.0)
        if linear:
            y0 = 0.0
        alpha, xmin, n_tail = row.get("alpha"), row.get("xmin"), row.get("n_tail")
        fitted = alpha is not None and np.isfinite(alpha) and np.isfinite(xmin) and n_tail
        entry = label if full or not fitted else f"{label} (α={alpha:.2f})"
        sx, sy = density_steps(edges, density, keep_empty=linear)
        fig.add_trace(go.Scatter(x=sx, y=sy, mode="lines", line=dict(shape="hv", color=color, width=2),
                                 connectgaps=False, name=f"{entry} ESD" if full else entry, legendgroup=group))
        xs.append(edges), ys.append(shown)
        if show_fit and fitted:
            x0 = xmin / unit
            top = pos.max() if upper is None else min(pos.max(), upper)
            lam = np.geomspace(x0, max(top, x0), 60)
            share = float(n_tail) / pos.size
            pdf = share * (alpha - 1) / x0 * (lam / x0) ** (-alpha)
            fig.add_trace(go.Scatter(x=lam, y=pdf, mode="lines", line=dict(color=color, dash="dash", width=2),
                                     name=f"{label} power law α={alpha:.2f}", legendgroup=group, showlegend=full))
            _vmark(fig, x0, y0, y1, name=f"{label} xmin {x0:.3g}", color=color, dash="dot", group=group,
                   legend=full)
            ys.append(pdf[pdf >= y0])
        if show_mp and np.isfinite(row.get("w_var", np.nan)) and row.get("w_var", 0) > 0:
            shape = dict(rows=int(row["rows"]), cols=int(row["cols"]), w_var=float(row["w_var"]))
            lo, hi = mp_bulk_edges(**shape)
            lam = np.linspace(max(lo, 1e-12), hi, 300)[1:-1] if linear else np.geomspace(max(lo, hi * 1e-4), hi, 300)[1:-1]
            rho = mp_density(lam, **shape) * unit
            fig.add_trace(go.Scatter(x=lam / unit, y=rho, mode="lines", line=dict(color=color, dash="dashdot", width=1.5),
                                     name=f"{label} {mp_name}", legendgroup=group, showlegend=full, opacity=0.8))
            _vmark(fig, hi / unit, y0, y1, name=f"{label} λ+ (MP edge) {hi / unit:.3g}", color=color,
                   dash="longdash", group=group, legend=full)
            xs.append([hi / unit])
    x_title = f"eigenvalue λ of {unit_label}"
    if upper is not None:
        beyond = sum(int(np.sum(np.asarray(it["eigs"], dtype=np.float64) / unit > upper)) for it in items)
        x_title += (f" (linear: up to the {clip:.0%} quantile, {upper:.4g}; "
                    f"{beyond} larger eigenvalue{'s' * (beyond != 1)} beyond the axis)")
    fig.update_layout(**LAYOUT, title=title, xaxis_title=x_title, yaxis_title="density")
    _axes(fig, xs, ys, linear=linear)
    if upper is not None:
        fig.update_xaxes(range=[0.0, upper])
    return fig


def xmin_scan_figure(scans: list[tuple[str, pd.DataFrame, float]]) -> go.Figure:
    """D and alpha against the candidate xmin (as powerlaw/WeightWatcher draw them); one colour
    and one legend entry per matrix."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("KS distance D vs xmin", "alpha vs xmin"))
    xs = []
    for i, (label, scan, chosen) in enumerate(scans):
        color = palette(i)
        if scan.empty:
            continue
        xs.append(scan["xmin"])
        fig.add_trace(go.Scatter(x=scan["xmin"], y=scan["D"], mode="lines", name=f"{label} D", legendgroup=label,
                                 line=dict(color=color)), row=1, col=1)
        fig.add_trace(go.Scatter(x=scan["xmin"], y=scan["alpha"], mode="lines", name=f"{label} alpha",
                                 legendgroup=label, line=dict(color=color, dash="dot")), row=1, col=2)
        if chosen is not None and np.isfinite(chosen):
            d = scan["D"][np.isfinite(scan["D"])]
            for c, (y0, y1) in ((1, (float(d.min()), float(d.max())) if d.size else (0.0, 1.0)), (2, (0.0, 12.0))):
                _vmark(fig, chosen, y0, y1, name=f"{label} chosen xmin {chosen:.3g}", color=color, dash="dash",
                       group=label, legend=c == 1, row=1, col=c)
    fig.update_layout(**{**LAYOUT, "height": 340})
    for c in (1, 2):
        log_axis(fig, xs, axis="x", row=1, col=c)
    fig.update_xaxes(title_text=f"xmin ({EIG_AXIS})")
    fig.update_yaxes(title_text="D", row=1, col=1)
    fig.update_yaxes(title_text="alpha", range=[0, 12], row=1, col=2)
    return fig


#: alpha colour scale of the heatmap, clipped to ALPHA_CLIP: oranges below 2 (very heavy tailed),
#: blues from light to dark across the well-trained band 2-6, greys above 6 (random-like)
ALPHA_CLIP = (1.5, 8.0)


def _alpha_scale() -> list:
    lo, hi = ALPHA_CLIP
    at = lambda a: (a - lo) / (hi - lo)  # noqa: E731
    return [[0.0, "#B35806"], [at(ALPHA_LOW), "#F1A340"], [at(ALPHA_LOW), "#D1E5F0"], [at(4.0), "#6BAED6"],
            [at(ALPHA_HIGH), "#08306B"], [at(ALPHA_HIGH), "#D9D9D9"], [1.0, "#636363"]]


def heatmap_figure(pivot: pd.DataFrame, metric: str) -> go.Figure:
    """``metric`` by block (x) and kind (y): a heatmap for the colours, with a transparent square
    marker at every cell on top (Streamlit reports clicks on scatter points, not on heatmap
    cells; a click selects that marker). For alpha the colours are clipped to ``ALPHA_CLIP``
    around the well-trained band 2-6."""
    z = pivot.to_numpy(dtype=np.float64).T                   # kinds x blocks
    x, y = [str(b) for b in pivot.index], [str(k) for k in pivot.columns]
    if metric == "alpha":
        color = dict(colorscale=_alpha_scale(), zmin=ALPHA_CLIP[0], zmax=ALPHA_CLIP[1],
                     colorbar=dict(title=dict(text="alpha<br><sub>2-6: well trained</sub>"),
                                   tickvals=[1.5, 2, 4, 6, 8], ticktext=["≤1.5", "2", "4", "6", "≥8"]))
    else:
        color = dict(colorscale="Viridis", colorbar=dict(title=dict(text=f"{metric}<br><sub>λ of WᵀW</sub>")))
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, hoverinfo="skip", xgap=1, ygap=1, **color))
    clickable_cells(fig, x, y, [z], "block %{customdata[1]} · %{customdata[2]}<br>" + metric
                    + " %{customdata[0]:.4g}<br>click: open in Spectra<extra></extra>")
    fig.update_layout(**{**LAYOUT, "height": 320}, title=f"{metric} by block and kind",
                      xaxis_title="block", yaxis_title="kind")
    fig.update_yaxes(autorange="reversed")
    return fig


def clickable_cells(fig: go.Figure, x: list[str], y: list[str], data: list[np.ndarray], hovertemplate: str) -> None:
    """A transparent square marker on every cell of ``fig``'s heatmap (columns ``x``, rows ``y``):
    Streamlit reports clicks on scatter points, not on heatmap cells, so a click on a cell selects
    its marker (``st.plotly_chart(on_select=...)``; the marker is curve 1, at the cell's x and y).
    ``customdata`` of a marker: its cell's value in each of ``data`` (arrays of rows x columns),
    then its x and y; the hover shows ``hovertemplate``."""
    bx, ky = np.meshgrid(np.arange(len(x)), np.arange(len(y)))
    columns = [np.asarray(d, dtype=object).ravel() for d in data] + [np.array(x)[bx.ravel()], np.array(y)[ky.ravel()]]
    fig.add_trace(go.Scatter(
        x=[x[i] for i in bx.ravel()], y=[y[j] for j in ky.ravel()], mode="markers", name="cells",
        marker=dict(symbol="square", size=14, color="rgba(0,0,0,0)"), showlegend=False,
        customdata=np.stack(columns, axis=1), hovertemplate=hovertemplate))
    fig.update_layout(hoverdistance=-1, clickmode="event+select")
    fig.update_xaxes(type="category", showgrid=False)
    fig.update_yaxes(type="category", showgrid=False)


def depth_figure(table: pd.DataFrame, metric: str, kinds: list[str]) -> go.Figure:
    fig = go.Figure()
    for i, kind in enumerate(kinds):
        t = table[table["kind"] == kind].sort_values("block")
        fig.add_trace(go.Scatter(x=t["block"], y=t[metric], mode="lines+markers", name=kind,
                                 line=dict(color=palette(i)),
                                 customdata=t["name"], hovertemplate="%{customdata}<br>" + metric
                                 + " %{y:.3f}<extra></extra>"))
    if metric == "alpha":
        _band(fig)
    fig.update_layout(**LAYOUT, title=f"{metric} against depth", xaxis_title="block", yaxis_title=metric_title(metric))
    return fig


def _band(fig: go.Figure) -> None:
    """The well-trained alpha band 2-6, shaded, its label on a white box above the lines."""
    fig.add_hrect(y0=ALPHA_LOW, y1=ALPHA_HIGH, fillcolor="#54A24B", opacity=0.08, line_width=0, layer="below")
    fig.add_annotation(x=0, xref="paper", xanchor="left", y=ALPHA_HIGH, yanchor="bottom", showarrow=False,
                       text="well trained (2-6)", font=dict(size=11, color="#2E6B2A"),
                       bgcolor="rgba(255,255,255,0.85)", borderpad=2)


def distribution_figure(table: pd.DataFrame, metric: str, kinds: list[str]) -> go.Figure:
    fig = go.Figure()
    for i, kind in enumerate(kinds):
        fig.add_trace(go.Histogram(x=table.loc[table["kind"] == kind, metric], name=kind, opacity=0.75,
                                   marker_color=palette(i), nbinsx=30))
    fig.update_layout(**LAYOUT, barmode="stack", title=f"distribution of {metric}", xaxis_title=metric_title(metric),
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
        _band(fig)
    fig.update_layout(**{**LAYOUT, "height": 400}, title=f"{metric} of every matrix, by kind", showlegend=False,
                      yaxis_title=metric_title(metric))
    return fig


# --- sensitivity and perplexity (issue 21) ------------------------------------------------------

#: mantissas per decade for a perplexity axis, densest first: a tick at 40 between 30 and 50
_PPL_MANTISSAS = ([1, 2, 3, 4, 5, 6, 8], [1, 2, 3, 4, 5, 7], [1, 2, 4], [1, 3], [1])


def perplexity_ticks(lo: float, hi: float, *, max_ticks: int = 12) -> dict:
    """Tick settings of a log perplexity axis over ``lo``..``hi`` (padded by 10 %, as the plot's
    range is): the densest of 1-2-3-4-5-6-8, 1-2-3-4-5-7, 1-2-4, 1-3 per decade that gives at most
    ``max_ticks`` ticks, labelled as plain numbers (``40``, ``1000``); ``log_ticks`` beyond that."""
    lo, hi = sorted((float(lo), float(hi)))
    if not (np.isfinite(lo) and np.isfinite(hi) and lo > 0):
        return dict(type="log", exponentformat="power")
    lo, hi = lo / 1.1, hi * 1.1
    e0, e1 = int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi)))
    for ms in _PPL_MANTISSAS:
        ticks = [(m * 10.0 ** e, e, m) for e in range(e0, e1 + 1) for m in ms if lo <= m * 10.0 ** e <= hi]
        if 3 <= len(ticks) <= max_ticks:
            return dict(type="log", tickmode="array", tickvals=[t[0] for t in ticks],
                        ticktext=[_power_label(m, e) for _, e, m in ticks])
    return log_ticks(lo, hi)


def perplexity_axis(fig: go.Figure, values, *, axis: str = "y") -> None:
    """Make ``axis`` of ``fig`` a log perplexity axis with :func:`perplexity_ticks` for the
    positive finite ``values`` it shows."""
    v = np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in values]) if len(values) else np.array([])
    v = v[np.isfinite(v) & (v > 0)]
    ticks = perplexity_ticks(float(v.min()), float(v.max())) if v.size else dict(type="log", exponentformat="power")
    (fig.update_xaxes if axis == "x" else fig.update_yaxes)(**ticks)


def correlation_text(c) -> str:
    """``Spearman ρ = -0.41 (95% CI -0.70..-0.05, p 0.03, n 30): supports`` for a
    ``core.sensitivity.Correlation``; ``not enough parts`` when it has no rho."""
    if not np.isfinite(c.rho):
        return f"Spearman ρ: not defined (n {c.n}: at least 3 parts with different values are needed)"
    return (f"Spearman ρ = {c.rho:+.2f} (95% CI {c.low:+.2f}..{c.high:+.2f}, p {c.p:.2g}, n {c.n}): "
            f"{c.verdict}")


def sensitivity_figure(table: pd.DataFrame, metric: str, overall, kinds: list[str] | None = None) -> go.Figure:
    """Each part's measured sensitivity (``delta_loss``: the rise in held-out loss when it alone is
    pruned) against its ``metric`` (``core.sensitivity.SensitivityReport.table``), one colour per
    kind (a single series for whole blocks), each point labelled with its block; the title gives
    the correlation ``overall`` (:func:`correlation_text`). AlphaPruning's premise is a falling
    cloud: lower metric, more sensitive."""
    fig = go.Figure()
    kinds = kinds or list(dict.fromkeys(table["kind"].tolist()))
    for i, kind in enumerate(kinds):
        t = table[table["kind"] == kind]
        name = "block" if kind == "all" else kind
        fig.add_trace(go.Scatter(
            x=t[metric], y=t["delta_loss"], mode="markers", name=name, marker=dict(color=palette(i), size=9),
            customdata=np.stack([t["block"].astype(int), t["kind"].astype(str)], axis=-1),
            hovertemplate=f"block %{{customdata[0]}} · %{{customdata[1]}}<br>{metric} %{{x:.3f}}<br>"
                          "delta_loss %{y:+.4f}<extra></extra>"))
    fig.add_hline(y=0.0, line=dict(color="#1F2430", dash="dot", width=1))
    fig.update_layout(**LAYOUT, title=dict(text=f"sensitivity against {metric} · {correlation_text(overall)}",
                                           font=dict(size=14)),
                      xaxis_title=f"{metric} (mean over the part's matrices)",
                      yaxis_title="delta_loss: held-out loss rise, pruned alone")
    return fig
