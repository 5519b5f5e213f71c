"""Sweep & tune: a sweep (methods x allocations x sparsities x epsilons) and AlphaPruning's tuning
(epsilon x xmin x metric on held-out calibration text) as background CLI jobs; their perplexity
pivot and tuning heatmap, and the tuned allocation handed to the Allocation page."""
from dataclasses import replace

import numpy as np
import streamlit as st

from core import pruning
from core.allocation import MAPPINGS
from core.fit import XMIN_METHODS
from core.spec import CalibrationSpec, EvaluationSpec, PruneSpec
from core.choices import DEFAULT_METRIC_COLUMNS
from core.sweeps import pivot
from core.tuning import refit
from dashboard import jobs
from dashboard.errors import shown_errors
from dashboard.exports import csv_button, export_format_control, show
from dashboard.figures import kind_order
from dashboard.state import ALLOCATIONS, METRICS, PAGES, State, allocation_label, assign, job_model, setup
from dashboard.sweeps import RAY_HELP, sweep_argv, sweep_table, tune_argv, tune_figure

setup()
export_format_control()
ss = st.session_state
_SEEDED = State.s_seeded      # the Allocation page's settings the sweep's were last set from
_HANDED = State.s_handed      # set by "Use this allocation": the whole page reruns once (its card is a fragment)
st.title("Sweep & tune")
st.caption("Many prune runs at once, as one background job (the `spectrascope` CLI in a separate process: it "
           "survives page switches and reloads). Every run lands in the runs registry, so **Prune & compare** "
           "charts them too.")
source, identity, label = job_model()
analysis = ss[State.analysis]
analysis = analysis if analysis is not None and analysis.identity == identity else None

# The Allocation page's settings are the defaults here: copied whenever they change there.
seed = {State.s_epsilons: [round(float(ss[State.a_epsilon]), 2)], State.s_metric: ss[State.a_metric],
        State.s_xmin: analysis.xmin if analysis is not None else ss[State.xmin], State.s_mapping: ss[State.a_mapping],
        State.s_rmax: ss[State.a_rmax], State.s_dense: list(ss[State.a_dense])}
if ss.get(_SEEDED) != seed:
    for key, value in seed.items():
        assign(key, value)
    ss[_SEEDED] = seed


def grid(step: float, top: float, chosen: list[float]) -> list[float]:
    """Options ``0, step, ..., top`` plus the values already chosen, sorted."""
    return sorted({round(float(v), 2) for v in [*np.arange(0.0, top + 1e-9, step), *chosen]})


kinds = kind_order(analysis.table) if analysis is not None else list(ss[State.s_dense])
metrics = [m for m in METRICS if analysis is None or m in analysis.table.columns]
with st.container(border=True):
    st.markdown(f"**Model** `{label}`")
    jobs.size_controls()
    with st.expander("Allocation settings (from the Allocation page; changed here for these jobs only)"):
        c1, c2, c3 = st.columns(3)
        c1.selectbox("Metric (sweep)", metrics + [m for m in [ss[State.s_metric]] if m not in metrics],
                     key=State.s_metric, help="AlphaPruning's score column; tuning scores the columns chosen below")
        c2.selectbox("xmin method (sweep)", XMIN_METHODS, key=State.s_xmin)
        c3.radio("Mapping", MAPPINGS, key=State.s_mapping, horizontal=True)
        c1, c2 = st.columns(2)
        c1.slider("r_max", 0.5, 0.999, step=0.001, key=State.s_rmax, format="%.3f")
        c2.multiselect("Dense kinds (kept at 0)", kinds + [k for k in ss[State.s_dense] if k not in kinds],
                       key=State.s_dense)
    st.text_input("Ray address (optional)", key=State.s_ray, placeholder="empty: no Ray", help=RAY_HELP)


def count(n: int, noun: str) -> str:
    """``1 epsilon``, ``2 epsilons``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_count(methods: list, allocations: list, sparsities: list, epsilons: list) -> str:
    """``12 runs: 2 methods × 2 allocations × 3 sparsities`` (AlphaPruning counted once per epsilon:
    ``(uniform + AlphaPruning × 2 epsilons)``), and the dense baseline the sweep evaluates too."""
    per = {a: len(epsilons) if a == "alpha" else 1 for a in allocations}
    n = len(methods) * sum(per.values()) * len(sparsities)
    if all(k == 1 for k in per.values()):
        allocs = count(len(allocations), "allocation")
    else:
        allocs = "(" + " + ".join(allocation_label(a) + (f" × {count(k, 'epsilon')}" if k != 1 else "")
                                  for a, k in per.items()) + ")"
    sizes = f"{count(len(methods), 'method')} × {allocs} × {len(sparsities)} sparsit{'y' if len(sparsities) == 1 else 'ies'}"
    return f"{count(n, 'run')}: {sizes}, and the dense model evaluated once with the same settings"


def base_spec(method: str, sparsity: float) -> PruneSpec:
    """The spec every run of a job starts from: this page's model, sizes and allocation settings."""
    seqlen = ss[State.p_seqlen]
    return PruneSpec(model=source, method=method, sparsity=sparsity, metric=ss[State.s_metric], xmin=ss[State.s_xmin],
                     mapping=ss[State.s_mapping], r_max=ss[State.s_rmax], dense_kinds=tuple(ss[State.s_dense]),
                     calibration=CalibrationSpec(nsamples=ss[State.p_calib_n], seqlen=seqlen),
                     evaluation=EvaluationSpec(evaluate=True, seqlen=seqlen, max_windows=ss[State.p_eval_windows]),
                     device=ss[State.device])


matrices = analysis.table if analysis is not None else None     # what a job's allocation is checked against


def launch(make_argv, title: str, out: str) -> None:
    with shown_errors("This job cannot start"):
        ss[State.s_job] = jobs.start(make_argv(), title, out=out).id


sweep_tab, tune_tab = st.tabs(["Sweep", "Tune AlphaPruning"])
with sweep_tab:
    c1, c2 = st.columns(2)
    c1.multiselect("Methods", pruning.METHODS, key=State.s_methods)
    c2.multiselect("Allocations", ALLOCATIONS, key=State.s_allocations, format_func=allocation_label)
    c1.multiselect("Sparsities", grid(0.05, 0.95, ss[State.s_sparsities]), key=State.s_sparsities,
                   format_func=lambda s: f"{s:.0%}")
    c2.multiselect("Epsilons (AlphaPruning)", grid(0.05, 0.9, ss[State.s_epsilons]), key=State.s_epsilons,
                   help="one AlphaPruning run per epsilon; the Allocation page's epsilon by default")
    st.caption(run_count(ss[State.s_methods], ss[State.s_allocations], ss[State.s_sparsities], ss[State.s_epsilons]))
    if st.button("Start the sweep", type="primary", icon=":material/play_arrow:", key="start_sweep"):
        methods, allocs, sparsities = ss[State.s_methods], ss[State.s_allocations], sorted(ss[State.s_sparsities])
        launch(lambda: sweep_argv(base_spec(methods[0] if methods else "wanda", min(sparsities, default=0.5)),
                                  methods=methods, allocations=allocs, sparsities=sparsities,
                                  epsilons=sorted(ss[State.s_epsilons]), ray=ss[State.s_ray], matrices=matrices),
               f"sweep {','.join(methods)} x {','.join(allocs)} x {','.join(f'{s:g}' for s in sparsities)}",
               "sweep")
with tune_tab:
    st.caption("Chooses AlphaPruning's epsilon, xmin method and metric for one method and sparsity: every "
               "combination is pruned and scored by perplexity on held-out calibration text (never the evaluation "
               "text). Mapping, r_max and dense kinds are the allocation settings above.")
    c1, c2 = st.columns(2)
    c1.radio("Method", pruning.METHODS, key=State.p_method, horizontal=True, help="shared with Prune & compare")
    c2.slider("Mean sparsity S", 0.0, 0.95, step=0.01, key=State.a_sparsity, help="shared with the Allocation page")
    c1.multiselect("Epsilons", grid(0.05, 0.9, ss[State.t_epsilons]), key=State.t_epsilons)
    c2.multiselect("xmin methods", XMIN_METHODS, key=State.t_xmins,
                   help="the eigenvalues are computed once; each xmin method refits the power laws")
    c1.multiselect("Metric columns", list(dict.fromkeys([*DEFAULT_METRIC_COLUMNS, *metrics])), key=State.t_metrics)
    c2.slider("Held-out windows", 1, 32, key=State.t_holdout, help="windows of held-out calibration text scored")
    sizes = [len(ss[State.t_epsilons]), len(ss[State.t_xmins]), len(ss[State.t_metrics])]
    st.caption(f"At most {count(int(np.prod(sizes)), 'pruned model')} ({count(sizes[0], 'epsilon')} × "
               f"{count(sizes[1], 'xmin method')} × {count(sizes[2], 'metric column')}), each scored on "
               f"{count(ss[State.t_holdout], 'held-out window')} of {ss[State.p_seqlen]} tokens.")
    if st.button("Start tuning", type="primary", icon=":material/play_arrow:", key="start_tune"):
        method, S = ss[State.p_method], ss[State.a_sparsity]
        launch(lambda: tune_argv(base_spec(method, S), epsilons=sorted(ss[State.t_epsilons]), xmins=ss[State.t_xmins],
                                 metrics=ss[State.t_metrics], holdout_windows=ss[State.t_holdout], ray=ss[State.s_ray],
                                 matrices=matrices),
               f"tune {method} S={S:.2f}", "tune.csv")


def use_tuning(result: dict) -> None:
    """The winner as the Allocation page's allocation A (and Prune's method); the session's
    analysis refit with the winning xmin method, so that the alpha behind the ratios is the tuned one."""
    best = result["best"]
    assign(State.a_method, "alpha")
    assign(State.a_epsilon, round(float(best["epsilon"]), 2))
    assign(State.a_auto, False)                  # this tuned epsilon, not another tuning
    assign(State.a_metric, best["metric"])
    assign(State.a_sparsity, round(float(result["sparsity"]), 2))
    assign(State.p_method, result["method"])
    if best["xmin"] in XMIN_METHODS:
        assign(State.xmin, best["xmin"])
        current = ss[State.analysis]
        if current is not None and current.identity == identity and current.xmin != best["xmin"]:
            ss[State.analysis] = replace(current, table=refit(current, best["xmin"], device="cpu"),
                                         xmin=best["xmin"], cached=False)
        if current is not None and current.identity == identity:
            assign(State.a_source, "loaded model")
    ss[_HANDED] = True


def in_use(best: dict) -> bool:
    """Whether the Allocation page's allocation is this winner (AlphaPruning, its epsilon, metric and xmin)."""
    current = ss[State.analysis]
    xmin_kept = current is None or best["xmin"] not in XMIN_METHODS or current.xmin == best["xmin"]
    return (ss[State.a_method] == "alpha" and ss[State.a_metric] == best["metric"] and xmin_kept and not ss[State.a_auto]
            and round(float(ss[State.a_epsilon]), 2) == round(float(best["epsilon"]), 2))


def finished(where, job: jobs.Job, result: dict) -> None:
    """A finished sweep's perplexity pivot and comparison keys; a finished tuning's heatmap."""
    with where:
        if job.command == "sweep":
            table = sweep_table(job.file("sweep.csv"), result)
            if table.empty:
                st.caption("the sweep wrote no table")
                return
            st.dataframe(pivot(table), hide_index=True, width="stretch", key=f"pivot_{job.id}", placeholder="—")
            for key, settings in table[["key", "settings"]].drop_duplicates().itertuples(index=False):
                st.caption(f"comparison key `{key}`: {settings}")
            csv_button(table, "sweep", model=label, key=f"csv_{job.id}")
            return
        if not result.get("rows"):
            st.caption("the tuning returned no scores")
            return
        table, best = sweep_table(job.file("tune.csv"), result), result["best"]
        title = f"held-out perplexity · {result['method']} at S = {float(result['sparsity']):.2f}"
        show(tune_figure(table, best, title), "tune", model=label, key=f"tune_{job.id}",
             settings=f"{result['method']}_S{float(result['sparsity']):.2f}")
        st.markdown(f"**Best**: epsilon {float(best['epsilon']):g}, xmin {best['xmin']}, metric {best['metric']} "
                    f"(perplexity {float(best['perplexity']):.4g} on {result.get('holdout_tokens')} held-out tokens)")
        st.caption(f"comparison key `{result.get('key')}`: {result.get('settings')}")
        c1, c2 = st.columns([1, 1])
        with c1:
            csv_button(table, "tune", model=label, key=f"csv_{job.id}")
        c2.button("Use this allocation", key=f"use_{job.id}", icon=":material/check:", on_click=use_tuning,
                  args=(result,), help="AlphaPruning with this epsilon, metric and xmin on Allocation and Prune")
        if in_use(best):
            c2.caption("In use on Allocation and Prune & compare")
        if ss.pop(_HANDED, False):        # the settings above (seeded from Allocation) follow the new allocation
            st.rerun(scope="app")


jobs.panel(("sweep", "tune"), finished, follow=ss[State.s_job])
st.page_link(PAGES["allocation"][0], label="Allocation (what Prune uses)", icon=":material/tune:")
st.page_link(PAGES["prune"][0], label="Prune & compare: the runs charted", icon=":material/content_cut:")
