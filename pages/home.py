"""Home / model: choose the model, device and xmin method; load it and run (or reuse) the analysis."""
import pandas as pd
import streamlit as st

from core.analysis import analyze
from core.fit import XMIN_METHODS
from core.models import resolve_source
from dashboard.figures import fmt_params, kind_box_figure, kind_order
from dashboard.loaders import cached_analysis, cached_model, progress_callback
from dashboard.state import PAGES, State, setup

setup()
ss = st.session_state
st.title("Spectrascope")
st.markdown("Look inside an LLM through the **spectra of its weight matrices** (Heavy-Tailed "
            "Self-Regularization), see which layers are well trained, and prune it with **AlphaPruning**.")


def devices() -> list[str]:
    import torch

    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


with st.form("model"):
    st.text_input("Model", key=State.source,
                  help="`demo` (SmolLM2-135M, works offline), a Hugging Face model folder, a `.gguf` file, "
                       "a `.safetensors` file or a hub id such as `org/name` when the hub is reachable")
    c1, c2 = st.columns(2)
    options = devices()
    if ss[State.device] not in options:
        ss[State.device] = "auto"
    c1.selectbox("Device", options, key=State.device, help="auto: a GPU when present, else the CPU")
    c2.selectbox("xmin method", XMIN_METHODS, key=State.xmin,
                 help="peak: AlphaPruning's window around the histogram peak (default); full: the xmin with "
                      "the smallest KS distance over all candidates (as `powerlaw`); mid: the median "
                      "eigenvalue; peak-compat: the published code, its window bug included")
    submitted = st.form_submit_button("Load and analyse", type="primary")

if submitted:
    ss[State.load_error] = None
    source, device, xmin = ss[State.source].strip() or "demo", ss[State.device], ss[State.xmin]
    try:
        src = resolve_source(source)
        with st.spinner(f"Loading {src.label} (the demo's first use converts its GGUF, about a minute)..."):
            loaded = cached_model(src.identity(), source, device)
        bar = st.progress(0.0, text="analysis")
        analyze(loaded, xmin=xmin, device=device, progress=progress_callback(bar))  # computes or hits the disk cache
        analysis = cached_analysis(loaded.identity, xmin, device, _loaded=loaded)
        bar.empty()
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as exc:
        ss[State.load_error] = str(exc)
    else:
        ss[State.loaded], ss[State.analysis] = loaded, analysis

if ss[State.load_error]:
    st.error(f"Could not load or analyse the model: {ss[State.load_error]}", icon=":material/error:")

loaded, analysis = ss[State.loaded], ss[State.analysis]
if analysis is None:
    st.info("Press **Load and analyse** to start. The demo model needs no network; its spectra take "
            "about 10 s on a laptop CPU the first time and are cached on disk afterwards.")
    st.stop()

st.subheader(analysis.model)
summary = loaded.summary() if loaded is not None else {}
table = analysis.table
cols = st.columns(5)
cols[0].metric("Family", summary.get("family", "?"))
cols[1].metric("Blocks", int(table["block"].nunique()))
cols[2].metric("Matrices", len(table))
cols[3].metric("Prunable parameters", fmt_params(table["params"].sum()))
cols[4].metric("Total parameters", fmt_params(summary["total_params"]) if summary else "?")

fits = table["alpha"].notna()
status = table["status"].astype(str).str.replace(r"^no fit.*", "no fit", regex=True).value_counts()
c1, c2, c3 = st.columns(3)
c1.metric("Median alpha", f"{table['alpha'].median():.2f}" if fits.any() else "n/a")
c2.metric("Matrices with a fit", f"{int(fits.sum())} / {len(table)}")
c3.metric("Analysis", "from cache" if analysis.cached else f"{analysis.seconds:.1f} s",
          help=f"xmin={analysis.xmin}, device={analysis.device}")
st.caption("Status of the matrices: " + ", ".join(f"{k}: {v}" for k, v in status.items()))
if summary:
    st.caption(f"model type `{summary.get('model_type')}` · dtype {summary.get('dtype')} · "
               f"weights on {summary.get('device')} · source `{summary.get('source')}`")

if fits.any():
    st.plotly_chart(kind_box_figure(table, "alpha", kind_order(table)), width="stretch", key="overview")
    st.caption("Shaded: alpha 2-6, the well-trained range. Below 2: very heavy tailed; above 6: random-like.")

with st.expander("Most and least heavy-tailed matrices"):
    ranked = table[fits].sort_values("alpha")
    st.dataframe(pd.concat([ranked.head(3), ranked.tail(3)])[["name", "alpha", "D", "n_tail", "status"]],
                 hide_index=True, width="stretch", key="extremes")

st.markdown("**Next:**")
c1, c2, c3 = st.columns(3)
c1.page_link(PAGES["spectra"][0], label="Spectra of single matrices", icon=":material/ssid_chart:")
c2.page_link(PAGES["quality"][0], label="Which layers are well trained", icon=":material/grid_on:")
c3.page_link(PAGES["allocation"][0], label="Tune the sparsity allocation", icon=":material/tune:")
