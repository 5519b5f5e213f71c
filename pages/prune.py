"""Prune & compare: start prune + eval jobs (the CLI in a separate process) and compare perplexities."""
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from core import pruning
from core.experiments import CalibrationSpec, EvaluationSpec, PruneSpec
from core.models import REPORT_NAME, resolve_source
from core.registry import Registry
from dashboard import jobs
from dashboard.figures import perplexity_figure
from dashboard.state import PAGES, State, allocation_label, setup

setup()
ss = st.session_state
st.title("Prune & compare")
st.caption("Pruning runs in a separate process (the `spectrascope` CLI): it survives page switches and "
           "reloads and never blocks the other pages. Every run is recorded in the runs registry.")

loaded, analysis = ss[State.loaded], ss[State.analysis]
source = (ss[State.source] or "demo").strip()
try:
    src = resolve_source(source)
    identity = loaded.identity if loaded is not None else src.identity()
    label = src.label
except (ValueError, FileNotFoundError) as exc:
    st.error(f"The model on Home / model is not usable: {exc}")
    st.stop()

# --- settings ------------------------------------------------------------------------------
allocation = ss[State.a_method]
S, eps, mapping = ss[State.a_sparsity], ss[State.a_epsilon], ss[State.a_mapping]
with st.container(border=True):
    st.markdown(f"**Model** `{label}` · **allocation** {allocation_label(allocation)} at S = {S:.2f}"
                + (f", ε = {eps:.2f}, {mapping} mapping" if allocation == "alpha" else ""))
    st.page_link(PAGES["allocation"][0], label="change the allocation", icon=":material/tune:")
    c1, c2 = st.columns(2)
    c1.radio("Method", pruning.METHODS, key=State.p_method, horizontal=True,
             help="magnitude: smallest |W|; Wanda: |W|·‖X‖ per output row; SparseGPT: OBS with weight updates")
    c2.radio("N:M semi-structured", ("none", *pruning.NM_PATTERNS), key=State.p_nm, horizontal=True,
             help="keep N of every M consecutive weights (the allocation is then ignored)")
    c1, c2, c3 = st.columns(3)
    c1.slider("Calibration windows", 1, 128, key=State.p_calib_n, help="the paper uses 128 windows of 2048 tokens")
    c2.select_slider("Tokens per window", [64, 128, 256, 512, 1024, 2048], key=State.p_seqlen,
                     help="also the evaluation window")
    c3.slider("Evaluation windows", 1, 64, key=State.p_eval_windows, help="fewer windows: a quicker, rougher perplexity")
    st.checkbox("Save the pruned model (Hugging Face folder with a report)", key=State.p_save)
    b1, b2 = st.columns(2)
    start = b1.button("Prune and evaluate", type="primary", icon=":material/play_arrow:")
    baseline = b2.button("Evaluate the dense baseline", icon=":material/speed:")


def metrics_file() -> Path | None:
    """The page's own analysis as the alpha table of the job (no second analysis in the job)."""
    if analysis is None or allocation != "alpha" or loaded is None or analysis.identity != identity:
        return None
    path = jobs.jobs_dir() / f"metrics-{identity.replace(':', '-')}-{analysis.xmin}.parquet"
    if not path.is_file():
        analysis.table.to_parquet(path, index=False)
    return path


def prune_spec() -> PruneSpec:
    """The job's spec: the Allocation page's settings (so the job prunes with exactly the previewed
    ratios) and this page's method, N:M, calibration, evaluation and saving."""
    method, nm = ss[State.p_method], (None if ss[State.p_nm] == "none" else ss[State.p_nm])
    save = (jobs.jobs_dir().parent / "pruned" / f"{method}-{allocation}-S{S:.2f}-{pd.Timestamp.now():%Y%m%d-%H%M%S}"
            if ss[State.p_save] else None)
    return PruneSpec(model=source, method=method, allocation=allocation, sparsity=S,
                     epsilon=eps if allocation == "alpha" else None, metric=ss[State.a_metric], mapping=mapping,
                     r_max=ss[State.a_rmax], dense_kinds=tuple(ss[State.a_dense]), metrics_file=metrics_file(),
                     nm=nm, calibration=CalibrationSpec(nsamples=ss[State.p_calib_n], seqlen=ss[State.p_seqlen]),
                     evaluation=EvaluationSpec(evaluate=True, seqlen=ss[State.p_seqlen],
                                               max_windows=ss[State.p_eval_windows]),
                     device=ss[State.device], save=save)


if start:
    try:
        spec = prune_spec()
    except (ValueError, FileNotFoundError) as exc:
        st.error(f"These settings cannot be pruned: {exc}", icon=":material/error:")
    else:
        what = f"{spec.method} {spec.nm or spec.allocation} S={S:.2f}"
        ss[State.p_job] = jobs.start(spec.to_argv(), what).id
if baseline:
    # `spectrascope eval` has no spec of its own in core: its options are written here
    ss[State.p_job] = jobs.start(["eval", "--model", source, "--device", ss[State.device],
                                  "--seqlen", str(ss[State.p_seqlen]), "--max-windows", str(ss[State.p_eval_windows])],
                                 "dense baseline").id


# --- jobs (refreshed every second while one runs) --------------------------------------------
def any_running() -> bool:
    return any(j.status() in ("running", "cancelling") for j in jobs.list_jobs(5))


@st.fragment(run_every=1.0 if any_running() else None)
def job_panel() -> None:
    recent = jobs.list_jobs(5)
    if not recent:
        return
    st.subheader("Jobs")
    finished_now = False
    for job in recent:
        status = job.status()
        with st.container(border=True):
            c1, c2 = st.columns([5, 1], vertical_alignment="center")
            c1.markdown(f"**{job.title}** · {status} · started {pd.Timestamp(job.info['started'], unit='s'):%H:%M:%S}")
            if status in ("running", "cancelling"):
                frac, msg = job.progress()
                c1.progress(frac, text=msg)
                if c2.button("Cancel", key=f"cancel_{job.id}", icon=":material/stop:"):
                    job.cancel()
            elif status == "failed":
                c1.error(job.error(), icon=":material/error:")
            elif status == "done":
                result = job.result() or {}
                p = result.get("perplexity")
                ppl = p.get("perplexity") if isinstance(p, dict) else p
                c1.caption(f"run {result.get('run_id')}" + (f" · perplexity {ppl:.2f}" if ppl is not None else ""))
                if job.id == ss[State.p_job] and not ss.get(f"seen_{job.id}"):
                    ss[f"seen_{job.id}"] = True
                    finished_now = True
    if finished_now:
        st.rerun()


job_panel()

# --- results from the registry --------------------------------------------------------------
registry = Registry()
stopped = registry.query(status="interrupted", model_identity=identity)
if not stopped.empty:
    st.caption(f"Interrupted (the process ended without finishing, e.g. killed): run "
               f"{', '.join(map(str, stopped['id']))}. `spectrascope runs` lists every run; `spectrascope clean` "
               "removes what killed runs left behind.")
runs = registry.compare(model_identity=identity)
st.subheader("Results")
if runs.empty:
    st.info("No finished run with a perplexity for this model yet: start one above (the dense baseline too).")
    st.stop()

dense = runs[runs["kind"] == "eval"]
pruned = runs[runs["kind"] == "prune"].copy()
pruned["setting"] = pruned["method"] + " · " + pruned["allocation"]
fig = perplexity_figure(pruned, float(dense["perplexity"].iloc[-1]) if not dense.empty else None)
st.plotly_chart(fig, width="stretch", key="ppl")


def vs_uniform(row: pd.Series) -> float:
    base = pruned[(pruned["method"] == row["method"]) & (pruned["allocation"] == "uniform")
                  & np.isclose(pruned["sparsity"].fillna(-1), row["sparsity"] if pd.notna(row["sparsity"]) else -2)
                  & (pruned["eval_dataset"] == row["eval_dataset"])]
    if row["allocation"] == "uniform" or base.empty:
        return np.nan
    return 100.0 * (row["perplexity"] / base["perplexity"].iloc[-1] - 1.0)


table = pd.concat([dense.assign(method="dense", allocation="-"), pruned], ignore_index=True)
table["vs uniform %"] = table.apply(vs_uniform, axis=1) if not pruned.empty else np.nan
table["report"] = table["output_dir"].map(lambda d: f"{d}/{REPORT_NAME}" if isinstance(d, str) and d else "")
st.dataframe(table[["id", "method", "allocation", "sparsity", "epsilon", "nm", "achieved_sparsity", "perplexity",
                    "vs uniform %", "eval_dataset", "eval_windows", "prune_seconds", "output_dir", "report"]],
             hide_index=True, width="stretch", key="runs",
             column_config={"perplexity": st.column_config.NumberColumn(format="%.2f"),
                            "vs uniform %": st.column_config.NumberColumn(format="%+.1f %%"),
                            "achieved_sparsity": st.column_config.NumberColumn("achieved", format="%.3f")})
