"""Layer quality page: heatmap of any metric, depth and distribution plots, flagged matrices,
and a cell opening Spectra."""
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
