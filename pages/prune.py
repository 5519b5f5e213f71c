"""Prune & compare: start prune + eval jobs (the CLI in a separate process) and compare perplexities
like with like (runs grouped by their evaluation and calibration settings)."""
import json
from pathlib import Path

import pandas as pd
import streamlit as st

from core import pruning
from core.config import home
from core.spec import CalibrationSpec, EvaluationSpec, PruneSpec
from core.models import REPORT_NAME
from core.registry import Registry
from dashboard import jobs
from dashboard.errors import shown_errors
from dashboard.results import file_name, results_figure, with_baselines
from dashboard.exports import export_format_control, show
from dashboard.state import PAGES, State, allocation_label, assign, job_model, setup

setup()
export_format_control()
ss = st.session_state
st.title("Prune & compare")
st.caption("Pruning runs in a separate process (the `spectrascope` CLI): it survives page switches and "
           "reloads and never blocks the other pages. Every run is recorded in the runs registry.")

# --- the model: the one loaded on Home (the text box only while nothing is loaded) -----------
loaded, analysis = ss[State.loaded], ss[State.analysis]
source, identity, label = job_model()

# --- settings ------------------------------------------------------------------------------
allocation = ss[State.a_method]
S, eps, mapping = ss[State.a_sparsity], ss[State.a_epsilon], ss[State.a_mapping]
auto = allocation == "alpha" and bool(ss[State.a_auto])
with st.container(border=True):
    st.markdown(f"**Model** `{label}` · **allocation** {allocation_label(allocation)} at S = {S:.2f}"
                + (f", ε = {'auto (tuned when the run starts)' if auto else f'{eps:.2f}'}, {mapping} mapping"
                   if allocation == "alpha" else ""))
    st.page_link(PAGES["allocation"][0], label="change the allocation", icon=":material/tune:")
    c1, c2 = st.columns(2)
    c1.radio("Method", pruning.METHODS, key=State.p_method, horizontal=True,
             help="magnitude: smallest |W|; Wanda: |W|·‖X‖ per output row; SparseGPT: OBS with weight updates")
    c2.radio("N:M semi-structured", ("none", *pruning.NM_PATTERNS), key=State.p_nm, horizontal=True,
             help="keep N of every M consecutive weights (the allocation is then ignored)")
    jobs.size_controls()
    st.checkbox("Save the pruned model (Hugging Face folder with a report)", key=State.p_save,
                help=f"into {home() / 'pruned'}, a new folder per run")
    st.checkbox("Analyse the pruned model (its spectra, for Compare)", key=State.p_analyze,
                help="after pruning, the spectra of the pruned matrices are computed and cached, so the run can be "
                     "compared with the dense model on Compare (adds the time of one analysis)")
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


def save_folder(method: str, what: str) -> Path:
    """A new folder ``$SPECTRASCOPE_HOME/pruned/<model>-<method>-<allocation>-S<S>-<time>[-n]``."""
    stem = file_name(label.split("/")[-1].split(" (")[0], method, what, f"S{S:.2f}",
                     f"{pd.Timestamp.now():%Y%m%d-%H%M%S}", ext="")
    folder, n = home() / "pruned" / stem, 1
    while folder.exists():
        n += 1
        folder = folder.with_name(f"{stem}-{n}")
    return folder


def prune_spec() -> PruneSpec:
    """The job's spec: the Allocation page's settings (so the job prunes with exactly the previewed
    ratios) and this page's method, N:M, calibration, evaluation and saving."""
    method, nm = ss[State.p_method], (None if ss[State.p_nm] == "none" else ss[State.p_nm])
    return PruneSpec(model=source, method=method, allocation=allocation, sparsity=S,
                     epsilon=("auto" if auto else eps) if allocation == "alpha" else eps if allocation == "sensitivity"
                     else None, metric=ss[State.a_metric], mapping=mapping,
                     r_max=ss[State.a_rmax], dense_kinds=tuple(ss[State.a_dense]), metrics_file=metrics_file(),
                     nm=nm, calibration=CalibrationSpec(nsamples=ss[State.p_calib_n], seqlen=ss[State.p_seqlen]),
                     evaluation=EvaluationSpec(evaluate=True, seqlen=ss[State.p_seqlen],
                                               max_windows=ss[State.p_eval_windows]),
                     device=ss[State.device], save=save_folder(method, nm or allocation) if ss[State.p_save] else None,
                     analyze_output=bool(ss[State.p_analyze]), xmin=analysis.xmin if analysis is not None else "peak")


def start_eval(dataset: str, seqlen: int, windows: int, bos: str = "auto") -> None:
    # `spectrascope eval` has no spec of its own in core: its options are written here
    ss[State.p_job] = jobs.start(["eval", "--model", source, "--device", ss[State.device], "--dataset", dataset,
                                  "--seqlen", str(seqlen), "--max-windows", str(windows), "--bos", bos],
                                 "dense baseline").id


if start:
    with shown_errors("This pruning job cannot start"):
        spec = prune_spec()
        if loaded is not None or analysis is not None:    # an allocation this model cannot have: refused now
            spec.check_reachable(loaded.matrices if loaded is not None else analysis.table)
        what = f"{spec.method} {spec.nm or spec.allocation} S={S:.2f}"
        ss[State.p_job] = jobs.start(spec.to_argv(), what).id
if baseline:
    with shown_errors("The dense baseline cannot start"):
        start_eval("wiki", ss[State.p_seqlen], ss[State.p_eval_windows])


# --- jobs (refreshed every second while one runs) --------------------------------------------
def saved_model(where, result: dict) -> None:
    """The saved folder of a finished job and its report."""
    out = result.get("output_dir")
    if not out:
        return
    where.markdown(f"saved to `{out}`")
    report = Path(out) / REPORT_NAME
    with where.expander(f"report `{REPORT_NAME}`", icon=":material/description:"):
        try:
            st.json(json.loads(report.read_text()), expanded=1)
        except (OSError, ValueError) as exc:
            st.caption(f"cannot read {report}: {exc}")


def finished(where, job: jobs.Job, result: dict) -> None:
    p = result.get("perplexity")
    ppl = p.get("perplexity") if isinstance(p, dict) else p
    where.caption(f"run {result.get('run_id')}" + (f" · perplexity {ppl:.2f}" if ppl is not None else ""))
    saved_model(where, result)


jobs.panel(("prune", "eval", "owl-scores"), finished, follow=ss[State.p_job])

# --- results from the registry, like with like -------------------------------------------------
st.subheader("Results")
registry = Registry(read_only=True)     # the page only reads the registry; its jobs record their runs
stopped = registry.query(status="interrupted", model_identity=identity)
if not stopped.empty:
    st.caption(f"Interrupted (the process ended without finishing, e.g. killed): run "
               f"{', '.join(map(str, stopped['id']))}. `spectrascope runs` lists every run; `spectrascope clean` "
               "removes what killed runs left behind.")
runs = registry.compare(model_identity=identity)
if runs.empty:
    st.info("No finished run with a perplexity for this model yet: start one above (the dense baseline too).")
    st.stop()
runs = with_baselines(runs, registry)
st.caption("Runs are compared only with runs of the same settings: the same evaluation text, window length and "
           "number of windows (and, for pruned runs, the same calibration). \"vs dense\" and \"vs uniform\" use "
           "the baseline of the same settings.")


def bos_of(mode: object) -> str:
    return mode if isinstance(mode, str) and mode else "auto"


def uniform_spec(row: pd.Series) -> PruneSpec:
    """The uniform run that completes the comparison of ``row`` (same method, sparsity and settings)."""
    run = registry.get(int(row["id"]))
    calib = run["calibration"] if isinstance(run["calibration"], dict) else {}
    return PruneSpec(model=source, method=row["method"], allocation="uniform", sparsity=float(row["sparsity"]),
                     calibration=CalibrationSpec(dataset=calib.get("dataset", "wiki"),
                                                 nsamples=int(calib.get("nsamples", ss[State.p_calib_n])),
                                                 seqlen=int(calib.get("seqlen", row["eval_seqlen"])),
                                                 seed=int(calib.get("seed", 0)), bos=bos_of(run.get("calib_bos"))),
                     evaluation=EvaluationSpec(evaluate=True, dataset=row["eval_dataset"],
                                               seqlen=int(row["eval_seqlen"]), max_windows=int(row["eval_windows"]),
                                               bos=bos_of(run.get("eval_bos"))),
                     device=ss[State.device])


pruned = runs[runs["kind"] == "prune"]
groups = list(dict.fromkeys(pruned["key"].iloc[::-1]))          # newest setting first
groups += [k for k in dict.fromkeys(runs.loc[runs["kind"] == "eval", "eval_key"].iloc[::-1])
           if k not in set(pruned["eval_key"])]                  # dense runs without pruned runs
eval_key_of = dict(zip(runs["key"], runs["eval_key"]))
for i, key in enumerate(groups):
    members = runs[(runs["key"] == key) | ((runs["kind"] == "eval") & (runs["eval_key"] == eval_key_of[key]))]
    group_pruned = members[members["kind"] == "prune"]
    settings = (group_pruned if not group_pruned.empty else members)["settings"].iloc[-1]
    with st.container(border=True):
        st.markdown(f"**{settings}**" + (" · latest settings" if i == 0 else ""))
        if not group_pruned.empty:
            fig = results_figure(members, title=f"perplexity against sparsity · {settings}")
            show(fig, "perplexity", settings=settings, model=label.split("/")[-1], key=f"ppl_{i}")
        if not group_pruned.empty and (members["kind"] == "eval").sum() == 0:
            last = group_pruned.iloc[-1]
            if st.button("Evaluate the dense baseline with these settings", key=f"dense_{i}", icon=":material/speed:"):
                with shown_errors("The dense baseline cannot start") as ok:
                    start_eval(last["eval_dataset"], int(last["eval_seqlen"]), int(last["eval_windows"]),
                               bos_of(registry.get(int(last["id"])).get("eval_bos")))
                if ok:
                    st.rerun()
        missing = group_pruned[(group_pruned["allocation"] != "uniform") & group_pruned["vs uniform %"].isna()
                               & group_pruned["sparsity"].notna() & group_pruned["nm"].isna()]
        if not missing.empty:
            last = missing.iloc[-1]
            what = f"{last['method']} uniform S={last['sparsity']:.2f}"
            if st.button(f"Run the uniform baseline ({what}) with these settings", key=f"uniform_{i}",
                         icon=":material/play_arrow:"):
                with shown_errors("The uniform baseline cannot start") as ok:
                    ss[State.p_job] = jobs.start(uniform_spec(last).to_argv(), what).id
                if ok:
                    st.rerun()

table = runs.assign(method=runs["method"].where(runs["kind"] == "prune", "dense"),
                    allocation=runs["allocation"].where(runs["kind"] == "prune", "-"))
table["report"] = table["output_dir"].map(lambda d: f"{d}/{REPORT_NAME}" if isinstance(d, str) and d else "")
columns = ["id", "method", "allocation", "sparsity", "epsilon", "nm", "achieved_sparsity", "perplexity", "vs dense %",
           "vs uniform %", "settings", "prune_seconds", "output_dir", "report"]
st.dataframe(table[columns], hide_index=True, width="stretch", key="runs", placeholder="—",
             column_config={"perplexity": st.column_config.NumberColumn(format="%.2f"),
                            "vs dense %": st.column_config.NumberColumn(format="%+.1f %%"),
                            "vs uniform %": st.column_config.NumberColumn(format="%+.1f %%"),
                            "achieved_sparsity": st.column_config.NumberColumn("achieved", format="%.3f")})
st.download_button("Download the runs as CSV", table[columns + ["key"]].to_csv(index=False).encode(),
                   file_name=file_name(label.split("/")[-1], "runs", f"{len(groups)}-settings"), mime="text/csv",
                   icon=":material/download:", on_click="ignore")

# --- before and after pruning: the runs whose output was analysed, one click from Compare ------
done = registry.query(kind="prune", status="done", model_identity=identity)
analysed = done[done["allocation_params"].map(lambda p: isinstance(p, dict) and "analysis" in p)]
if not analysed.empty:
    st.subheader("How did pruning change each layer's spectrum?")
    labels = {int(r.id): f"run {r.id}: {r.method} {allocation_label(r.allocation)} "
              + (f"N:M {r.nm}" if isinstance(r.nm, str) and r.nm else f"S={float(r.sparsity):.2f}")
              for r in analysed.itertuples()}
    newest = max(labels)
    if ss[State.p_compare_newest] != newest:     # a run finished since: it is the one compared
        ss[State.p_compare_newest] = newest
        assign(State.p_compare_runs, [newest])
    if any(r not in labels for r in ss[State.p_compare_runs]):
        assign(State.p_compare_runs, [r for r in ss[State.p_compare_runs] if r in labels])
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    picked = c1.multiselect("Pruned runs whose output was analysed", list(labels), format_func=labels.get,
                            key=State.p_compare_runs, help="the newest is picked when it finishes")
    which = ", ".join(f"run {r}" for r in picked) or "a run"
    if c2.button(f"Compare {which} with the dense model", icon=":material/compare:", disabled=not picked):
        ss[State.cmp_runs] = list(picked)     # Compare preselects the dense analysis and these runs
        st.switch_page(PAGES["compare"][0])
