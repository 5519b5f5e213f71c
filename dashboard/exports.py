"""How the pages show and export a figure (PNG/SVG from the chart's camera button) and a table
(CSV download), with file names that say what they hold. Streamlit code; the figures themselves
are ``dashboard.figures``."""
from __future__ import annotations

import re

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard.figures import FONT, wrap_title


#: the size every chart is exported at (CSS px; PNGs at twice that): one layout for the file whatever
#: the window's width, wide enough for a legend row of several entries (a narrow window wrapped it)
EXPORT_SIZE = {"width": 1200}
#: session key of the chart download format, "png" or "svg" (``State.fig_format``)
EXPORT_FORMAT = "fig_format"


def export_name(name: str, *, model: str | None = None, settings: dict | str | None = None) -> str:
    """A file name (without extension) naming the model, the chart and its settings:
    ``SmolLM2-135M-Instruct_esd_xmin-peak_blocks-0-5``. ``model`` None: the analysed model."""
    if model is None:
        analysis = st.session_state.get("analysis")
        model = getattr(analysis, "model", "") or ""
    if isinstance(settings, dict):
        settings = "_".join(f"{k}-{v}" for k, v in settings.items())
    parts = [str(p) for p in (model.split("/")[-1], name, settings) if p]
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", "_".join(parts)).strip("_")[:180] or "chart"


def show(fig: go.Figure, name: str, *, settings: dict | str | None = None, model: str | None = None,
         key: str | None = None, where=None, **kwargs):
    """Draw ``fig`` full width with a download button (the camera in its toolbar) that saves it
    as PNG or SVG, as chosen with :func:`export_format_control`; the file name holds the model,
    ``name`` and ``settings``. The file is laid out at ``EXPORT_SIZE`` wide (the figure's own height)
    in ``figures.FONT``; a long title is wrapped (``figures.wrap_title``): narrow windows cut it
    otherwise. The export runs in the browser (plotly.js), so it works offline and needs no
    kaleido. ``kwargs`` go to ``st.plotly_chart`` (``on_select``...); returns its result."""
    fmt = st.session_state.get(EXPORT_FORMAT) or "png"
    config = {"displaylogo": False, "toImageButtonOptions": {
        "format": fmt, "filename": export_name(name, model=model, settings=settings), "scale": 2 if fmt == "png" else 1,
        **EXPORT_SIZE, "height": fig.layout.height or 450}}
    if not fig.layout.font.family:      # a figure not built on figures.LAYOUT: the font its export has too
        fig.update_layout(font=FONT)
    return (where or st).plotly_chart(wrap_title(fig), width="stretch", key=key or name, config=config, **kwargs)


def export_format_control(where=None) -> None:
    """The one chart-format switch (PNG or SVG) of the page, in the sidebar by default; kept for
    the whole session."""
    (where or st.sidebar).segmented_control(
        "Chart downloads", ["png", "svg"], format_func=str.upper, key=EXPORT_FORMAT,
        required=True,
        help="the format the camera button of every chart saves (SVG: vector, for papers and slides)")


def csv_button(table: pd.DataFrame, name: str, *, settings: dict | str | None = None, model: str | None = None,
               where=None, key: str | None = None) -> None:
    """A "CSV" download of ``table`` whose file name holds the model, ``name`` and ``settings``."""
    (where or st).download_button("CSV", table.to_csv(index=False).encode(), key=key or f"csv_{name}",
                                  file_name=export_name(name, model=model, settings=settings) + ".csv",
                                  mime="text/csv", icon=":material/download:", on_click="ignore")
