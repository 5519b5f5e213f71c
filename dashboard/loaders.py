"""Cached loaders of the dashboard (models shared by all sessions, xmin scans; analyses come from
core's disk cache) and the progress callback that draws ``core``'s progress reports on an
``st.progress`` bar."""
from __future__ import annotations

import threading

import streamlit as st
from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

from core.analysis import cache_folder
from core.fit import xmin_scan
from core.models import CONVERSION_RATE, Source, conversion_rate, conversion_seconds, load_model
from core.progress import Progress


@st.cache_resource(show_spinner=False, max_entries=2)
def cached_model(identity: str, source: str, device: str):
    """One loaded model per (weights identity, device), shared by all sessions: read-only.
    Never prune it in place (pruning runs in a separate process). It reports no progress (a
    cached function replays the elements it drew): convert a GGUF first (``load_with_progress``)."""
    return load_model(source, device=device)


@st.cache_data(show_spinner=False, max_entries=256)
def cached_xmin_scan(identity: str, xmin: str, name: str, _eigs):
    """D and alpha for every candidate xmin of one matrix (keyed by model, xmin method and name)."""
    return xmin_scan(_eigs)


def in_this_session(update: Progress) -> Progress:
    """``update`` callable from any thread: core's ``ticking`` reports from a thread of its own,
    which gets this script run's context so that its element updates reach this page."""
    ctx = get_script_run_ctx()

    def call(done: int, total: int, message: str) -> None:
        if ctx is not None and get_script_run_ctx(suppress_warning=True) is None:
            add_script_run_ctx(threading.current_thread(), ctx)
        update(done, total, message)
    return call


#: the phases of "Load and analyse", in order, as the Home page names them
PHASES = {"convert": "convert the GGUF", "load": "load the model", "spectra": "spectra (eigenvalues of WᵀW)",
          "fits": "power-law fits and metrics"}


def phase_of(message: str) -> str:
    """The phase a ``core`` progress message belongs to (``gguf_to_folder`` reports "convert: ...",
    ``load_model`` "loading model", the analysis "eigenvalues" then "fits and metrics")."""
    if message.startswith("convert"):
        return "convert"
    if "model" in message and "load" in message:
        return "load"
    return "fits" if message.startswith("fits") else "spectra"


def load_plan(src: Source, xmin: str) -> dict[str, str]:
    """What each phase will do for ``src`` analysed with ``xmin``, with an estimate: the
    conversion's from the GGUF's size and the rate measured on this machine (``core``), nothing
    to do where the converted model or the analysis is cached on disk."""
    plan = {}
    if src.kind in ("demo", "gguf"):
        seconds, rate = conversion_seconds(src.path), conversion_rate()
        size = src.path.stat().st_size / 1e6
        how = ("the rate the last conversion here measured" if rate != CONVERSION_RATE
               else "a typical rate; this machine's is measured on its first conversion")
        plan["convert"] = ("done before (cached on disk)" if seconds is None else
                           f"about {seconds:.0f} s, first use only ({size:.0f} MB at {rate / 1e6:.1f} MB/s, {how})")
    else:
        plan["convert"] = "nothing to convert"
    plan["load"] = "a few seconds" + (" (a download first, unless cached)" if src.kind == "hub" else "")
    if (cache_folder(src.identity(), xmin) / "meta.json").is_file():
        plan["spectra"] = plan["fits"] = "from the disk cache"
    else:
        plan["spectra"] = ("about 10 s per 100 M parameters on a CPU, seconds on a GPU; one step per matrix "
                           "(cached on disk afterwards)")
        plan["fits"] = "a few seconds"
    return plan


class PhaseProgress:
    """A ``core`` progress callback drawing the phases of "Load and analyse" (``PHASES``, each
    with its ``plan``) in ``box`` and the current one's progress on ``bar``. Callable from any
    thread of this script run (core's conversion reports from a thread of its own)."""

    def __init__(self, box, bar, plan: dict[str, str]):
        self.box, self.bar, self.plan = box, bar, plan
        self.current: str | None = None
        self.notes: dict[str, str] = {}
        self.update = in_this_session(self._update)
        self.draw()

    def __call__(self, done: int, total: int, message: str) -> None:
        self.update(done, total, message)

    def enter(self, phase: str, note: str = "") -> None:
        """``phase`` has begun (earlier ones are over)."""
        order = list(PHASES)
        if self.current is None or order.index(phase) > order.index(self.current):
            for earlier in order[:order.index(phase)]:     # an estimate: it ran; else what the plan said
                planned = self.plan.get(earlier, "")
                self.notes.setdefault(earlier, "done" if planned.startswith("about") else planned or "done")
            self.current = phase
            self.draw()
        if note:
            self.notes[phase] = note

    def _update(self, done: int, total: int, message: str) -> None:
        phase = phase_of(message)
        self.enter(phase)
        if phase == "convert" and message.startswith("convert: done"):
            self.notes["convert"] = message.removeprefix("convert: ")
            self.draw()
        frac = min(max(done / total, 0.0), 1.0) if total else 0.0
        counted = f" ({done}/{total})" if total and phase != "convert" else ""
        self.bar.progress(frac, text=f"{PHASES[phase]}: {message}{counted}")

    def draw(self) -> None:
        lines = []
        for phase, name in PHASES.items():
            if phase in self.notes and phase != self.current:
                mark, note = ":material/check_circle:", self.notes[phase]
            elif phase == self.current:
                mark, note = ":material/pending:", f"now · {self.plan.get(phase, '')}"
            else:
                mark, note = ":material/radio_button_unchecked:", self.plan.get(phase, "")
            lines.append(f"- {mark} **{name}**: {note}")
        self.box.markdown("\n".join(lines))
