"""Spectra: the ESD of one or several matrices with the power-law fit, xmin, and the MP reference."""
import numpy as np
import streamlit as st

from dashboard.figures import esd_figure, kind_order, xmin_scan_figure
from dashboard.loaders import cached_xmin_scan
from dashboard.state import State, analysis_page

ss = st.session_state
analysis = analysis_page("Spectra")
table = analysis.table

blocks = sorted(int(b) for b in table["block"].unique())
kinds = kind_order(table)
for key, options in ((State.sp_blocks, blocks), (State.sp_kinds, kinds)):
    valid = [v for v in ss[key] if v in options]
    if valid != ss[key]:          # another model was analysed: keep what still exists
        ss[key] = valid or options[:1]

c1, c2 = st.columns([3, 2])
c1.multiselect("Blocks", blocks, key=State.sp_blocks)
c2.multiselect("Kinds", kinds, key=State.sp_kinds)
o1, o2, o3 = st.columns(3)
o1.toggle("Linear scale", key=State.sp_linear, help="linear axes and bins instead of log-log with log bins")
o2.toggle("Power-law fit and xmin", key=State.sp_fit)
o3.toggle("Marchenko-Pastur (shuffled matrix)", key=State.sp_mp,
          help="the ESD a matrix with the same shape and element variance but no structure would have")

chosen = table[table["block"].isin(ss[State.sp_blocks]) & table["kind"].isin(ss[State.sp_kinds])]
if chosen.empty:
    st.info("Pick at least one block and one kind.")
    st.stop()
MAX = 8
if len(chosen) > MAX:
    st.warning(f"{len(chosen)} matrices selected; drawing the first {MAX}.")
    chosen = chosen.head(MAX)

items = [{"label": f"{r['block']}.{r['kind']}", "row": r, "eigs": analysis.eigs[r["name"]]}
         for r in chosen.to_dict("records")]
st.plotly_chart(esd_figure(items, linear=ss[State.sp_linear], show_fit=ss[State.sp_fit], show_mp=ss[State.sp_mp]),
                width="stretch", key="esd")
st.caption("Dashed: the fitted power law ρ(λ) ∝ λ^-α from xmin (dotted). Grey: the Marchenko-Pastur density "
           "of the element-wise shuffled matrix and its bulk edge λ+; eigenvalues beyond λ+ are spikes. "
           "α of about 2-6 means well trained, below 2 very heavy tailed, above 6 random-like.")

st.subheader("Table")
show = ["name", "rows", "cols", "alpha", "xmin", "D", "sigma", "n_tail", "alpha_hat", "log_norm",
        "log_spectral_norm", "stable_rank", "entropy", "lambda_plus", "num_spikes", "mp_softrank", "status"]
st.dataframe(chosen[show], hide_index=True, width="stretch",
             column_config={c: st.column_config.NumberColumn(format="%.4g") for c in show[3:-1]})

st.subheader("Fit diagnostics")
if st.toggle("Show D and alpha as functions of xmin", key=State.sp_scan,
             help="every candidate xmin of the `full` method, as powerlaw and WeightWatcher draw them"):
    scans = [(it["label"], cached_xmin_scan(analysis.identity, analysis.xmin, it["row"]["name"],
                                            _eigs=np.asarray(it["eigs"])), it["row"]["xmin"]) for it in items[:4]]
    if all(s.empty for _, s, _ in scans):
        st.info("No candidate xmin: these spectra have too few positive eigenvalues for a fit.")
    else:
        st.plotly_chart(xmin_scan_figure(scans), width="stretch", key="scan")
        st.caption("The fit keeps the xmin with the smallest KS distance D (dashed: the xmin the "
                   f"`{analysis.xmin}` method chose). A flat, low D valley means a clean power-law tail.")
