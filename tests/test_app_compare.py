"""Compare page: pick cached analyses, overlays and deltas, one matrix across sources, the
preselection of a pruned run against its dense model, exports."""
from __future__ import annotations

import numpy as np
import torch
from conftest import tiny_model
from test_app_common import arr, figures, new_app, texts


def _two_analyses():
    """Two cached analyses of tiny models: the second has block 1's q scaled by 3."""
    from core.analysis import analyze
    from core.compare_sources import cached_analyses
    from core.models import wrap_model

    model = tiny_model("llama", seed=5)
    a = analyze(wrap_model(model, label="tiny-a"), device="cpu")
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(3.0)
    b = analyze(wrap_model(model, label="tiny-b"), device="cpu")
    cache = cached_analyses().set_index("identity")
    return cache.loc[a.identity, "label"], cache.loc[b.identity, "label"]


def test_compare_page_overlays_and_deltas_of_two_analyses():
    la, lb = _two_analyses()
    at = new_app("compare", cmp_sources=[la, lb])
    assert not at.exception, at.exception
    assert at.title[0].value == "Compare"
    figs = figures(at)
    assert "against depth" in figs[0]["layout"]["title"]["text"]
    at.selectbox(key="cmp_metric").set_value("log_spectral_norm").run()
    heat = figures(at)[1]
    assert heat["data"][0]["zmid"] == 0 and "Δ log_spectral_norm" in heat["layout"]["title"]["text"]
    z = arr(heat["data"][0]["z"]).copy()               # kinds x blocks
    kinds = list(heat["data"][0]["y"])
    assert np.isclose(z[kinds.index("q"), 1], np.log10(9.0))
    z[kinds.index("q"), 1] = 0
    assert np.abs(z).max() < 1e-9                      # the change is in exactly that cell
    # one matrix across sources: its ESD drawn from both analyses
    at.selectbox(key="cmp_matrix").set_value("model.layers.1.self_attn.q_proj").run()
    esd = [f for f in figures(at) if "ESD" in f["layout"]["title"]["text"]][0]
    esds = [t["name"] for t in esd["data"] if t.get("line", {}).get("shape") == "hv"]   # the histograms
    assert len(esds) == 2 and esds[0].startswith("tiny-a") and esds[1].startswith("tiny-b")
    assert "Every matrix is in every source" in texts(at)
    assert len(at.get("download_button")) == 4


def test_compare_page_asks_for_two_analyses():
    at = new_app("compare")
    assert not at.exception, at.exception
    assert "Pick two or more analyses" in texts(at)


def test_a_pruned_run_is_preselected_against_its_dense_model(tmp_path):
    from core.experiments import prune_and_eval
    from core.spec import PruneSpec
    from core.models import wrap_model

    loaded = wrap_model(tiny_model("llama", seed=6), label="tiny-dense")
    from core.analysis import analyze
    analyze(loaded, device="cpu")
    run = prune_and_eval(PruneSpec(method="magnitude", sparsity=0.5, analyze_output=True, device="cpu"), loaded)
    at = new_app("compare", cmp_runs=[run.run_id])
    assert not at.exception, at.exception
    chosen = at.multiselect(key="cmp_sources").value
    assert len(chosen) == 2 and chosen[0].startswith("tiny-dense") and chosen[1].startswith(f"run {run.run_id}:")
    assert "magnitude" in chosen[1]


# --- issue 21: the ?runs= link seeds once, the heatmap opens a matrix, the latest run, bad CSV ----

def _folder_model_with_runs(n: int):
    """A tiny model loaded from a folder (a job can name it), analysed, and ``n`` pruned runs of
    it whose output was analysed (``--analyze-output``): (loaded, analysis, run ids)."""
    from conftest import byte_tokenizer, saved_tiny
    from core.analysis import analyze
    from core.models import load_model

    folder = saved_tiny("llama")
    byte_tokenizer().save_pretrained(folder)            # the Prune page lists runs with a perplexity
    loaded = load_model(str(folder), device="cpu")
    analysis = analyze(loaded, device="cpu")
    return loaded, analysis, [_pruned_run(loaded, s) for s in (0.3, 0.6)[:n]]


def _pruned_run(loaded, sparsity: float) -> int:
    from core.experiments import prune_and_eval
    from core.spec import EvaluationSpec, PruneSpec

    spec = PruneSpec(method="magnitude", sparsity=sparsity, analyze_output=True, device="cpu",
                     evaluation=EvaluationSpec(evaluate=True, seqlen=32, max_windows=1))
    return prune_and_eval(spec, loaded).run_id


def _runs_link(run_ids):
    from streamlit.testing.v1 import AppTest
    from test_app_common import ROOT

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params = {"runs": ",".join(str(i) for i in run_ids)}
    at.switch_page("pages/compare.py")
    return at.run()


def test_a_runs_link_seeds_the_selection_once_then_the_widget_owns_it(tmp_path):
    loaded, analysis, (r1, r2) = _folder_model_with_runs(2)
    at = _runs_link([r1])
    assert not at.exception, at.exception
    dense, first = at.multiselect(key="cmp_sources").value
    second = next(o for o in at.multiselect(key="cmp_sources").options if o.startswith(f"run {r2}:"))
    at.multiselect(key="cmp_sources").set_value([dense, first, second]).run()
    at.multiselect(key="cmp_sources").set_value([dense, second]).run()       # remove run 1
    at.run()
    assert at.multiselect(key="cmp_sources").value == [dense, second]
    assert "runs" not in at.query_params                                     # consumed: the widget owns it
    # "Analyse and add": a metrics table joins the selection
    table = tmp_path / "extra.csv"
    analysis.save_table(table)
    at.text_input(key="cmp_add").set_value(f"extra={table}")
    next(b for b in at.button if b.label == "Analyse and add").click().run()
    at.run()
    assert not at.exception, at.exception
    assert at.multiselect(key="cmp_sources").value[:2] == [dense, second]
    assert len(at.multiselect(key="cmp_sources").value) == 3
    # a reload (the address written back) keeps the selection
    from test_app_state import reload

    again = reload(at, "compare")
    assert again.multiselect(key="cmp_sources").value[:2] == [dense, second]


def test_the_delta_heatmap_has_a_clickable_marker_per_cell_naming_its_matrix():
    la, lb = _two_analyses()
    at = new_app("compare", cmp_sources=[la, lb])
    heat = figures(at)[1]
    markers = [t for t in heat["data"] if t.get("type") == "scatter"]
    assert markers, "no selectable trace over the heatmap cells (Plotly reports no clicks on heatmap cells)"
    keys = [row[0] for row in markers[0]["customdata"]]
    assert "model.layers.1.self_attn.q_proj" in keys
    assert len(keys) == len(set(keys)) == arr(heat["data"][0]["z"]).size


def test_compare_with_the_dense_model_takes_the_latest_finished_run():
    loaded, analysis, (r1,) = _folder_model_with_runs(1)
    at = new_app("prune", analysis=analysis, loaded=loaded)
    assert not at.exception, at.exception
    r2 = _pruned_run(loaded, 0.6)
    at.run()
    button = next(b for b in at.button if "with the dense model" in b.label)
    assert f"run {r2}" in button.label, button.label                         # says which run
    button.click().run()
    assert not at.exception, at.exception
    chosen = at.multiselect(key="cmp_sources").value
    assert any(c.startswith(f"run {r2}:") for c in chosen), chosen


def test_a_malformed_csv_source_is_one_message(tmp_path):
    """A table that reads but cannot be drawn (no rows: every column untyped) is refused when it
    is added, with one message naming the file; it used to join and end the page in a traceback."""
    la, lb = _two_analyses()
    bad = tmp_path / "bad.csv"
    bad.write_text("name,block,kind,rows,cols,params,alpha,xmin,D,status\n")
    at = new_app("compare", cmp_sources=[la, lb])
    at.text_input(key="cmp_add").set_value(str(bad))
    next(b for b in at.button if b.label == "Analyse and add").click().run()
    assert not at.exception, at.exception
    assert len(at.error) == 1 and "bad.csv" in at.error[0].value, [e.value for e in at.error]
    at.run()
    assert not at.exception, at.exception
    assert at.multiselect(key="cmp_sources").value == [la, lb]


def test_reruns_do_not_rebuild_the_report_and_the_exports():
    """The 5 MB offline report and the tables are built when their button is clicked (deferred
    downloads), not on every rerun of the page."""
    la, lb = _two_analyses()
    at = new_app("compare", cmp_sources=[la, lb])
    buttons = at.get("download_button")
    assert len(buttons) == 4
    eager = [b.proto.label for b in buttons if not b.proto.HasField("deferred_file_id")]
    assert not eager, eager
