"""Cached loaders of the dashboard (models shared by all sessions, xmin scans; analyses come from
core's disk cache) and the progress callback that draws ``core``'s progress reports on an
``st.progress`` bar."""
from __future__ import annotations

import streamlit as st

from core.fit import xmin_scan
from core.models import load_model
from core.progress import Progress


@st.cache_resource(show_spinner=False, max_entries=2)
def cached_model(identity: str, source: str, device: str):
    """One loaded model per (weights identity, device), shared by all sessions: read-only.
    Never prune it in place (pruning runs in a separate process)."""
    return load_model(source, device=device)


@st.cache_data(show_spinner=False, max_entries=256)
def cached_xmin_scan(identity: str, xmin: str, name: str, _eigs):
    """D and alpha for every candidate xmin of one matrix (keyed by model, xmin method and name)."""
    return xmin_scan(_eigs)


def progress_callback(bar) -> Progress:
    """A ``core`` progress callback drawing on an ``st.progress`` element."""
    def update(done: int, total: int, message: str) -> None:
        frac = min(max(done / total, 0.0), 1.0) if total else 0.0
        bar.progress(frac, text=f"{message} ({done}/{total})" if total else message)
    return update
