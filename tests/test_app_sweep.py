"""Sweep & tune page: a real sweep job and a real tuning job on the demo model (smallest settings),
their pivot and heatmap drawn from the jobs' output, the sweep's runs in the registry, and the tuned
allocation handed to the Allocation page; the command lines the page writes parse as the CLI's."""
import importlib.util

import numpy as np
import pandas as pd
import pytest
from test_app_common import arr, figures, new_app, texts
from test_app_prune import wait_for_jobs

from core.cli import build_parser
from core.spec import CalibrationSpec, EvaluationSpec, PruneSpec
from dashboard import sweeps

#: the smallest calibration and evaluation: 2 windows of 64 tokens
TINY = dict(p_calib_n=2, p_seqlen=64, p_eval_windows=2)


def newest(command: str):
    from dashboard import jobs

    return jobs.list_jobs(1, (command,))[0]


def test_sweep_and_tune_command_lines_parse_with_the_allocation_settings():
    base = PruneSpec(metric="alpha_hat", xmin="mid", mapping="matrix", r_max=0.9, dense_kinds=("k", "v"),
                     calibration=CalibrationSpec(nsamples=4, seqlen=64),
                     evaluation=EvaluationSpec(evaluate=True, seqlen=64, max_windows=3), device="cpu")
    argv = sweeps.sweep_argv(base, methods=["magnitude", "wanda"], allocations=["uniform", "alpha"],
                             sparsities=[0.5, 0.6], epsilons=[0.1, 0.3])
    args = build_parser().parse_args(argv)
    spec = PruneSpec.from_args(args)
    assert (args.methods, args.allocations, args.sparsities, args.epsilons) == (
        "magnitude,wanda", "uniform,alpha", "0.5,0.6", "0.1,0.3")
    assert (spec.metric, spec.xmin, spec.mapping, spec.r_max, spec.dense_kinds) == ("alpha_hat", "mid", "matrix",
                                                                                    0.9, ("k", "v"))
    assert (spec.calibration.nsamples, spec.evaluation.max_windows) == (4, 3)
    argv = sweeps.tune_argv(base, epsilons=[0.2], xmins=["peak", "full"], metrics=["alpha"], holdout_windows=2)
    args = build_parser().parse_args(argv)
    assert (args.epsilons, args.xmins, args.metrics_cols, args.holdout_windows) == ("0.2", "peak,full", "alpha", 2)
    assert PruneSpec.from_args(args).dense_kinds == ("k", "v")
    with pytest.raises(ValueError, match="sparsity"):          # above r_max: refused before any job starts
        sweeps.sweep_argv(base, methods=["magnitude"], allocations=["uniform"], sparsities=[0.95], epsilons=[])
    with pytest.raises(ValueError, match="at least one"):
        sweeps.tune_argv(base, epsilons=[], xmins=["peak"], metrics=["alpha"], holdout_windows=1)


def test_ray_address(monkeypatch):
    if importlib.util.find_spec("ray") is not None:
        assert sweeps.ray_args("") == [] and sweeps.ray_args("local") == ["--ray"]
        assert sweeps.ray_args(" ray://head:10001 ") == ["--ray", "ray://head:10001"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)     # an install without the extra
    assert sweeps.ray_args("  ") == []
    with pytest.raises(ValueError, match=r"spectrascope\[cluster\]"):
        sweeps.ray_args("local")


def test_missing_ray_is_a_message_not_a_failing_job(monkeypatch, demo):
    from dashboard import jobs

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    before = len(jobs.list_jobs(100))
    at = new_app("sweep", loaded=demo, s_ray="local", **TINY)
    at.button(key="start_sweep").click().run()
    assert not at.exception, at.exception
    assert any("Ray is not installed" in e.value for e in at.error), [e.value for e in at.error]
    assert len(jobs.list_jobs(100)) == before


def test_sweep_job_shows_its_pivot_and_lands_in_the_registry(demo, demo_analysis_full):
    at = new_app("sweep", analysis=demo_analysis_full, loaded=demo, a_epsilon=0.3, a_mapping="matrix",
                 s_methods=["magnitude"], s_allocations=["uniform", "alpha"], s_sparsities=[0.5], **TINY)
    assert not at.exception, at.exception
    # the Allocation page's settings are this page's defaults
    assert at.multiselect(key="s_epsilons").value == [0.3] and at.radio(key="s_mapping").value == "matrix"
    assert at.selectbox(key="s_xmin").value == "full"            # the analysis's xmin
    at.button(key="start_sweep").click().run()
    assert "sweep magnitude x uniform,alpha x 0.5" in texts(at)
    at = wait_for_jobs(at)
    assert not at.exception, at.exception
    job = newest("sweep")
    assert job.status() == "done", job.error()
    written = pd.read_csv(job.file("sweep.csv"))                # what the CLI wrote into the job's folder
    assert list(written["method"]) == ["dense", "magnitude", "magnitude"]
    assert len(at.dataframe) == 1                                # the one finished sweep: its pivot
    shown = at.dataframe[0].value.set_index("setting")
    assert list(shown.columns) == ["0%", "50%"]                  # dense at sparsity 0
    ppl = dict(zip(written["method"] + " " + written["allocation"], written["perplexity"]))
    assert shown.loc["dense", "0%"] == pytest.approx(ppl["dense -"])
    assert shown.loc["magnitude uniform", "50%"] == pytest.approx(ppl["magnitude uniform"])
    assert shown.loc["magnitude alpha (eps 0.3)", "50%"] == pytest.approx(ppl["magnitude alpha"])
    assert shown.loc["dense", "0%"] < shown.loc["magnitude uniform", "50%"]
    assert f"comparison key `{written['key'].iloc[-1]}`" in texts(at)
    # the runs are in the registry: Prune & compare charts and lists them
    at.switch_page("pages/prune.py").run()
    assert not at.exception, at.exception
    assert set(written["run_id"]) <= set(at.dataframe[0].value["id"])


def test_tune_job_heatmap_and_use_this_allocation(demo, demo_analysis_full):
    at = new_app("sweep", analysis=demo_analysis_full, loaded=demo, p_method="magnitude", a_sparsity=0.5,
                 a_epsilon=0.25, a_metric="alpha_hat", t_epsilons=[0.1, 0.4], t_xmins=["peak"], t_metrics=["alpha"],
                 t_holdout=1, **TINY)
    at.button(key="start_tune").click().run()
    assert "tune magnitude S=0.50" in texts(at)
    at = wait_for_jobs(at, timeout=400)
    assert not at.exception, at.exception
    job = newest("tune")
    assert job.status() == "done", job.error()
    scores = pd.read_csv(job.file("tune.csv"))                  # the CLI's --out of the job
    assert len(scores) == 2 and set(scores["xmin"]) == {"peak"}
    heat = next(t for f in figures(at) for t in f["data"] if t["type"] == "heatmap")
    assert list(heat["x"]) == ["0.1", "0.4"] and list(heat["y"]) == ["peak · alpha"]
    np.testing.assert_allclose(10 ** arr(heat["z"]).ravel(), scores["perplexity"], rtol=1e-9)
    assert heat["colorbar"]["ticktext"]                          # a log colour scale with readable ticks
    best = scores.loc[scores["perplexity"].idxmin()]
    star = next(t for f in figures(at) for t in f["data"] if t.get("name", "").startswith("best"))
    assert list(star["x"]) == [f"{best['epsilon']:g}"] and list(star["y"]) == ["peak · alpha"]

    assert "In use on Allocation and Prune & compare" not in texts(at)
    at.button(key=f"use_{job.id}").click().run()
    assert not at.exception, at.exception
    assert "In use on Allocation and Prune & compare" in texts(at)
    at.switch_page("pages/allocation.py").run()
    assert not at.exception, at.exception
    assert at.radio(key="a_method").value == "alpha"
    assert at.slider(key="a_epsilon").value == pytest.approx(best["epsilon"]) != 0.25
    assert at.selectbox(key="a_metric").value == "alpha"
    assert "xmin **peak**" in texts(at)                           # was full: the analysis refit with peak
    assert at.session_state["analysis"].xmin == "peak"
    at.switch_page("pages/prune.py").run()                        # Prune prunes with it
    assert not at.exception, at.exception
    assert f"ε = {best['epsilon']:.2f}" in texts(at) and at.radio(key="p_method").value == "magnitude"


def _widgets(at) -> dict:
    """The session-state widgets of the last run: {key: element}."""
    from dashboard.state import State

    kinds = ("multiselect", "slider", "select_slider", "radio", "selectbox", "text_input", "checkbox", "toggle")
    return {w.key: w for kind in kinds for w in at.get(kind) if w.key in State.DEFAULTS}


def test_a_rerun_sends_no_setting_back_to_the_browser(monkeypatch):
    """A widget key set from code goes back to the browser with the run (``set_value``) and
    overwrites a change the user made while that run was in flight: the browser then shows one
    value and "Start tuning" sends another. Only a page's first run (kept values restored) may."""
    from dashboard import jobs

    started = []
    monkeypatch.setattr(jobs, "start", lambda argv, title, out=None: started.append(argv) or
                        jobs.Job("fake", jobs.jobs_dir(), {"title": title, "command": argv[0]}))
    at = new_app("sweep")
    assert not at.exception, at.exception
    first = _widgets(at)
    assert {"t_epsilons", "t_metrics", "t_holdout", "p_calib_n"} <= set(first)
    assert all(w.proto.set_value for w in first.values())        # the page's first run restores them all
    at.multiselect(key="t_epsilons").set_value([0.1, 0.3])
    at.multiselect(key="t_metrics").set_value(["alpha"])
    at.slider(key="t_holdout").set_value(1).run()
    assert not at.exception, at.exception
    pushed = [key for key, w in _widgets(at).items() if w.proto.set_value]
    assert pushed == [], pushed
    at.button(key="start_tune").click().run()
    argv = " ".join(started[-1])
    assert "--epsilons 0.1,0.3 --xmins peak --metrics-cols alpha --holdout-windows 1" in argv, argv
    assert [key for key, w in _widgets(at).items() if w.proto.set_value] == []
