"""Layer quality page: heatmap of any metric with clickable cells and an alpha scale centred on the
2-6 band, depth and distribution plots, flagged matrices, and a cell opening Spectra."""
import numpy as np
from test_app_common import arr, figures, new_app, texts


def test_metric_choice_changes_the_heatmap(demo_analysis_full):
    at = new_app("quality", analysis=demo_analysis_full)
    assert not at.exception, at.exception
    heat = figures(at)[0]
    assert "alpha" in heat["layout"]["title"]["text"]
    z_alpha = arr(heat["data"][0]["z"])
    assert z_alpha.shape == (7, 30)          # kinds x blocks
    at.selectbox(key="q_metric").set_value("log_norm").run()
    heat = figures(at)[0]
    assert "log_norm" in heat["layout"]["title"]["text"] and not np.allclose(arr(heat["data"][0]["z"]), z_alpha, equal_nan=True)
    assert len(figures(at)) == 3


def test_alpha_scale_is_clipped_around_the_well_trained_band(demo_analysis_full):
    at = new_app("quality", analysis=demo_analysis_full)
    heat = figures(at)[0]["data"][0]
    assert (heat["zmin"], heat["zmax"]) == (1.5, 8.0)
    edges = [p for p, _ in heat["colorscale"]]
    # hard colour changes at alpha 2 and 6: (a - 1.5) / 6.5
    assert edges.count((2 - 1.5) / 6.5) == 2 and edges.count((6 - 1.5) / 6.5) == 2
    depth = figures(at)[1]
    label = next(a for a in depth["layout"]["annotations"] if "well trained" in a["text"])
    assert label["bgcolor"].startswith("rgba(255,255,255")      # a box drawn above the lines


def test_every_cell_is_a_clickable_marker(demo_analysis_full):
    at = new_app("quality", analysis=demo_analysis_full)
    cells = figures(at)[0]["data"][1]
    assert cells["type"] == "scatter" and cells["marker"]["symbol"] == "square"
    assert len(cells["x"]) == 210
    chart = at.get("plotly_chart")[0].proto
    from streamlit.proto.PlotlyChart_pb2 import PlotlyChart

    assert list(chart.selection_mode) == [PlotlyChart.SelectionMode.POINTS]   # a click picks one cell


def test_flagged_matrices_are_listed(demo_analysis_full):
    at = new_app("quality", analysis=demo_analysis_full)
    flagged = at.dataframe[0].value
    table = demo_analysis_full.table
    assert len(flagged) == int((table["status"] != "ok").sum())


def test_open_cell_in_spectra(demo_analysis_full):
    at = new_app("quality", analysis=demo_analysis_full)
    at.selectbox(key="q_block").set_value(5)
    at.selectbox(key="q_kind").set_value("down").run()
    assert "model.layers.5.mlp.down_proj" in texts(at)
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Spectra"
    assert at.session_state["sp_blocks"] == [5] and at.session_state["sp_kinds"] == ["down"]


def test_a_remembered_click_opens_spectra_once(demo_analysis_full):
    # what the heatmap's selection callback leaves behind: the page body switches once
    at = new_app("quality", analysis=demo_analysis_full, q_open=(7, "v"))
    assert not at.exception, at.exception
    assert at.title[0].value == "Spectra"
    assert at.session_state["sp_blocks"] == [7] and at.session_state["sp_kinds"] == ["v"]
    assert at.session_state["q_open"] is None
