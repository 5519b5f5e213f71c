"""The Sweep & tune page's helpers: the command lines of its jobs (``spectrascope sweep`` and
``spectrascope tune``, checked through ``PruneSpec`` before a job starts), the tables read back
from a finished job, and the tuning heatmap. Argument writing and drawing only: every run and
score comes from the jobs (``core.sweeps``)."""
from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core.fit import XMIN_METHODS
from core.spec import PruneSpec
from core.sweeps import sweep_specs
from dashboard.figures import LAYOUT, log_colorbar

RAY_HELP = ("empty: no Ray; `local`: a local Ray instance; else the address of a Ray cluster "
            "(`HEAD:6379`, or `auto`; `ray://` is not supported). Needs the `[cluster]` extra: "
            "pip install 'spectrascope[cluster]'")


def ray_args(address: str) -> list[str]:
    """``--ray [ADDRESS]`` for the address typed (empty: none, ``local``: a local instance);
    ValueError when Ray is not installed, so that no job is started only to fail."""
    address = (address or "").strip()
    if not address:
        return []
    if importlib.util.find_spec("ray") is None:
        raise ValueError(f"Ray address {address!r}: Ray is not installed in this environment; install the "
                         "cluster extra (pip install 'spectrascope[cluster]') or leave the address empty")
    return ["--ray"] if address == "local" else ["--ray", address]


def _numbers(values) -> str:
    return ",".join(f"{float(v):g}" for v in values)


def _common(base: PruneSpec) -> list[str]:
    """The options ``sweep`` and ``tune`` share: model, device, calibration and allocation limits."""
    c = base.calibration
    argv = ["--model", base.model, "--device", base.device, "--dtype", base.dtype, "--mapping", base.mapping,
            "--calib", c.dataset, "--nsamples", str(c.nsamples), "--seqlen", str(c.seqlen), "--seed", str(c.seed),
            "--bos", c.bos]
    argv += ["--r-max", repr(base.r_max)] if base.r_max is not None else []
    argv += ["--dense-kinds", ",".join(base.dense_kinds)] if base.dense_kinds else []
    return argv


def sweep_argv(base: PruneSpec, *, methods: list[str], allocations: list[str], sparsities: list[float],
               epsilons: list[float], ray: str = "", matrices: object = None) -> list[str]:
    """``spectrascope sweep`` of every method x allocation x sparsity (x epsilon for alpha) from
    ``base`` (model, calibration, evaluation, metric, xmin, mapping, r_max, dense kinds); every
    run is checked first (ValueError naming the bad setting), against the model's ``matrices``
    (an analysis table) when given: a sparsity its dense kinds and r_max cannot reach."""
    if not (methods and allocations and sparsities):
        raise ValueError("pick at least one method, one allocation and one sparsity")
    if "alpha" in allocations and not epsilons:
        raise ValueError("AlphaPruning needs at least one epsilon")
    specs = sweep_specs(base, methods=methods, allocations=allocations, sparsities=sparsities, epsilons=epsilons or None)
    for spec in specs if matrices is not None else ():
        spec.check_reachable(matrices)
    e = base.evaluation
    argv = ["sweep", *_common(base), "--methods", ",".join(methods), "--allocations", ",".join(allocations),
            "--sparsities", _numbers(sparsities), "--metric", base.metric, "--xmin", base.xmin, "--dataset", e.dataset]
    argv += ["--epsilons", _numbers(epsilons)] if epsilons else []
    argv += ["--max-windows", str(e.max_windows)] if e.max_windows is not None else []
    return argv + ray_args(ray)


def tune_argv(base: PruneSpec, *, epsilons: list[float], xmins: list[str], metrics: list[str],
              holdout_windows: int, ray: str = "", matrices: object = None) -> list[str]:
    """``spectrascope tune`` of ``base``'s method and sparsity over epsilon x xmin x metric,
    scored on ``holdout_windows`` windows of held-out calibration text (checked against the
    model's ``matrices`` when given, as ``sweep_argv``)."""
    if not (epsilons and xmins and metrics):
        raise ValueError("pick at least one epsilon, one xmin method and one metric column")
    for x in xmins:
        if x not in XMIN_METHODS:
            raise ValueError(f"xmin {x!r} is unknown; use {', '.join(XMIN_METHODS)}")
    for eps in epsilons:
        spec = replace(base, allocation="alpha", epsilon=eps)       # each epsilon checked like a prune run's
        if matrices is not None:
            spec.check_reachable(matrices)
    if int(holdout_windows) < 1:
        raise ValueError(f"held-out windows {holdout_windows!r}: give 1 or more")
    argv = ["tune", *_common(base), "--method", base.method, "--sparsity", repr(base.sparsity),
            "--epsilons", _numbers(epsilons), "--xmins", ",".join(xmins), "--metrics-cols", ",".join(metrics),
            "--holdout-windows", str(int(holdout_windows))]
    return argv + ray_args(ray)


def sweep_table(csv_path, result: dict) -> pd.DataFrame:
    """A finished sweep's table: its CSV (``--out``), else the rows of its ``--json`` result."""
    try:
        return pd.read_csv(csv_path)
    except (OSError, ValueError):
        return pd.DataFrame(result.get("rows") or [])


def tune_figure(table: pd.DataFrame, best: dict, title: str) -> go.Figure:
    """Held-out perplexity of every epsilon (x) and xmin · metric (y), coloured on a log scale,
    the value written in each cell and the winner marked with a star (its value beside it)."""
    t = table.assign(row=table["xmin"].astype(str) + " · " + table["metric"].astype(str),
                     eps=table["epsilon"].map(lambda e: f"{float(e):g}"))
    grid = t.pivot_table(index="row", columns="eps", values="perplexity", sort=False)
    ppl = grid.to_numpy(dtype=np.float64)
    text = np.vectorize(lambda v: f"{v:.4g}")(ppl)
    win_x, win_y = f"{float(best['epsilon']):g}", f"{best['xmin']} · {best['metric']}"
    shown = text.copy()
    shown[list(grid.index).index(win_y), list(grid.columns).index(win_x)] = ""   # written beside the star
    fig = go.Figure(go.Heatmap(
        z=np.log10(ppl), x=list(grid.columns), y=list(grid.index), colorscale="Viridis", xgap=1, ygap=1,
        colorbar=log_colorbar(ppl, "perplexity"), text=shown, texttemplate="%{text}", customdata=text,
        hovertemplate="epsilon %{x}<br>%{y}<br>perplexity %{customdata}<extra></extra>"))
    value = f"{float(best['perplexity']):.4g}"
    fig.add_trace(go.Scatter(x=[win_x], y=[win_y], mode="markers+text", name=f"best: {value}", text=[value],
                             textposition="middle right", textfont=dict(color="white"),
                             marker=dict(symbol="star", size=16, color="white", line=dict(color="black", width=1.5)),
                             hovertemplate=f"best: epsilon {win_x}, {win_y}<extra></extra>"))
    fig.update_layout(**{**LAYOUT, "height": max(260, 90 + 45 * len(grid.index))}, title=title,
                      xaxis_title="epsilon", yaxis_title="xmin · metric")
    fig.update_xaxes(type="category", showgrid=False, ticklabelstandoff=4)
    fig.update_yaxes(type="category", showgrid=False, autorange="reversed", ticklabelstandoff=8)
    return fig
