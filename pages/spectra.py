"""Spectra: the ESD of one or several matrices with the power-law fit, xmin, and the MP reference."""
import numpy as np
import streamlit as st

from dashboard.exports import csv_button, export_format_control, show
from dashboard.figures import LINEAR_QUANTILE, esd_figure, kind_order, metric_help, xmin_scan_figure
from dashboard.loaders import cached_xmin_scan
from dashboard.state import State, analysis_page

ss = st.session_state
analysis = analysis_page("Spectra")
export_format_control()
table = analysis.table

blocks = sorted(int(b) for b in table["block"].unique())
kinds = kind_order(table)
for key, options in ((State.sp_blocks, blocks), (State.sp_kinds, kinds)):
    valid = [v for v in ss[key] if v in options]
    if valid != ss[key]:          # another model was analysed: keep what still exists
        ss[key] = valid or options[:1]

c1, c2 = st.columns([3, 2])
c1.multiselect("Blocks", blocks, key=State.sp_blocks, help="drawn in the order you pick them")
c2.multiselect("Kinds", kinds, key=State.sp_kinds)
o1, o2, o3 = st.columns(3)
o1.toggle("Linear scale", key=State.sp_linear,
          help=f"linear axes and bins up to the {LINEAR_QUANTILE:.0%} quantile of the eigenvalues (the bulk) "
               "instead of log-log with log bins over all of them")
o2.toggle("Power-law fit and xmin", key=State.sp_fit)
o3.toggle("Marchenko-Pastur (shuffled matrix)", key=State.sp_mp,
          help="the ESD a matrix with the same shape and element variance but no structure would have")

# the user's order: blocks as picked, then kinds as picked within each block
by_cell = table.set_index(["block", "kind"])
cells = [(b, k) for b in ss[State.sp_blocks] for k in ss[State.sp_kinds] if (b, k) in by_cell.index]
if not cells:
    st.info("Pick at least one block and one kind.")
    st.stop()
chosen = by_cell.loc[cells].reset_index()
labels = [f"{b}.{k}" for b, k in cells]
MAX, MAX_SCAN = 8, 4
#: how each xmin method picks xmin among the candidates the diagnostic plots (core.fit)
XMIN_RULES = {"full": "the smallest KS distance D over all candidates (as `powerlaw`)",
              "peak": "the smallest D among the candidates from 0.95 to 1.5 times the peak p of the histogram of "
                      "log λ (AlphaPruning's window), so not necessarily the lowest D of the whole curve; "
                      "all candidates when the window holds none",
              "peak-compat": "the published AlphaPruning code's window around the histogram peak (its lower bound "
                             "compares log λ with λ), so not necessarily the lowest D of the whole curve",
              "mid": "the median eigenvalue, one fit without a scan, so not the lowest D"}


def left_out(n: int, what: str) -> None:
    """Say which picked matrices beyond the first ``n`` are not drawn in ``what``."""
    if len(labels) > n:
        st.caption(f"{what} shows the first {n} of {len(labels)} matrices in the order picked; not drawn: "
                   + ", ".join(f"`{x}`" for x in labels[n:]) + ". Remove picks to see them.")


items = [{"label": label, "row": r, "eigs": analysis.eigs[r["name"]]}
         for label, r in zip(labels, chosen.to_dict("records"))]
settings = {"xmin": analysis.xmin, "m": "+".join(labels[:MAX]), "scale": "lin" if ss[State.sp_linear] else "log"}
show(esd_figure(items[:MAX], linear=ss[State.sp_linear], show_fit=ss[State.sp_fit], show_mp=ss[State.sp_mp],
                clip=LINEAR_QUANTILE),
     "esd", settings=settings, key="esd")
left_out(MAX, "The chart")
st.caption("λ: the eigenvalues of WᵀW (the squared singular values of W, without a 1/N normalisation), as "
           "everywhere in Spectrascope. "
           + (f"Linear scale: the axis ends at the {LINEAR_QUANTILE:.0%} quantile of the eigenvalues (the x-axis "
              "title says how many lie beyond); the log scale shows them all. " if ss[State.sp_linear] else
              "Log bins without an eigenvalue are left out (gaps in the line). ")
           + "One colour per matrix (the legend hides or shows all its lines). Solid: the ESD; dashed: the fitted "
           "power law ρ(λ) ∝ λ^-α from xmin (dotted); dash-dot: the Marchenko-Pastur density of the element-wise "
           "shuffled matrix, long dashes: its bulk edge λ+; eigenvalues beyond λ+ are spikes. α of about 2-6 means "
           "well trained, below 2 very heavy tailed, above 6 random-like. Hover a line for its name.")

h1, h2 = st.columns([6, 1], vertical_alignment="bottom")
h1.subheader("Table")
show_cols = ["name", "rows", "cols", "alpha", "xmin", "D", "sigma", "n_tail", "alpha_hat", "log_norm",
             "log_spectral_norm", "stable_rank", "entropy", "lambda_plus", "num_spikes", "mp_softrank", "status"]
csv_button(chosen[show_cols], "spectra_table", settings={"xmin": analysis.xmin}, where=h2)
st.dataframe(chosen[show_cols], hide_index=True, width="stretch", placeholder="—",
             column_config={c: st.column_config.NumberColumn(format="%.4g", help=metric_help(c)) for c in show_cols[3:-1]})

st.subheader("Fit diagnostics")
if st.toggle("Show D and alpha as functions of xmin", key=State.sp_scan,
             help="every candidate xmin of the `full` method, as powerlaw and WeightWatcher draw them"):
    scans = [(it["label"], cached_xmin_scan(analysis.identity, analysis.xmin, it["row"]["name"],
                                            _eigs=np.asarray(it["eigs"])), it["row"]["xmin"]) for it in items[:MAX_SCAN]]
    if all(s.empty for _, s, _ in scans):
        st.info("No candidate xmin: these spectra have too few positive eigenvalues for a fit.")
    else:
        show(xmin_scan_figure(scans), "xmin_scan", settings={"xmin": analysis.xmin, "m": "+".join(labels[:MAX_SCAN])},
             key="scan")
        left_out(MAX_SCAN, "The diagnostic")
        fitted = ", ".join(f"{label} **{x:.3g}**" for label, s, x in scans if not s.empty and np.isfinite(x))
        st.caption(f"Dashed: the xmin of the fit shown ({fitted}), chosen by the `{analysis.xmin}` method: "
                   f"{XMIN_RULES.get(analysis.xmin, '')}. A flat, low D valley means a clean power-law tail.")
