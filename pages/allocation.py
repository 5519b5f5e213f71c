"""Allocation: tune the layer-wise sparsity (AlphaPruning, uniform, OWL, measured sensitivity) with an
instant preview; where the sensitivities are measured, each block's sensitivity against its alpha."""
from pathlib import Path

import pandas as pd
import streamlit as st

from core.allocation import CSV_COLUMNS, MAPPINGS, SCORED, allocate
from core.owlcache import OwlSettings, cache_path, read_owl_scores
from core.sensitivity import SensitivitySettings, correlate, read_sensitivity
from core.sensitivity import cache_path as sensitivity_path
from core.profiles import list_profiles, load_profile
from core.quant import quant_alpha_message
from dashboard import jobs
from dashboard.errors import shown_errors
from dashboard.exports import export_format_control, show
from dashboard.figures import block_ratios_figure, correlation_text, fmt_params, kind_order, ratios_figure
from dashboard.figures import sensitivity_figure
from dashboard.results import LEGEND_BELOW, file_name
from dashboard.state import (ALLOCATIONS, METRICS, PAGES, State, allocation_label, loaded_source, require_analysis,
                             setup)

setup()
ss = st.session_state
_FALLBACK = State.a_fallback   # (table shown, the user's metric, the metric used instead)
st.title("Allocation")
st.caption("How much of each matrix to prune so that the parameter-weighted mean is the target sparsity S. "
           "AlphaPruning prunes matrices with larger alpha (less well trained) more. The allocation set here "
           "(A) is what **Prune & compare** uses.")

analysis, loaded = ss[State.analysis], ss[State.loaded]
sources = ["loaded model"] + [f"profile: {p}" for p in list_profiles()]   # never a silent switch to a profile
if ss[State.a_source] not in sources:
    ss[State.a_source] = sources[0]
st.selectbox("Metrics from", sources, key=State.a_source,
             help="the analysed model, or a published LLaMA alpha profile (for models too large to load here)")
if ss[State.a_source] == "loaded model":
    if analysis is None:
        st.caption("The published LLaMA profiles (**Metrics from** above) work without a model.")
    analysis = require_analysis()      # or why there is none (a hint, or the address's model) and stop
    st.caption(f"Power-law fits with xmin **{analysis.xmin}** (set on Home / model, or by a tuning on Sweep & tune).")
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
             disabled=ss[State.a_method] not in SCORED,
             help="block: every matrix takes its block's mean metric (the paper's default); matrix: its own")
    c1, c2, c3 = st.columns(3)
    c1.slider("Mean sparsity S", 0.0, 0.95, step=0.01, key=State.a_sparsity)
    c2.slider("epsilon (tau range)", 0.0, 0.9, step=0.01, key=State.a_epsilon,
              disabled=ss[State.a_method] not in SCORED,
              help="ratios span about S(1 - eps) .. S(1 + eps); the paper tunes 0.2-0.5")
    c3.slider("r_max", 0.5, 0.999, step=0.001, key=State.a_rmax, format="%.3f",
              help="no matrix is pruned beyond r_max")
    st.toggle("Prune with epsilon auto", key=State.a_auto, disabled=ss[State.a_method] != "alpha",
              help="when the pruning run starts, fast tuning on held-out calibration text (never the evaluation "
                   "text) chooses epsilon and falls back to uniform (epsilon 0) when no epsilon > 0 beats it; the "
                   "preview below shows the slider's epsilon")
    st.multiselect("Dense kinds (kept at 0)", kinds, key=State.a_dense,
                   help="these kinds are not pruned; the others carry the whole budget")


def owl_settings() -> OwlSettings:
    """OWL's calibration: the windows set on Prune & compare, so the prune job computes the same scores."""
    return OwlSettings(nsamples=ss[State.p_calib_n], seqlen=ss[State.p_seqlen])


@st.fragment(run_every=1.0)
def owl_job(job_id: str, what: str = "OWL statistics") -> None:
    """A statistics job's progress; a full rerun when it has ended (the page then reads the cache)."""
    job = next((j for j in jobs.list_jobs(20) if j.id == job_id), None)
    status = job.status() if job is not None else "gone"
    if status in ("running", "cancelling"):
        frac, msg = job.progress()
        st.progress(frac, text=f"{what}: {msg}")
        st.caption("This runs in a separate process: the other pages stay usable.")
    elif job_id not in ss[State.seen_jobs]:
        ss[State.seen_jobs].add(job_id)
        st.rerun()


def owl_block_scores():
    """OWL's outlier share per block from the disk cache, or None with a button that computes
    them in a background job (``spectrascope owl-scores``)."""
    if ss[State.a_source] != "loaded model" or loaded is None:
        st.info("OWL needs the loaded model (its activations on calibration text); pick the loaded model above.")
        return None
    settings = owl_settings()
    scores = read_owl_scores(identity, settings)
    if scores is not None:
        st.caption(f"OWL statistics of {settings.label()} (the calibration set on Prune & compare).")
        return scores
    job_id = ss[State.owl].get(str(cache_path(identity, settings)))
    job = next((j for j in jobs.list_jobs(20) if j.id == job_id), None) if job_id else None
    if job is not None and job.status() in ("running", "cancelling"):
        owl_job(job.id)
        return None
    if job is not None and job.status() in ("failed", "interrupted"):
        st.error(f"OWL statistics failed: {job.error()}", icon=":material/error:")
    st.info(f"OWL needs calibration statistics: the share of outlier Wanda scores in each block, on "
            f"{settings.label()} (the calibration set on Prune & compare). They are computed once and kept on disk.")
    source = loaded_source()
    if st.button("Compute OWL statistics", icon=":material/calculate:", disabled=source is None):
        args = ["owl-scores", "--model", source, "--calib", settings.dataset, "--nsamples", str(settings.nsamples),
                "--seqlen", str(settings.seqlen), "--seed", str(settings.seed), "--device", ss[State.device]]
        with shown_errors("The OWL statistics cannot be computed") as ok:
            ss[State.owl][str(cache_path(identity, settings))] = jobs.start(args, "OWL statistics").id
        if ok:
            st.rerun()
    return None


def sensitivity_settings(mapping: str) -> SensitivitySettings:
    """The measurement a prune job's sensitivity allocation reads (``core.sensitivity.settings_for``):
    Prune's method at S, per ``mapping``, on the default calibration text."""
    return SensitivitySettings(method=ss[State.p_method], sparsity=float(ss[State.a_sparsity]), per=mapping)


_OFFERED: set[str] = set()      # this run's sensitivity caches whose button is drawn (A and B may share one)


def measured_sensitivity(mapping: str):
    """The measured sensitivities for these settings from the disk cache, or None with a button
    that measures them in a background job (``spectrascope sensitivity``)."""
    if ss[State.a_source] != "loaded model" or loaded is None:
        st.info("The sensitivity allocation needs the loaded model (each part is pruned alone and its held-out "
                "loss measured); pick the loaded model above.")
        return None
    settings = sensitivity_settings(mapping)
    found = read_sensitivity(identity, settings)
    path = str(sensitivity_path(identity, settings))
    if found is not None or path in _OFFERED:
        return found
    _OFFERED.add(path)
    job_id = ss[State.sens].get(path)
    job = next((j for j in jobs.list_jobs(20) if j.id == job_id), None) if job_id else None
    if job is not None and job.status() in ("running", "cancelling"):
        owl_job(job.id, "sensitivities")
        return None
    if job is not None and job.status() in ("failed", "interrupted"):
        st.error(f"The sensitivity measurement failed: {job.error()}", icon=":material/error:")
    part = "block" if mapping == "block" else "matrix kind of each block"
    st.info(f"The sensitivity allocation needs measured sensitivities: each {part} pruned alone with "
            f"{settings.label()} (Prune's method and S), and the rise in held-out loss. Measured once (minutes on a "
            "CPU for a 135M model) and kept on disk.")
    source = loaded_source()
    if st.button("Compute sensitivities", icon=":material/calculate:", disabled=source is None,
                 key=f"sens_{Path(path).stem}"):
        args = ["sensitivity", source, "--method", settings.method, "--sparsity", repr(settings.sparsity),
                "--per", settings.per, "--calib", settings.dataset, "--seed", str(settings.seed), "--bos",
                settings.bos, "--device", ss[State.device]]
        with shown_errors("The sensitivities cannot be measured") as ok:
            ss[State.sens][path] = jobs.start(args, f"sensitivities ({settings.method} S={settings.sparsity:g} "
                                                    f"per {settings.per})").id
        if ok:
            st.rerun()
    return None


def compute(method: str, mapping: str, epsilon: float):
    """(ratios table, weighted mean, notes) for the current settings, or None after a message."""
    scores = owl_block_scores() if method == "owl" else None
    if method == "owl" and scores is None:
        return None
    scored = table
    if method == "sensitivity":
        sens = measured_sensitivity(mapping)
        if sens is None:
            return None
        scored = table.assign(delta_loss=sens.per_matrix(table))
    try:
        a = allocate(scored, sparsity=ss[State.a_sparsity], method=method, metric=ss[State.a_metric], mapping=mapping,
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
m2.metric("Parameter-weighted mean", f"{mean:.4f}",
          delta=f"{mean - S:+.1e}" if abs(mean - S) > 1e-9 else None, delta_color="off",
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
        c3.slider("B epsilon", 0.0, 0.9, step=0.01, key=State.b_epsilon, disabled=ss[State.b_method] not in SCORED,
                  help="AlphaPruning's epsilon of B (uniform has none)")
        other = compute(ss[State.b_method], ss[State.b_mapping], ss[State.b_epsilon])
        if other is not None:
            series[f"B: {allocation_label(ss[State.b_method])}"] = by_block(other[0])

figs = [block_ratios_figure(series, S)]
figs += [ratios_figure(ratios, S, kinds, "A: ratio per matrix" if other is not None else "ratio per matrix")]
figs += [ratios_figure(other[0], S, kinds, "B: ratio per matrix")] if other is not None else []
for fig in figs:
    fig.update_layout(legend=LEGEND_BELOW)
model = (analysis.model if ss[State.a_source] == "loaded model" else ss[State.a_source].removeprefix("profile: "))
settings = [allocation_label(ss[State.a_method]), f"S{S:.2f}"]    # every export names what it holds
settings += [ss[State.a_metric]] if ss[State.a_method] == "alpha" else []
settings += [f"eps{ss[State.a_epsilon]:g}", ss[State.a_mapping]] if ss[State.a_method] in SCORED else []
settings += [f"rmax{ss[State.a_rmax]:g}"] + (["dense-" + "-".join(ss[State.a_dense])] if ss[State.a_dense] else [])
export_format_control()
show(figs[0], "ratios-by-block", settings="_".join(settings), model=model, key="blocks")
for where, fig, key in zip(st.columns(len(figs) - 1), figs[1:], ("ra", "rb")):
    show(fig, f"ratios-{key}", settings="_".join(settings), model=model, key=key, where=where)
csv_name = file_name(model.split("/")[-1], "allocation", *settings)
cols = [c for c in CSV_COLUMNS if c in ratios.columns]
with st.expander("Ratios table"):
    st.dataframe(ratios, hide_index=True, width="stretch", placeholder="—")
c1, c2 = st.columns(2)
c1.download_button("Download allocation A as CSV", ratios[cols].to_csv(index=False).encode(), file_name=csv_name,
                   mime="text/csv", icon=":material/download:", on_click="ignore", help=f"saves {csv_name}")
c2.page_link(PAGES["prune"][0], label="Prune with allocation A", icon=":material/content_cut:")

# --- allocation A as an llm-compressor recipe (core.recipes; docs/recipes.md) ---
from core.recipes import RECIPE_METHODS, build_recipe  # noqa: E402  (kept with its block)

r1, r2 = st.columns([1, 2])
recipe_method = r1.radio("llm-compressor pruner", RECIPE_METHODS, horizontal=True, key=State.a_recipe_method,
                         help="the recipe's modifier: WandaPruningModifier or SparseGPTModifier")
try:
    recipe = build_recipe(ratios, recipe_method, label=f"{model}, {', '.join(settings)}")
except ValueError as exc:
    r2.caption(f":material/block: no llm-compressor recipe: {exc}")
else:
    recipe_name = file_name(model.split("/")[-1], "recipe", *settings, recipe_method, ext="yaml")
    r2.download_button("Download allocation A as an llm-compressor recipe", recipe.text().encode(),
                       file_name=recipe_name, mime="application/x-yaml", icon=":material/download:",
                       on_click="ignore", help=f"saves {recipe_name}: each matrix a target of {recipe.modifier} "
                       "with its own sparsity")


# --- does the metric predict what matters? The measured sensitivities against it ----------------
def sensitivity_view() -> None:
    """Where the sensitivities of these settings are measured: each part's rise in held-out loss
    against its metric, with Spearman's correlation (over all parts and per kind)."""
    if ss[State.a_source] != "loaded model" or loaded is None:
        return
    mapping, metric = ss[State.a_mapping], ss[State.a_metric]
    sens = read_sensitivity(identity, sensitivity_settings(mapping))
    st.subheader(f"Does {metric} predict what matters?")
    if sens is None:
        st.caption(f"Not measured for {sensitivity_settings(mapping).label()}: choose the sensitivity allocation "
                   "above to measure each part's rise in held-out loss when it alone is pruned.")
        return
    report = correlate(sens, table, metric)
    part = "block" if mapping == "block" else "matrix kind of each block"
    st.caption(f"Each {part} pruned alone ({sens.settings.label()}): "
               f"the rise in held-out loss (dense {sens.dense_loss:.3f}; never the evaluation text) against its mean "
               f"{metric}. AlphaPruning prunes a higher {metric} more, so its premise is a falling cloud: a negative "
               f"ρ supports it, a positive one contradicts it. {correlation_text(report.overall)}.")
    fig = sensitivity_figure(report.table, metric, report.overall)
    fig.update_layout(legend=LEGEND_BELOW)
    show(fig, "sensitivity", settings=f"{sens.settings.method}_S{sens.settings.sparsity:g}_{mapping}_{metric}",
         model=model, key="sensitivity")
    if len(report.correlations) > 1:
        st.dataframe(pd.DataFrame([c.to_dict() for c in report.correlations]), hide_index=True, width="stretch",
                     placeholder="—", column_config={k: st.column_config.NumberColumn(format="%+.3f")
                                                     for k in ("rho", "low", "high")})


sensitivity_view()
