"""Allocation: tune the layer-wise sparsity (AlphaPruning, uniform, OWL) with an instant preview."""
import pandas as pd
import streamlit as st

from core.allocation import CSV_COLUMNS, MAPPINGS, allocate
from core.calibration import calibration_data
from core.profiles import list_profiles, load_profile
from core.pruning import owl_scores
from core.quant import quant_alpha_message
from dashboard.figures import block_ratios_figure, fmt_params, kind_order, ratios_figure
from dashboard.loaders import progress_callback
from dashboard.state import ALLOCATIONS, METRICS, State, allocation_label, setup

setup()
ss = st.session_state
_FALLBACK = "a_metric_fallback"   # (table shown, the user's metric, the metric used instead)
st.title("Allocation")
st.caption("How much of each matrix to prune so that the parameter-weighted mean is the target sparsity S. "
           "AlphaPruning prunes matrices with larger alpha (less well trained) more. The allocation set here "
           "(A) is what **Prune & compare** uses.")

analysis, loaded = ss[State.analysis], ss[State.loaded]
sources = (["loaded model"] if analysis is not None else []) + [f"profile: {p}" for p in list_profiles()]
if ss[State.a_source] not in sources:
    ss[State.a_source] = sources[0]
st.selectbox("Metrics from", sources, key=State.a_source,
             help="the analysed model, or a published LLaMA alpha profile (for models too large to load here)")
if analysis is None:
    st.caption("No model analysed yet: the published profiles work without one (Home / model loads a model).")
if ss[State.a_source] == "loaded model":
    table, identity = analysis.table, analysis.identity
else:
    table, identity = load_profile(ss[State.a_source].removeprefix("profile: ")), None
kinds = kind_order(table)
metrics = [m for m in METRICS if m in table.columns and table[m].notna().any()]
# A metric this table lacks (alpha NaN everywhere: no power-law fit) is replaced for this table
# only, with a warning; the user's choice comes back with the next model or profile.
fallback, shown = ss.get(_FALLBACK), (ss[State.a_source], identity)
if fallback is not None and fallback[0] != shown:
    if ss[State.a_metric] == fallback[2]:
        ss[State.a_metric] = fallback[1]
    ss[_FALLBACK] = fallback = None
if ss[State.a_metric] not in metrics:
    ss[_FALLBACK] = fallback = (shown, ss[State.a_metric], metrics[0])
    ss[State.a_metric] = metrics[0]
if fallback is not None and ss[State.a_metric] == fallback[2]:
    st.warning(f"{fallback[1]} is missing or NaN for every matrix here (no power-law fit?): AlphaPruning uses "
               f"{fallback[2]} instead for this table; {fallback[1]} comes back with the next model.",
               icon=":material/warning:")
ss[State.a_dense] = [k for k in ss[State.a_dense] if k in kinds]

with st.container(border=True):
    c1, c2, c3 = st.columns(3)
    c1.radio("Method", ALLOCATIONS, key=State.a_method, horizontal=True, format_func=allocation_label,
             help="OWL needs calibration statistics of the loaded model (computed below on demand)")
    c2.selectbox("Metric", metrics, key=State.a_metric, disabled=ss[State.a_method] != "alpha")
    c3.radio("Mapping", MAPPINGS, key=State.a_mapping, horizontal=True,
             disabled=ss[State.a_method] != "alpha",
             help="block: every matrix takes its block's mean metric (the paper's default); matrix: its own")
    c1, c2, c3 = st.columns(3)
    c1.slider("Mean sparsity S", 0.0, 0.95, step=0.01, key=State.a_sparsity)
    c2.slider("epsilon (tau range)", 0.0, 0.9, step=0.01, key=State.a_epsilon,
              disabled=ss[State.a_method] != "alpha",
              help="ratios span about S(1 - eps) .. S(1 + eps); the paper tunes 0.2-0.5")
    c3.slider("r_max", 0.5, 0.999, step=0.001, key=State.a_rmax, help="no matrix is pruned beyond r_max")
    st.multiselect("Dense kinds (kept at 0)", kinds, key=State.a_dense,
                   help="these kinds are not pruned; the others carry the whole budget")


def owl_block_scores():
    """OWL's outlier share per block from cached statistics, or None with a button to compute them."""
    if ss[State.a_source] != "loaded model" or loaded is None:
        st.info("OWL needs the loaded model (its activations on calibration text); pick the loaded model above.")
        return None
    scores = ss[State.owl].get(identity)
    if scores is None:
        st.info("OWL needs calibration statistics: the share of outlier Wanda scores in each block.")
        if st.button("Compute OWL statistics (16 windows x 128 tokens)", icon=":material/calculate:"):
            bar = st.progress(0.0, text="OWL statistics")
            try:
                calib = calibration_data(loaded.tokenizer, nsamples=16, seqlen=128, model=loaded.model)
                ss[State.owl][identity] = owl_scores(loaded, calib, device=ss[State.device],
                                                     progress=progress_callback(bar))
            except (ValueError, RuntimeError, OSError) as exc:
                st.error(f"OWL statistics failed: {exc}")
                return None
            bar.empty()
            st.rerun()
        return None
    return scores


def compute(method: str, mapping: str, epsilon: float):
    """(ratios table, weighted mean, notes) for the current settings, or None after a message."""
    scores = owl_block_scores() if method == "owl" else None
    if method == "owl" and scores is None:
        return None
    try:
        a = allocate(table, sparsity=ss[State.a_sparsity], method=method, metric=ss[State.a_metric], mapping=mapping,
                     epsilon=epsilon, r_max=ss[State.a_rmax], dense_kinds=tuple(ss[State.a_dense]), owl_scores=scores)
    except ValueError as exc:
        st.error(str(exc), icon=":material/error:")
        return None
    notes = a.warnings + ((f"{a.n_clipped} matrices held at r_max",) if a.n_clipped else ())
    return a.ratios, a.weighted_mean, notes


def by_block(ratios: pd.DataFrame) -> pd.Series:
    w = ratios["ratio"] * ratios["params"]
    return w.groupby(ratios["block"]).sum() / ratios["params"].groupby(ratios["block"]).sum()


S = ss[State.a_sparsity]
result = compute(ss[State.a_method], ss[State.a_mapping], ss[State.a_epsilon])
if result is None:
    st.stop()
ratios, mean, notes = result
prunable = ratios[~ratios["kind"].isin(ss[State.a_dense])]
m1, m2, m3, m4 = st.columns(4)
m1.metric("Target S", f"{S:.3f}")
m2.metric("Parameter-weighted mean", f"{mean:.4f}", delta=f"{mean - S:+.1e}", delta_color="off",
          help="sum(n_i r_i) / sum(n_i): must equal S")
m3.metric("Ratio range", f"{prunable['ratio'].min():.3f} - {prunable['ratio'].max():.3f}")
m4.metric("Weights pruned", fmt_params((ratios["ratio"] * ratios["params"]).sum()))
for note in notes:
    st.caption(f":material/warning: {note}")
if quant_note := quant_alpha_message(table, ss[State.a_metric]):
    st.info(quant_note, icon=":material/warning:")

series = {f"A: {allocation_label(ss[State.a_method])}": by_block(ratios)}
st.toggle("Compare with a second allocation (B)", key=State.a_compare)
other = None
if ss[State.a_compare]:
    with st.container(border=True):
        c1, c2, c3 = st.columns(3)
        c1.radio("B method", [m for m in ALLOCATIONS if m != "owl"], key=State.b_method, horizontal=True,
                 format_func=allocation_label)
        c2.radio("B mapping", MAPPINGS, key=State.b_mapping, horizontal=True)
        c3.slider("B epsilon", 0.0, 0.9, step=0.01, key=State.b_epsilon)
        other = compute(ss[State.b_method], ss[State.b_mapping], ss[State.b_epsilon])
        if other is not None:
            series[f"B: {allocation_label(ss[State.b_method])}"] = by_block(other[0])

st.plotly_chart(block_ratios_figure(series, S), width="stretch", key="blocks")
if other is not None:
    left, right = st.columns(2)
    left.plotly_chart(ratios_figure(ratios, S, kinds, "A: ratio per matrix"), width="stretch", key="ra")
    right.plotly_chart(ratios_figure(other[0], S, kinds, "B: ratio per matrix"), width="stretch", key="rb")
else:
    st.plotly_chart(ratios_figure(ratios, S, kinds, "ratio per matrix"), width="stretch", key="ra")

with st.expander("Ratios table"):
    st.dataframe(ratios, hide_index=True, width="stretch")
cols = [c for c in CSV_COLUMNS if c in ratios.columns]
st.download_button("Download allocation A as CSV", ratios[cols].to_csv(index=False).encode(),
                   file_name=f"allocation-{allocation_label(ss[State.a_method])}-S{S:.2f}.csv", mime="text/csv",
                   icon=":material/download:")
