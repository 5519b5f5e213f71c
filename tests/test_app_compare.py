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
