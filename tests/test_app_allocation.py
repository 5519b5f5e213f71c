"""Allocation page: the preview follows every setting, the weighted mean stays S, profiles,
comparison, CSV download, clear errors."""
from test_app_common import arr, figures, new_app


def metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


def block_curve(at, i=0):
    return arr(figures(at)[0]["data"][i]["y"])


def test_sparsity_slider_changes_the_preview(demo_analysis_full):
    at = new_app("allocation", analysis=demo_analysis_full)
    assert not at.exception, at.exception
    assert float(metric(at, "Parameter-weighted mean")) == 0.7
    before = block_curve(at)
    at.slider(key="a_sparsity").set_value(0.5).run()
    assert float(metric(at, "Parameter-weighted mean")) == 0.5
    after = block_curve(at)
    assert abs(after.mean() - 0.5) < 0.05 and abs(before.mean() - 0.7) < 0.05


def test_epsilon_and_method_change_the_spread(demo_analysis_full):
    at = new_app("allocation", analysis=demo_analysis_full)
    wide = block_curve(at)
    at.slider(key="a_epsilon").set_value(0.1).run()
    narrow = block_curve(at)
    assert narrow.max() - narrow.min() < wide.max() - wide.min()
    at.radio(key="a_method").set_value("uniform").run()
    flat = block_curve(at)
    assert flat.max() - flat.min() < 1e-9


def test_dense_kinds_and_comparison(demo_analysis_full):
    at = new_app("allocation", analysis=demo_analysis_full)
    at.multiselect(key="a_dense").set_value(["k", "v"]).run()
    ratios = at.dataframe[0].value
    assert (ratios.loc[ratios["kind"].isin(["k", "v"]), "ratio"] == 0).all()
    assert float(metric(at, "Parameter-weighted mean")) == 0.7
    at.toggle(key="a_compare").set_value(True).run()
    names = [t["name"] for t in figures(at)[0]["data"]]
    assert names == ["A: AlphaPruning", "B: uniform"]
    assert len(figures(at)) == 3


def test_published_profile_without_a_model():
    at = new_app("allocation")
    assert not at.exception, at.exception
    assert at.selectbox(key="a_source").value == "loaded model"     # says no model is loaded, no silent profile
    at.selectbox(key="a_source").set_value("profile: llama-7b-hf").run()
    assert len(at.dataframe[0].value) == 32 * 7
    assert float(metric(at, "Parameter-weighted mean")) == 0.7


def test_impossible_request_is_an_error_message(demo_analysis_full):
    at = new_app("allocation", analysis=demo_analysis_full)
    at.slider(key="a_rmax").set_value(0.6).run()
    assert not at.exception
    assert "r_max" in at.error[0].value


def test_csv_download_holds_the_ratios(demo_analysis_full):
    at = new_app("allocation", analysis=demo_analysis_full)
    buttons = at.get("download_button")
    assert buttons and "CSV" in buttons[0].proto.label


def test_owl_reads_the_disk_cache_and_honours_dense_kinds_and_r_max(demo, demo_analysis_full):
    import json

    from core.owlcache import OwlSettings, cache_path

    blocks = sorted(demo_analysis_full.table["block"].unique().tolist())
    path = cache_path(demo_analysis_full.identity, OwlSettings(nsamples=3, seqlen=96))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"scores": {str(b): 0.01 + 0.002 * (b % 5) for b in blocks}}))
    at = new_app("allocation", analysis=demo_analysis_full, loaded=demo, a_method="owl", a_dense=["k", "v"],
                 a_rmax=0.75, p_calib_n=3, p_seqlen=96)
    assert not at.exception, at.exception
    ratios = at.dataframe[0].value
    assert (ratios.loc[ratios["kind"].isin(["k", "v"]), "ratio"] == 0).all()
    assert ratios["ratio"].max() <= 0.75 and ratios["clipped"].any()
    assert float(metric(at, "Parameter-weighted mean")) == 0.7
    assert abs((ratios["ratio"] * ratios["params"]).sum() / ratios["params"].sum() - 0.7) < 1e-12
    assert any("held at r_max" in c.value for c in at.caption)
    path.unlink()


def test_owl_statistics_run_as_a_background_job_and_are_cached(demo, demo_analysis_full):
    """The button starts `spectrascope owl-scores`; the page does not wait; once the job is done
    the page reads the scores from the cache, equal to core's owl_scores on the same windows."""
    import time

    from core.calibration import calibration_data
    from core.owlcache import OwlSettings, read_owl_scores
    from core.pruning import owl_scores
    from dashboard import jobs

    at = new_app("allocation", analysis=demo_analysis_full, loaded=demo, a_method="owl", a_dense=["v"],
                 p_calib_n=2, p_seqlen=64)
    assert not at.exception, at.exception
    button = next(b for b in at.button if b.label == "Compute OWL statistics")
    button.click().run()
    assert not at.exception, at.exception
    assert any("OWL statistics" in j.title for j in jobs.list_jobs(3))
    deadline = time.time() + 240
    while any(j.status() == "running" for j in jobs.list_jobs(3)):
        assert time.time() < deadline, "the OWL job did not finish"
        time.sleep(1.0)
    at.run()
    assert not at.exception, at.exception
    ratios = at.dataframe[0].value
    assert (ratios.loc[ratios["kind"] == "v", "ratio"] == 0).all() and ratios["ratio"].max() > 0.7
    cached = read_owl_scores(demo.identity, OwlSettings(nsamples=2, seqlen=64))
    direct = owl_scores(demo, calibration_data(demo.tokenizer, nsamples=2, seqlen=64, model=demo.model), device="cpu")
    assert cached.keys() == direct.keys()
    assert max(abs(cached[b] - direct[b]) for b in direct) < 1e-6


def test_small_controls(demo_analysis_full):
    at = new_app("allocation", analysis=demo_analysis_full, a_compare=True, b_method="uniform", a_rmax=0.999)
    assert not at.exception, at.exception
    assert at.slider(key="b_epsilon").disabled
    at.radio(key="b_method").set_value("alpha").run()
    assert not at.slider(key="b_epsilon").disabled
    assert at.slider(key="a_rmax").proto.format == "%.3f"
    mean = next(m for m in at.metric if m.label == "Parameter-weighted mean")
    assert not mean.delta or "e-16" not in mean.delta
    assert any(link.proto.page.endswith("prune.py") or "prune" in link.proto.page for link in at.get("page_link"))
    name = at.get("download_button")[0].proto.help          # "saves <file name>"
    assert "SmolLM2" in name and "S0.70" in name and "AlphaPruning" in name, name


def test_settings_survive_a_page_switch_when_streamlit_resets_them(demo_analysis_full):
    """While a job's fragment refreshes, Streamlit brings back a widget's first value on a page
    switch (S returned to 0.70): the kept value wins on the first run of a newly shown page."""
    from dashboard.state import PAGES

    at = new_app("allocation", analysis=demo_analysis_full)
    at.slider(key="a_sparsity").set_value(0.55).run()
    at.switch_page(PAGES["prune"][0]).run()
    at.session_state["a_sparsity"] = 0.7          # what Streamlit resurrected
    at.switch_page(PAGES["allocation"][0]).run()
    assert not at.exception, at.exception
    assert at.slider(key="a_sparsity").value == 0.55
    assert float(metric(at, "Parameter-weighted mean")) == 0.55
    at.slider(key="a_sparsity").set_value(0.6).run()     # on the same page the widget wins
    assert at.slider(key="a_sparsity").value == 0.6
