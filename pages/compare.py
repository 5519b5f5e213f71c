"""Compare: two or more analyses side by side (models, pruned outputs, checkpoints, adapters):
a metric against depth, per-matrix deltas, the same matrix's ESD across sources, distributions."""
from dataclasses import replace
from pathlib import Path

import pandas as pd
import streamlit as st

from core.analysis import ZERO_RTOL
from core.compare import Entry, compare
from core.compare_sources import analysed_runs, cached_analyses, cache_folder, entries_for, read_cached
from core.quant import quant_alpha_message
from dashboard.errors import shown_errors
from dashboard.compare_figures import (delta_heatmap_figure, depth_overlay_figure, distribution_figure,
                                       esd_overlay_figure, report_html, series_figure)
from dashboard.exports import export_format_control, show
from dashboard.state import METRICS, PAGES, State, assign, setup, to_url

#: this page's session keys (in ``State``: kept across pages, the selection also in the address)
SOURCES, METRIC, TARGET, MATRIX, FIT, ADD, EXTRA = (State.cmp_sources, State.cmp_metric, State.cmp_target,
                                                    State.cmp_matrix, State.cmp_fit, State.cmp_add, State.cmp_extra)
#: the link's run ids to preselect against their dense model (``/compare?runs=3,4``): read once
RUNS_PARAM = "runs"

setup()
ss = st.session_state
if ss[State.cmp_pending] is not None:      # sources added by the button of the previous run
    assign(SOURCES, ss[State.cmp_pending])
    ss[State.cmp_pending] = None
st.title("Compare")
st.caption("Several analyses side by side: a model against its pruned outputs, a fine-tune against its base, "
           "a training run's checkpoints. Matrices are matched by name (by block and kind across families); "
           "a matrix missing from a source is listed, never dropped.")


@st.cache_data(show_spinner=False, max_entries=32)
def load_cached(folder: str):
    return read_cached(folder)


# --- what can be compared ----------------------------------------------------------------
cache = cached_analyses()
runs = analysed_runs()
run_ids = set(runs["identity"])
options: dict[str, tuple[str, object]] = {}
for row in cache.itertuples():
    if row.identity not in run_ids:
        options[row.label] = ("cache", row.folder)
for row in runs.itertuples():
    folder = cache_folder(row.identity, row.xmin)
    if folder.is_dir():
        options[row.label] = ("cache", str(folder))
for label in ss[EXTRA]:
    options[label] = ("extra", label)


def preselect(ids: list[int]) -> list[str]:
    """Each run's analysed output with its dense model's newest analysis (same xmin) first."""
    chosen: list[str] = []
    for rid in ids:
        row = runs[runs["id"] == rid]
        if row.empty:
            st.warning(f"run {rid} has no analysed output (prune with --analyze-output).")
            continue
        r = row.iloc[0]
        dense = cache[(cache["identity"] == r["model_identity"]) & (cache["xmin"] == r["xmin"])]
        chosen += ([dense.iloc[0]["label"]] if not dense.empty else []) + [r["label"]]
    return list(dict.fromkeys(chosen))


def comparable(e: Entry) -> None:
    """ValueError naming ``e``'s source when its table cannot be compared at all (columns missing,
    a block that is not a number, ...): checked when it is added, so that a bad table never joins."""
    try:
        if e.table.empty:
            raise ValueError("it has no rows (no matrices)")
        long = compare([e, replace(e, label=f"{e.label} (check)")]).long
        if text := [m for m in METRICS if m in long.columns and not pd.api.types.is_numeric_dtype(long[m])]:
            raise ValueError(f"the metric columns {', '.join(text)} are not numbers")
    except (ValueError, KeyError, TypeError) as exc:
        what = f"missing column {exc}" if isinstance(exc, KeyError) else str(exc).strip().split("\n")[0]
        name = e.source or e.label
        raise ValueError(what if name in what else f"{name} is not a table of `spectrascope analyze --out` "
                         f"({what})") from exc


# The Prune page's runs, or the link's ``?runs=``: they seed the selection once (the parameter is
# then removed); from there the widget owns it, and ``setup`` writes it into the address.
wanted, ss[State.cmp_runs] = ss[State.cmp_runs], None
if RUNS_PARAM in st.query_params:
    wanted = wanted or [int(x) for x in st.query_params[RUNS_PARAM].split(",") if x.strip().isdigit()]
    del st.query_params[RUNS_PARAM]
if wanted:
    assign(SOURCES, preselect(wanted))
if gone := [s for s in ss[SOURCES] if s not in options]:
    assign(SOURCES, [s for s in ss[SOURCES] if s in options])
    st.warning("Not available here, left out of the selection: " + ", ".join(f"`{s}`" for s in gone)
               + " (an analysis not in this machine's cache, or a source added in another session: add it again).",
               icon=":material/warning:")
to_url()

with st.container(border=True):
    st.multiselect("Analyses to compare (the first is the reference)", list(options), key=SOURCES,
                   help="every analysis in the disk cache (model · xmin · date) and the prune runs whose output "
                        "was analysed (`spectrascope prune ... --analyze-output`)")
    c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
    c1.text_input("Add a source", key=ADD, placeholder="a model folder, .gguf, metrics table, run:ID, "
                  "checkpoints folder, LoRA adapter folder, or LABEL=SOURCE")
    if c2.button("Analyse and add", icon=":material/add:") and ss[ADD].strip():
        with shown_errors(f"Could not add {ss[ADD].strip()!r}") as ok:
            with st.spinner("analysing (cached after the first time)"):
                new = entries_for([ss[ADD].strip()], device=ss[State.device], xmin=ss[State.xmin])
            for e in new:
                comparable(e)
        if ok:
            for e in new:
                ss[EXTRA][e.label] = e
            ss[State.cmp_pending] = list(dict.fromkeys(ss[SOURCES] + [e.label for e in new]))
            st.rerun()

chosen = ss[SOURCES]
if len(chosen) < 2:
    st.info("Pick two or more analyses above. Analyse models on **Home / model**, or prune with "
            "`--analyze-output` to compare a model before and after pruning.", icon=":material/info:")
    st.stop()


def entry(label: str) -> Entry:
    kind, ref = options[label]
    if kind == "extra":
        return ss[EXTRA][label]
    a = load_cached(ref)
    if a is None:
        st.error(f"The cached analysis {label!r} is damaged; analyse it again.")
        st.stop()
    short = label.split(" · ")[0] if not label.startswith("run ") else label
    return Entry(short, a.table, a.eigs, label, "run" if label.startswith("run ") else "model", a.identity, a.xmin)


entries = [entry(label) for label in chosen]
seen: dict[str, int] = {}
for e in entries:   # two analyses of one model (other xmin or date): keep the labels apart
    seen[e.label] = seen.get(e.label, 0) + 1
    if seen[e.label] > 1:
        e.label = f"{e.label} ({seen[e.label]})"
with shown_errors("These analyses cannot be compared (remove one above)", stop=True,
                  errors=(ValueError, KeyError, TypeError)):
    result = compare(entries)
long, deltas = result.long, result.deltas
labels = result.labels

metrics = [m for m in METRICS + ["n_zero"] if m in long.columns and long[m].notna().any()]
if ss[METRIC] not in metrics:
    assign(METRIC, metrics[0])
if ss[TARGET] not in labels[1:]:
    assign(TARGET, labels[1])
c1, c2 = st.columns(2)
metric = c1.selectbox("Metric", metrics, key=METRIC)
target = c2.selectbox("Deltas of", labels[1:], key=TARGET, help=f"minus the reference {labels[0]}")

for e in entries:
    note = quant_alpha_message(e.table, "alpha")
    if note:
        st.warning(f"{e.label}: {note}", icon=":material/warning:")



def picked(event) -> str | None:
    """The matrix key of a clicked point or cell, if any."""
    points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else \
        getattr(getattr(event, "selection", None), "points", []) or []
    for p in points:
        data = p.get("customdata")
        if data is not None:
            return data[0] if isinstance(data, (list, tuple)) else str(data)
    return None


def follow(event, chart: str) -> None:
    """Open the clicked matrix (only when the click is new: a chart keeps its selection)."""
    key = picked(event)
    if key and key != ss[State.cmp_picks].get(chart):
        assign(MATRIX, key)
    ss[State.cmp_picks][chart] = key


export_format_control()
names = "-vs-".join(labels)
ev = show(depth_overlay_figure(long, metric, labels), "compare-depth", settings={"metric": metric}, model=names,
          key="cmp_depth", on_select="rerun", selection_mode="points")
follow(ev, "depth")
ev = show(delta_heatmap_figure(deltas, target, metric, labels[0]), "compare-delta", settings={"metric": metric},
          model=names, key="cmp_delta", on_select="rerun", selection_mode="points")
follow(ev, "delta")
st.caption("Click a point or a cell to open that matrix below. Red: the metric grew against the reference; "
           "blue: it fell; blank cells: the matrix is missing from one of the two.")

st.subheader("One matrix across sources")
keys = list(dict.fromkeys(long["key"]))
if ss[MATRIX] not in keys:
    assign(MATRIX, keys[0])
c1, c2, c3 = st.columns([3, 1, 1], vertical_alignment="bottom")
c1.selectbox("Matrix", keys, key=MATRIX)
c2.toggle("Power-law fit", key=FIT)
eigs_of = {e.label: e.eigs for e in entries}
items = [{"label": r["source"], "row": r, "eigs": eigs_of[r["source"]][r["name"]]}
         for r in long[long["key"] == ss[MATRIX]].to_dict("records") if r["name"] in eigs_of[r["source"]]]
if items:
    show(esd_overlay_figure(items, show_fit=ss[FIT]), "compare-esd", settings={"matrix": ss[MATRIX]}, model=names,
         key="cmp_esd")
else:
    st.info("No eigenvalues for this matrix in these sources (saved tables carry only the metrics).")
zeros = long.groupby("source", sort=False)["n_zero"].sum(min_count=1)
counts = ", ".join(f"{s} {int(n) if pd.notna(n) else '?'}" for s, n in zeros.items())
st.caption(f"Zero eigenvalues: those at or below {ZERO_RTOL:g} × λmax of their matrix (the null space a pruned "
           "or low-rank matrix gains) are counted in `n_zero`, left out of the power-law fit and the metrics, and "
           f"not drawn. In these sources: {counts}.")
if c3.button("Open in Spectra", icon=":material/ssid_chart:"):
    row = long[long["key"] == ss[MATRIX]].iloc[0]
    assign(State.sp_blocks, [int(row["block"])])
    assign(State.sp_kinds, [row["kind"]])
    st.switch_page(PAGES["spectra"][0])
cols = ["source", "name", "alpha", "xmin", "D", "n_tail", "n_zero", "rank", "log_spectral_norm", "status", "quant"]
st.dataframe(long.loc[long["key"] == ss[MATRIX], [c for c in cols if c in long.columns]], hide_index=True,
             width="stretch", placeholder="—")

st.subheader("Summary per kind")
st.dataframe(result.by_kind(metric), hide_index=True, width="stretch", placeholder="—",
             column_config={c: st.column_config.NumberColumn(format="%.4f") for c in ("mean", "change")})

st.subheader("Distributions")
show(distribution_figure(long, metric, labels), "compare-distribution", settings={"metric": metric}, model=names,
     key="cmp_dist")
if long["step"].notna().any() and long["step"].nunique() > 1:
    show(series_figure(long, metric), "compare-series", settings={"metric": metric}, model=names, key="cmp_series")

st.subheader("Missing matrices")
if result.missing.empty:
    st.caption("Every matrix is in every source.")
else:
    st.dataframe(result.missing, hide_index=True, width="stretch", placeholder="—")

st.subheader("Export")
stem = "comparison-" + "-vs-".join(Path(str(x)).name.replace(" ", "_")[:20] for x in labels[:3])
c1, c2, c3, c4 = st.columns(4)
# built when clicked (deferred downloads), not on every rerun: the report alone is 5 MB (plotly.js inline)
c1.download_button("Long table (CSV)", lambda: long.to_csv(index=False).encode(), f"{stem}-long.csv", "text/csv",
                   icon=":material/download:", on_click="ignore")
c2.download_button("Deltas (CSV)", lambda: deltas.to_csv(index=False).encode(), f"{stem}-deltas.csv", "text/csv",
                   icon=":material/download:", on_click="ignore")
c3.download_button("Deltas (Parquet)", lambda: deltas.to_parquet(index=False), f"{stem}-deltas.parquet",
                   "application/octet-stream", icon=":material/download:", on_click="ignore")
c4.download_button("HTML report (offline)", lambda: report_html(result, metric).encode(), f"{stem}.html",
                   "text/html", icon=":material/description:", on_click="ignore")
st.caption("Figures: the camera icon of each chart saves a PNG. The tables and the report are built when "
           "their button is clicked.")
