"""Issue 21 on the dashboard: the sensitivity view on Allocation (plot, correlation, the sensitivity
allocation, computed as a background job), the sweep's run count, an impossible allocation refused
at once, export names with epsilon, no "None" cells, and a perplexity axis with readable ticks."""
from __future__ import annotations

import pandas as pd
import pytest
from test_app_common import arr, figures, new_app, texts
from test_app_prune import wait_for_jobs

from conftest import byte_tokenizer, saved_tiny


@pytest.fixture(scope="module")
def tiny():
    """A tiny llama folder with a byte tokenizer, loaded and analysed (7 kinds x 2 blocks)."""
    from core.analysis import analyze
    from core.models import load_model

    folder = saved_tiny()
    byte_tokenizer().save_pretrained(folder)
    loaded = load_model(folder)
    return loaded, analyze(loaded, xmin="full", device="cpu")


def sensitivity_figure(at) -> dict:
    return next(f for f in figures(at) if "delta" in str(f["layout"].get("yaxis", {}).get("title", "")))


def test_sensitivity_view_plots_the_measurement_against_alpha_with_its_correlation(tiny):
    from core.sensitivity import SensitivitySettings, correlate, sensitivity_for

    loaded, analysis = tiny
    sens = sensitivity_for(loaded, SensitivitySettings(method="magnitude", sparsity=0.6, per="matrix"),
                           device="cpu")
    at = new_app("allocation", analysis=analysis, loaded=loaded, a_method="sensitivity", a_mapping="matrix",
                 a_sparsity=0.6, p_method="magnitude")
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    fig = sensitivity_figure(at)
    points = [t for t in fig["data"] if t.get("mode", "").startswith("markers")]
    assert sum(len(arr(t["x"])) for t in points) == len(sens.table) == 14
    report = correlate(sens, analysis.table, "alpha")
    rho = report.overall.rho
    shown = texts(at) + str(fig["layout"]["title"])
    assert f"{rho:+.2f}" in shown and "95%" in shown and "p " in shown
    assert float(next(m.value for m in at.metric if m.label == "Parameter-weighted mean")) == 0.6
    ratios = at.dataframe[0].value
    assert ratios["metric"].notna().all()          # each matrix's measured delta_loss


def test_sensitivity_is_computed_by_a_background_job_then_shown(tiny):
    from core.sensitivity import SensitivitySettings, read_sensitivity
    from dashboard import jobs

    loaded, analysis = tiny
    settings = SensitivitySettings(method="magnitude", sparsity=0.55, per="block")
    assert read_sensitivity(loaded.identity, settings) is None
    at = new_app("allocation", analysis=analysis, loaded=loaded, a_method="sensitivity", a_mapping="block",
                 a_sparsity=0.55, p_method="magnitude")
    assert not at.exception, at.exception
    button = next(b for b in at.button if b.label == "Compute sensitivities")
    button.click().run()
    assert not at.exception, at.exception
    job = jobs.list_jobs(1, ("sensitivity",))[0]
    cmd = job.info["cmd"]
    assert cmd[cmd.index("--sparsity") + 1] == "0.55" and cmd[cmd.index("--per") + 1] == "block"
    at = wait_for_jobs(at)
    at.run()
    assert not at.exception, at.exception
    assert job.status() == "done", job.error()
    assert read_sensitivity(loaded.identity, settings) is not None
    sensitivity_figure(at)
    assert float(next(m.value for m in at.metric if m.label == "Parameter-weighted mean")) == 0.55


def test_sweep_says_how_many_runs_before_it_starts():
    at = new_app("sweep", s_methods=["magnitude", "wanda"], s_allocations=["uniform", "alpha"],
                 s_sparsities=[0.5, 0.6, 0.7], s_epsilons=[0.3])
    assert not at.exception, at.exception
    assert "12 runs: 2 methods × 2 allocations × 3 sparsities" in texts(at)
    at.multiselect(key="s_epsilons").set_value([0.2, 0.3]).run()
    assert "18 runs: 2 methods × (uniform + AlphaPruning × 2 epsilons) × 3 sparsities" in texts(at)


def test_prune_refuses_an_impossible_allocation_at_once(tiny, tmp_path, monkeypatch):
    from dashboard import jobs

    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path))
    loaded, analysis = tiny
    unreachable = dict(a_method="uniform", a_sparsity=0.95, a_dense=["gate", "up", "down"])
    at = new_app("allocation", analysis=analysis, loaded=loaded, **unreachable)
    assert any("reachable" in e.value for e in at.error)              # the preview says why
    at = new_app("prune", analysis=analysis, loaded=loaded, **unreachable)
    next(b for b in at.button if b.label == "Prune and evaluate").click().run()
    assert not at.exception, at.exception
    assert any("reachable" in e.value and "gate,up,down" in e.value for e in at.error), [e.value for e in at.error]
    assert jobs.list_jobs(5, ("prune",)) == []                         # no job started


def test_allocation_exports_name_method_sparsity_epsilon_and_mapping(tiny):
    import json

    loaded, analysis = tiny
    at = new_app("allocation", analysis=analysis, loaded=loaded, a_method="alpha", a_epsilon=0.25,
                 a_mapping="matrix", a_compare=True)
    assert not at.exception, at.exception
    names = [json.loads(c.proto.config)["toImageButtonOptions"]["filename"] for c in at.get("plotly_chart")]
    names.append(at.get("download_button")[0].proto.help)
    for name in names:
        assert all(part in name for part in ("AlphaPruning", "S0.70", "eps0.25", "matrix")), name


def test_tables_show_missing_values_as_a_dash(tiny, tmp_path, monkeypatch):
    from core.registry import Registry

    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path))
    loaded, analysis = tiny
    reg = Registry()
    run = reg.start("prune", model="tiny", model_identity=loaded.identity, method="wanda", allocation="uniform",
                    sparsity=0.5, calibration={"dataset": "wiki", "nsamples": 8, "seqlen": 128, "seed": 0})
    reg.finish(run, perplexity=30.0, eval_dataset="wiki", eval_seqlen=128, eval_windows=8)
    for page in ("allocation", "prune"):
        at = new_app(page, analysis=analysis, loaded=loaded)
        assert not at.exception, at.exception
        assert at.dataframe, page
        for table in at.dataframe:
            assert table.proto.placeholder == "—", page


def test_perplexity_axis_has_readable_ticks():
    from dashboard.results import results_figure

    runs = pd.DataFrame({"kind": ["eval", "prune", "prune", "prune"], "method": ["dense", "wanda", "wanda", "wanda"],
                         "allocation": [None, "uniform", "uniform", "uniform"], "sparsity": [None, 0.5, 0.6, 0.7],
                         "perplexity": [18.2, 27.0, 41.0, 190.0]})
    axis = results_figure(runs).to_dict()["layout"]["yaxis"]
    ticks = [float(v) for v in axis["tickvals"]]
    for value in (20, 30, 40, 50, 100, 200):
        assert value in ticks, ticks
    assert 5 <= len(ticks) <= 12
    assert axis["type"] == "log"
