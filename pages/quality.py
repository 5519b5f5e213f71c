"""Layer quality: a metric over blocks and kinds, against depth, its distribution, the flagged matrices."""
import streamlit as st

from core.quant import quant_alpha_message
from dashboard.exports import csv_button, export_format_control, show
from dashboard.figures import depth_figure, distribution_figure, heatmap_figure, kind_order
from dashboard.state import METRICS, PAGES, State, analysis_page, assign

#: a matrix a click asked to open, (block, kind); set by a selection callback, used once below
OPEN = State.q_open

ss = st.session_state
analysis = analysis_page("Layer quality")
export_format_control()
table = analysis.table
kinds = kind_order(table)
metrics = [m for m in METRICS if m in table.columns and table[m].notna().any()]
if ss[State.q_metric] not in metrics:
    ss[State.q_metric] = metrics[0]
metric = st.selectbox("Metric", metrics, key=State.q_metric,
                      help="alpha: power-law exponent of the ESD tail (2-6 well trained); alpha_hat = alpha·log10 λmax; "
                           "log_norm, log_spectral_norm: scale; stable_rank, entropy, mp_softrank: effective rank")


def open_in_spectra(block: int, kind: str) -> None:
    assign(State.sp_blocks, [int(block)])
    assign(State.sp_kinds, [kind])
    st.switch_page(PAGES["spectra"][0])


def clicked(key: str) -> None:
    """Selection callback of the heatmap ("heatmap": a cell marker) and the flagged table
    ("flagged": a row): remember the matrix to open (once; the page body switches)."""
    selection = ss[key].selection
    if key == "heatmap":
        points = [p for p in selection.get("points", []) if p.get("curve_number") == 1]
        if points:
            ss[OPEN] = (int(points[0]["x"]), str(points[0]["y"]))
    elif selection.get("rows"):
        pick = flagged.iloc[selection["rows"][0]]
        ss[OPEN] = (int(pick["block"]), str(pick["kind"]))


if ss.get(OPEN):
    open_in_spectra(*ss.pop(OPEN))

pivot = table.pivot_table(index="block", columns="kind", values=metric, aggfunc="first").reindex(columns=kinds)
show(heatmap_figure(pivot, metric), "heatmap", settings={"metric": metric, "xmin": analysis.xmin}, key="heatmap",
     on_select=lambda: clicked("heatmap"), selection_mode="points")
st.caption("Click a cell to open that matrix in Spectra."
           + (" Colours are clipped to alpha 1.5-8: oranges below 2 (very heavy tailed), blues across the "
              "well-trained band 2-6 (darker: larger alpha), greys above 6 (random-like)." if metric == "alpha" else ""))

c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
blocks = sorted(int(b) for b in table["block"].unique())
if ss[State.q_block] not in blocks:
    ss[State.q_block] = blocks[0]
if ss[State.q_kind] not in kinds:
    ss[State.q_kind] = kinds[0]
c1.selectbox("Block", blocks, key=State.q_block)
c2.selectbox("Kind", kinds, key=State.q_kind)
cell = table[(table["block"] == ss[State.q_block]) & (table["kind"] == ss[State.q_kind])]
if c3.button("Open in Spectra", type="primary", icon=":material/ssid_chart:"):
    open_in_spectra(ss[State.q_block], ss[State.q_kind])
if not cell.empty:
    r = cell.iloc[0]
    extra = f" · alpha = {r['alpha']:.3g}" if metric != "alpha" else ""
    quant = f" · quantization {r['quant']}" if isinstance(r.get("quant"), str) and r["quant"] else ""
    st.caption(f"`{r['name']}`: {metric} = {r[metric]:.4g}{extra} · status: {r['status']}{quant}")

if "quant" in table.columns and table["quant"].notna().any():
    by_type = table.groupby("quant")[metric].median()
    st.caption("Quantization of the source (GGUF): " + " · ".join(
        f"{q}: {int((table['quant'] == q).sum())} matrices, median {metric} {v:.3g}" for q, v in by_type.items()))
    if note := quant_alpha_message(table, metric):
        st.info(note, icon=":material/info:")
left, right = st.columns(2)
show(depth_figure(table, metric, kinds), "depth", settings={"metric": metric, "xmin": analysis.xmin}, where=left)
show(distribution_figure(table, metric, kinds), "distribution", settings={"metric": metric, "xmin": analysis.xmin},
     where=right)

h1, h2 = st.columns([6, 1], vertical_alignment="bottom")
h1.subheader("Flagged matrices")
status = table["status"].astype(str)
flagged = table[~status.str.lower().isin({"ok", "well trained", "well-trained", "good"})]
st.caption("Over-trained (alpha < 2: very heavy tailed), under-trained (alpha > 6: random-like) and matrices "
           "without a fit. Select a row to open it in Spectra.")
if flagged.empty:
    st.success("No matrix is flagged: every alpha is in the well-trained range.")
else:
    counts = flagged["status"].astype(str).str.replace(r"^no fit.*", "no fit", regex=True).value_counts()
    st.write(" · ".join(f"**{k}**: {v}" for k, v in counts.items()))
    listed = flagged[["name", "block", "kind", "alpha", "D", "n_tail", "status"]
                     + (["quant"] if "quant" in flagged.columns and flagged["quant"].notna().any() else [])]
    csv_button(listed, "flagged", settings={"xmin": analysis.xmin}, where=h2)
    st.dataframe(listed, hide_index=True, width="stretch", placeholder="—", on_select=lambda: clicked("flagged"),
                 selection_mode="single-row", key="flagged")
