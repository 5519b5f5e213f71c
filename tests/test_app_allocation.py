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
    assert at.selectbox(key="a_source").value == "profile: llama-13b-hf"
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


def test_owl_honours_dense_kinds_and_r_max(demo, demo_analysis_full):
    blocks = sorted(demo_analysis_full.table["block"].unique().tolist())
    scores = {b: 0.01 + 0.002 * (b % 5) for b in blocks}
    at = new_app("allocation", analysis=demo_analysis_full, loaded=demo, owl={demo_analysis_full.identity: scores},
                 a_method="owl", a_dense=["k", "v"], a_rmax=0.75)
    assert not at.exception, at.exception
    ratios = at.dataframe[0].value
    assert (ratios.loc[ratios["kind"].isin(["k", "v"]), "ratio"] == 0).all()
    assert ratios["ratio"].max() <= 0.75 and ratios["clipped"].any()
    assert float(metric(at, "Parameter-weighted mean")) == 0.7
    assert abs((ratios["ratio"] * ratios["params"]).sum() / ratios["params"].sum() - 0.7) < 1e-12
    assert any("held at r_max" in c.value for c in at.caption)
