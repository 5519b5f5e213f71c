"""Home / model: choose the model, device and xmin method; load it and run (or reuse) the analysis."""
import time

import pandas as pd
import streamlit as st

from core.analysis import analyze
from core.fit import XMIN_METHODS
from core.models import gguf_to_folder, resolve_source
from dashboard.errors import USER_ERRORS, message
from dashboard.exports import export_format_control, show
from dashboard.figures import fmt_params, kind_box_figure, kind_order
from dashboard.loaders import PHASES, PhaseProgress, cached_model, load_plan
from dashboard.state import PAGES, State, setup

#: seconds the last successful "Load and analyse" spent loading the model
LOAD_SECONDS = State.load_seconds

setup()
export_format_control()
ss = st.session_state
st.title("Spectrascope")
st.caption("Look inside an LLM through the **spectra of its weight matrices** (Heavy-Tailed "
           "Self-Regularization), see which layers are well trained, and prune it with **AlphaPruning**.")


def devices() -> list[str]:
    import torch

    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


with st.form("model", border=False):
    c0, c1, c2, c3 = st.columns([4, 1.4, 1.4, 1.4], vertical_alignment="bottom")
    c0.text_input("Model", key=State.source,
                  help="`demo` (SmolLM2-135M, works offline), a Hugging Face model folder, a `.gguf` file, "
                       "a `.safetensors` file or a hub id such as `org/name` when the hub is reachable")
    options = devices()
    if ss[State.device] not in options:
        ss[State.device] = "auto"
    c1.selectbox("Device", options, key=State.device, help="auto: a GPU when present, else the CPU")
    c2.selectbox("xmin method", XMIN_METHODS, key=State.xmin,
                 help="peak: AlphaPruning's window around the histogram peak (default); full: the xmin with "
                      "the smallest KS distance over all candidates (as `powerlaw`); mid: the median "
                      "eigenvalue; peak-compat: the published code, its window bug included")
    submitted = c3.form_submit_button("Load and analyse", type="primary", width="stretch")

if submitted:
    ss[State.load_error] = None
    source, device, xmin = ss[State.source].strip() or "demo", ss[State.device], ss[State.xmin]
    try:
        src = resolve_source(source)
        started = time.perf_counter()
        box, bar = st.empty(), st.progress(0.0, text=f"Loading {src.label}")
        progress = PhaseProgress(box, bar, load_plan(src, xmin))
        if src.kind in ("demo", "gguf"):        # first use: converted once on disk, reporting as it goes
            gguf_to_folder(src.path, progress=progress)
        progress.enter("load")
        loaded = cached_model(src.identity(), source, device)
        ss[LOAD_SECONDS] = time.perf_counter() - started
        progress.enter("load", f"done ({ss[LOAD_SECONDS]:.1f} s with the conversion)" if src.kind in ("demo", "gguf")
                       else f"done in {ss[LOAD_SECONDS]:.1f} s")
        # computes, or reads core's disk cache (then ``cached`` says so): this call's result is shown
        analysis = analyze(loaded, xmin=xmin, device=device, progress=progress)
        box.empty(), bar.empty()
    except USER_ERRORS as exc:
        ss[State.load_error] = message(exc)
    else:
        ss[State.loaded], ss[State.analysis] = loaded, analysis

loaded, analysis = ss[State.loaded], ss[State.analysis]
if ss[State.load_error]:
    st.error(f"Could not load or analyse the model: {ss[State.load_error]}", icon=":material/error:")
    if analysis is not None:
        st.warning(f"Still loaded: **{analysis.model}**, the model from before. Every page keeps using it "
                   "until a load succeeds.", icon=":material/history:")
if analysis is None:
    try:
        plan = load_plan(resolve_source(ss[State.source].strip() or "demo"), ss[State.xmin])
    except USER_ERRORS:
        plan = {}
    st.info("Press **Load and analyse** to start. The demo model needs no network. What it will do:\n\n"
            + "\n".join(f"- **{PHASES[k]}**: {v}" for k, v in plan.items())
            + "\n\nEach phase shows its progress as it runs; what is cached on disk is not done again.",
            icon=":material/info:")
    st.stop()

summary = loaded.summary() if loaded is not None else {}
table = analysis.table
fits = table["alpha"].notna()
status = table["status"].astype(str).str.replace(r"^no fit.*", "no fit", regex=True).value_counts()
still = "Still loaded: " if ss[State.load_error] else ""
st.markdown(f"**{still}{analysis.model}** · " + ", ".join(f"{k}: {v}" for k, v in status.items()))
took = "from cache" if analysis.cached else f"{analysis.seconds:.1f} s"
cards = [("Family", summary.get("family", "?")), ("Blocks", int(table["block"].nunique())),
         ("Matrices", len(table)), ("Prunable params", fmt_params(table["params"].sum())),
         ("Total params", fmt_params(summary["total_params"]) if summary else "?"),
         ("Median alpha", f"{table['alpha'].median():.2f}" if fits.any() else "n/a"),
         ("With a fit", f"{int(fits.sum())} / {len(table)}"), ("Analysis", took)]
left, right = st.columns([1, 1])
with left:
    for i in range(0, len(cards), 2):
        row = st.columns(2)
        for col, (label, value) in zip(row, cards[i:i + 2]):
            helps = {"Analysis": f"xmin={analysis.xmin}, device={analysis.device}"
                     + (f"; model load {ss[LOAD_SECONDS]:.1f} s" if ss.get(LOAD_SECONDS) is not None else "")}
            col.metric(label, value, help=helps.get(label))
if fits.any():
    with right:
        show(kind_box_figure(table, "alpha", kind_order(table)), "overview", settings={"xmin": analysis.xmin},
             key="overview")
        st.caption("Shaded: alpha 2-6, the well-trained range. Below 2: very heavy tailed; above 6: random-like.")
if summary:
    st.caption(f"model type `{summary.get('model_type')}` · dtype {summary.get('dtype')} · "
               f"weights on {summary.get('device')} · source `{summary.get('source')}`")

with st.expander("Most and least heavy-tailed matrices"):
    ranked = table[fits].sort_values("alpha")
    st.dataframe(pd.concat([ranked.head(3), ranked.tail(3)])[["name", "alpha", "D", "n_tail", "status"]],
                 hide_index=True, width="stretch", key="extremes", placeholder="—")

st.markdown("**Next:**")
c1, c2, c3 = st.columns(3)
c1.page_link(PAGES["spectra"][0], label="Spectra of single matrices", icon=":material/ssid_chart:")
c2.page_link(PAGES["quality"][0], label="Which layers are well trained", icon=":material/grid_on:")
c3.page_link(PAGES["allocation"][0], label="Tune the sparsity allocation", icon=":material/tune:")
